"""experiments/compare_routers.py's report: rows per router (mean ± std over seeds), the
markdown tables, the plots and the one-line summaries."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np

import common
from dynmoe_jax import names, plots
from router_variants import DYNAMIC

mean_std = common.mean_std


def aggregate(task_runs: Dict[str, List[Dict]], steps_per_sec: Dict[str, float],
              analysis: Dict[str, List[Dict]]) -> List[Dict[str, Any]]:
  rows = []
  for router, seeds in task_runs.items():
    layers = list(seeds[0]['active_experts'])
    row = {'router': router, 'metric': seeds[0]['metric'], 'seeds': len(seeds)}
    row['value'], row['value_std'] = mean_std([s['value'] for s in seeds])
    row['mean_active_experts'], row['mean_active_experts_std'] = mean_std(
        [s['mean_active_experts'] for s in seeds])
    row['active_experts_per_layer'] = {
        l: mean_std([s['active_experts'].get(l) for s in seeds])[0] for l in layers}
    row['expert_params_per_token'] = mean_std([s['expert_params_per_token'] for s in seeds])[0]
    row['final_experts'] = [s['final_experts'] for s in seeds]
    row['activated_flops_per_token'] = mean_std(
        [s['activated_flops_per_token'] for s in seeds])[0]
    row['train_computed_flops_per_token'] = mean_std(
        [s['train_computed_flops_per_token'] for s in seeds])[0]
    row['train_dropped_fraction'] = mean_std(
        [np.mean(list(s['train_dropped_fraction'].values())) if layers else None
         for s in seeds])[0]
    ratios = [np.mean(list(s['load_ratio_last_100_steps'].values())) for s in seeds
              if s.get('load_ratio_last_100_steps')]
    row['load_ratio'], row['load_ratio_std'] = mean_std(ratios)
    if steps_per_sec and 'top2' in steps_per_sec and router in steps_per_sec:
      row['steps_per_sec_vs_top2'] = steps_per_sec[router] / steps_per_sec['top2']
    row['analysis'] = analysis.get(router, [])
    rows.append(row)
  return rows


def markdown_table(task: str, rows: List[Dict]) -> str:
  metric = rows[0]['metric']
  label = 'test accuracy (%)' if metric == 'accuracy' else 'test bits/byte'
  scale = 100.0 if metric == 'accuracy' else 1.0
  lines = [f'| {task} router | {label} | active experts / token (per MoE layer) | '
           'expert FFN params / token | expert MFLOPs / token: activated (eval), computed '
           '(train) | final experts per layer | train steps/s vs top-2 | dropped pairs (train) | '
           'expert load max/min (last 100 steps) |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    per_layer = ', '.join(f'{v:.2f}' for v in r['active_experts_per_layer'].values())
    active = (f"{r['mean_active_experts']:.2f} ± {r['mean_active_experts_std']:.2f} "
              f'({per_layer})' if r['mean_active_experts'] is not None else '- (dense)')
    finals = sorted({', '.join(str(n) for n in f.values()) for f in r['final_experts']})
    dropped = r['train_dropped_fraction']
    speed = r.get('steps_per_sec_vs_top2')
    ratio = ('-' if r.get('load_ratio') is None
             else f"{r['load_ratio']:.2f} ± {r['load_ratio_std']:.2f}")
    lines.append(
        f"| {r['router']} | {scale * r['value']:.{1 if scale > 1 else 3}f} ± "
        f"{scale * r['value_std']:.{1 if scale > 1 else 3}f} | {active} | "
        f"{r['expert_params_per_token'] / 1e3:.1f}k | "
        f"{r['activated_flops_per_token'] / 1e6:.3f} / "
        f"{r['train_computed_flops_per_token'] / 1e6:.3f} | {' / '.join(finals) or '-'} | "
        f"{f'{speed:.2f}×' if speed else '-'} | "
        f"{'-' if dropped is None else f'{100 * dropped:.1f}%'} | {ratio} |")
  return '\n'.join(lines)


def write_plots(results: Dict[str, Any], out: str) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  tasks = list(results['tasks'])
  written = []

  def save(fig, name):
    written.append(plots.save_figure(fig, os.path.join(out, name), dpi=120))

  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = results['tasks'][task]['rows']
    for r in rows:
      scale = 100.0 if r['metric'] == 'accuracy' else 1.0
      x = r['expert_params_per_token'] / 1e3
      ax.errorbar(x, scale * r['value'], yerr=scale * r['value_std'], fmt='o', capsize=3,
                  color='black' if r['router'] == 'dense' else None)
      ax.annotate(f"{r['router']}\n({r['mean_active_experts']:.1f} exp)"
                  if r['mean_active_experts'] is not None else r['router'],
                  (x, scale * r['value']), fontsize=7, xytext=(4, 4),
                  textcoords='offset points')
    ax.set_xlabel('activated expert FFN params per token (k, MoE blocks)')
    ax.set_ylabel('test accuracy (%)' if rows[0]['metric'] == 'accuracy'
                  else 'test bits per byte (lower is better)')
    ax.set_title(f'{task}: quality vs activated experts (mean ± std over seeds)')
  save(fig, 'pareto.png')

  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in results['tasks'][task]['rows'] if r['active_experts_per_layer']]
    layers = sorted({l for r in rows for l in r['active_experts_per_layer']},
                    key=names.layer_index)
    width = 0.8 / max(1, len(layers))
    for i, layer in enumerate(layers):
      ax.bar(np.arange(len(rows)) + i * width,
             [r['active_experts_per_layer'].get(layer, 0.0) for r in rows], width, label=layer)
    ax.set_xticks(np.arange(len(rows)) + width * (len(layers) - 1) / 2)
    ax.set_xticklabels([r['router'] for r in rows], rotation=30, ha='right', fontsize=8)
    ax.set_ylabel('active experts per token (test)')
    ax.set_title(f'{task}: experts per token per MoE layer')
    ax.legend(fontsize=8)
  save(fig, 'experts_per_layer.png')

  panels = [(task, kind) for task in tasks for kind in ('loss', 'noise')
            if kind == 'loss' or task == 'mnist1d']
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  for ax, (task, kind) in zip(axes[0], panels):
    for r in results['tasks'][task]['rows']:
      if r['router'] not in DYNAMIC or not r['analysis']:
        continue
      key, xkey = ('loss_bins', 'median_loss') if kind == 'loss' else ('noise',
                                                                       'noise_multiplier')
      points = [a[key] for a in r['analysis'] if key in a]
      if not points:
        continue
      xs = np.mean([[p[xkey] for p in seed] for seed in points], 0)
      ys = np.array([[np.mean(p['experts_per_token']) for p in seed] for seed in points])
      ax.errorbar(xs, ys.mean(0), yerr=ys.std(0), marker='o', capsize=3, label=r['router'])
    if kind == 'loss':
      ax.set_xscale('log')
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      unit = 'example' if task == 'mnist1d' else 'byte'
      ax.set_xlabel(f'per-{unit} test loss (median of each quintile)')
    else:
      ax.set_xlabel('MNIST-1D noise multiplier (test signals)')
    ax.set_ylabel('experts per token (mean over MoE layers)')
    ax.set_title(f'{task}: experts per token vs difficulty')
    ax.legend(fontsize=8)
  save(fig, 'difficulty.png')
  return written


def split_summary(results: Dict[str, Any]) -> str:
  """One line per dynamic router: experts per token (mean of the MoE layers) on the test
  split and on the first examples of the training split, mean ± std over seeds."""
  lines = []
  for task, entry in results['tasks'].items():
    for r in entry['rows']:
      if not r['analysis'] or 'train_slice_experts_per_token' not in r['analysis'][0]:
        continue
      test, train_slice = ([np.mean(a[key]) for a in r['analysis']] for key in
                           ('test_experts_per_token', 'train_slice_experts_per_token'))
      lines.append(f"{task} {r['router']}: experts/token test {np.mean(test):.2f} ± "
                   f"{np.std(test, ddof=1) if len(test) > 1 else 0:.2f}, "
                   f"{r['analysis'][0]['train_slice']} "
                   f"{np.mean(train_slice):.2f} ± "
                   f"{np.std(train_slice, ddof=1) if len(train_slice) > 1 else 0:.2f}")
  return '\n'.join(lines)


def difficulty_summary(results: Dict[str, Any]) -> str:
  """One line per dynamic router: experts per token from the easiest to the hardest bin."""
  lines = []
  for task, entry in results['tasks'].items():
    for r in entry['rows']:
      if not r['analysis']:
        continue
      bins = np.mean([[np.mean(b['experts_per_token']) for b in a['loss_bins']]
                      for a in r['analysis']], 0)
      line = (f"{task} {r['router']}: experts/token by loss quintile (easy -> hard) "
              + ' '.join(f'{b:.2f}' for b in bins))
      noise = [a['noise'] for a in r['analysis'] if 'noise' in a]
      if noise:
        levels = np.mean([[np.mean(n['experts_per_token']) for n in seed] for seed in noise], 0)
        line += '; by noise x1/x2/x4 ' + ' '.join(f'{v:.2f}' for v in levels)
      lines.append(line)
  return '\n'.join(lines)
