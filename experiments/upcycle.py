"""Sparse upcycling against training from scratch: a dense model trained N steps, then
upcycled (--config.init_from) into top-2 and into DynMoE top-any (with and without a
budget of 1.5 experts per token) and trained M more steps; against the dense model
trained N+M steps and the same MoE models trained from scratch for N+M steps. MNIST-1D
and the byte LM, several seeds.

Every expert copies its block's dense FFN, so the MoE blocks have experts as wide as the
dense FFN (model.moe.hidden_dim = model.mlp_dim) and top-2 activates twice the dense
FFN's FLOPs; the table reports activated expert FLOPs per token beside quality. The
dense runs have no FFN biases (model.ffn_bias=False): experts have none.

Also checked on every upcycled run: its step-0 eval loss against the dense model's final
eval loss (equal to 1e-4 for top-k with renormalised weights and for top-any in
evaluation mode; see dynmoe_jax/upcycle.py for why).

  python experiments/upcycle.py                       # docs/results.md numbers (2-core CPU)
  python experiments/upcycle.py --tasks mnist1d --seeds 0 --dense_steps 50 --more_steps 50
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time
from typing import Any, Dict, List

import common
from dynmoe_jax import config_lib, names, plots, train
from dynmoe_jax.default_config import lm_config, mnist1d_config

TASKS = ('mnist1d', 'lm')
TOP2 = {'model.moe.router': 'top_k', 'model.moe.top_k.k': 2}
TOP_ANY = {'model.moe.router': 'top_any'}
# name -> (config overrides of the MoE, or None for dense; upcycled from the dense run?)
VARIANTS = {
    'dense_N': (None, False),
    'dense_N+M': (None, False),
    'top2_scratch': (TOP2, False),
    'dynmoe_scratch': (TOP_ANY, False),
    'top2_upcycled': (TOP2, True),
    'dynmoe_upcycled': (TOP_ANY, True),
    # the budget's first controller (one budget_rate step per update), as measured
    'dynmoe_b1.5_upcycled': ({**TOP_ANY, 'budget.target_experts_per_token': 1.5,
                              **common.FIRST_BUDGET_CONTROLLER}, True),
}
TASK_OVERRIDES = {'mnist1d': {}, 'lm': {'batch_size': 16}}


def make_config(args, task: str, variant: str, seed: int):
  c = mnist1d_config('top_any') if task == 'mnist1d' else lm_config('top_any')
  common.apply_overrides(c, TASK_OVERRIDES[task])
  moe, upcycled = VARIANTS[variant]
  c.seed = seed
  c.progress_bar = False
  c.model.ffn_bias = False
  c.model.moe.hidden_dim = c.model.mlp_dim  # experts as wide as the dense FFN they copy
  steps = args.dense_steps + args.more_steps
  if moe is None:
    c.model.moe_layers = 'none'
    steps = args.dense_steps if variant == 'dense_N' else steps
  else:
    common.apply_overrides(c, moe)
  if upcycled:
    c.init_from = run_dir(args, task, 'dense_N', seed)
    steps = args.more_steps
  c.num_train_steps = steps
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, steps // 10))
  c.eval_every = c.checkpoint_every = steps
  c.keep_checkpoints = 1
  c.log_every = max(1, steps // 20)
  return c


def run_dir(args, task: str, variant: str, seed: int) -> str:
  return os.path.join(args.out, 'runs', task, variant, f'seed_{seed}')


def train_one(args, task: str, variant: str, seed: int) -> Dict[str, Any]:
  workdir = run_dir(args, task, variant, seed)
  config = make_config(args, task, variant, seed)
  start = time.perf_counter()
  trainer = train.Trainer(config, workdir)
  trainer.run()
  summary = common.run_summary(workdir)
  summary['seconds'] = time.perf_counter() - start
  rows = plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  start_rows = [r for r in rows if r['split'] == 'eval' and r['step'] == 0]
  if start_rows:
    summary['step0_eval_loss'] = start_rows[0]['loss']
    summary['step0_value'] = start_rows[0][summary['metric']]
  train_rows = [r for r in rows if r['split'] == 'train']
  late = train_rows[len(train_rows) // 2:]
  summary['steps_per_sec'] = float(sum(r['steps_per_sec'] for r in late) / max(len(late), 1))
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def run_all(args, variants: List[str]):
  todo = [(t, v, s) for t in args.tasks for v in variants for s in args.seeds
          if not os.path.exists(os.path.join(run_dir(args, t, v, s), 'summary.json'))]

  def launch(item):
    task, variant, seed = item
    s = common.run_in_process(
        [os.path.abspath(__file__), '--one', f'{task},{variant},{seed}', '--out', args.out,
         '--dense_steps', str(args.dense_steps), '--more_steps', str(args.more_steps)],
        run_dir(args, task, variant, seed), f'{task} {variant} seed {seed}')
    print(f"  {task} {variant} seed {seed}: {s['metric']} {s['value']:.4f}, active experts "
          f"{s['mean_active_experts']}, {s['seconds']:.0f}s", flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    list(pool.map(launch, todo))


def aggregate(args) -> Dict[str, Any]:
  results: Dict[str, Any] = {'dense_steps': args.dense_steps, 'more_steps': args.more_steps,
                             'seeds': args.seeds, 'tasks': {}}
  for task in args.tasks:
    rows = []
    for variant in VARIANTS:
      seeds = []
      for seed in args.seeds:
        with open(os.path.join(run_dir(args, task, variant, seed), 'summary.json')) as f:
          seeds.append(json.load(f))
      row = {'variant': variant, 'metric': seeds[0]['metric']}
      row['value'], row['value_std'] = common.mean_std([s['value'] for s in seeds])
      row['active_experts'] = common.mean_std([s['mean_active_experts'] for s in seeds])[0]
      row['activated_flops_per_token'] = common.mean_std(
          [s['activated_flops_per_token'] for s in seeds])[0]
      row['steps_per_sec'] = common.mean_std([s['steps_per_sec'] for s in seeds])[0]
      if VARIANTS[variant][1]:
        dense = []
        for seed in args.seeds:
          with open(os.path.join(run_dir(args, task, 'dense_N', seed), 'summary.json')) as f:
            dense.append(json.load(f))
        row['step0_loss_gap'] = max(abs(s['step0_eval_loss'] - d['eval_loss'])
                                    for s, d in zip(seeds, dense))
      rows.append(row)
    # Dense: its FFNs in the blocks the MoE models make MoE, 2 FLOPs per weight.
    m = make_config(args, task, 'top2_scratch', args.seeds[0]).model
    moe_blocks = len(names.moe_layer_names(config_lib.experts_layout(
        make_config(args, task, 'top2_scratch', args.seeds[0]))))
    dense_flops = moe_blocks * 2 * (2 * m.dim * m.mlp_dim)
    for row in rows:
      if row['active_experts'] is None:
        row['activated_flops_per_token'] = dense_flops
    results['tasks'][task] = rows
  return results


def markdown(results: Dict[str, Any]) -> str:
  out = []
  n, m = results['dense_steps'], results['more_steps']
  for task, rows in results['tasks'].items():
    metric = rows[0]['metric']
    scale, label = (100.0, 'test accuracy (%)') if metric == 'accuracy' else (1.0, 'test bits/byte')
    out.append(f'| {task} (N={n}, M={m}) | steps | {label} | active experts / token | '
               'expert FFN MFLOPs / token | steps/s | step-0 eval loss - dense |')
    out.append('|---|---|---|---|---|---|---|')
    for r in rows:
      steps = {'dense_N': 'N'}.get(r['variant'], 'N + M' if 'upcycled' not in r['variant']
                                   else 'N dense + M')
      digits = 1 if scale > 1 else 3
      gap = r.get('step0_loss_gap')
      out.append(
          f"| {r['variant']} | {steps} | {scale * r['value']:.{digits}f} ± "
          f"{scale * r['value_std']:.{digits}f} | "
          f"{'-' if r['active_experts'] is None else format(r['active_experts'], '.2f')} | "
          f"{r['activated_flops_per_token'] / 1e6:.3f} | {r['steps_per_sec']:.1f} | "
          f"{'-' if gap is None else format(gap, '.1e')} |")
    out.append('')
  return '\n'.join(out)


def plot(results: Dict[str, Any], path: str) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tasks = list(results['tasks'])
  fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for r in results['tasks'][task]:
      scale = 100.0 if r['metric'] == 'accuracy' else 1.0
      x = r['activated_flops_per_token'] / 1e6
      marker = 's' if 'upcycled' in r['variant'] else ('o' if 'scratch' in r['variant'] else 'D')
      ax.errorbar(x, scale * r['value'], yerr=scale * r['value_std'], fmt=marker, capsize=3)
      ax.annotate(r['variant'], (x, scale * r['value']), fontsize=7, xytext=(4, 4),
                  textcoords='offset points')
    ax.set_xlabel('activated expert FFN MFLOPs per token (MoE blocks)')
    ax.set_ylabel('test accuracy (%)' if r['metric'] == 'accuracy' else 'test bits/byte')
    ax.set_title(f'{task}: upcycled (squares) vs scratch (circles) vs dense')
  return plots.save_figure(fig, path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--dense_steps', type=int, default=500)
  parser.add_argument('--more_steps', type=int, default=500)
  parser.add_argument('--jobs', type=int, default=2)
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)
  parser.add_argument('--out', default=common.scratch_out('upcycle'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  args.tasks = args.tasks.split(',')
  args.seeds = [int(s) for s in args.seeds.split(',')]
  if args.one:
    task, variant, seed = args.one.split(',')
    train_one(args, task, variant, int(seed))
    return
  first = ['dense_N', 'dense_N+M', 'top2_scratch', 'dynmoe_scratch']
  print('dense N steps and the from-scratch runs', flush=True)
  run_all(args, first)
  print('upcycled runs', flush=True)
  run_all(args, [v for v in VARIANTS if v not in first])
  results = aggregate(args)
  table = markdown(results)
  print(table)
  common.save_json(os.path.join(args.out, 'results.json'), results)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table)
  print('wrote', plot(results, os.path.join(args.out, 'upcycle.png')))


if __name__ == '__main__':
  main()
