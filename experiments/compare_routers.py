"""Router comparison, side by side: dense, top-1, top-2, top-p (two p), DA-MoE,
DynMoE top-any (fixed experts) and DynMoE adaptive, on MNIST-1D and the byte-level
LM corpus; same model size, steps and data; several seeds each.

Phases, all in one command (a rerun skips finished runs and redoes the rest):
  1. train every (task, router, seed) to completion; each run keeps its workdir
     under OUT/runs/ (metrics, checkpoints, plots);
  2. time the train step of every router of a task side by side (seed 0's final
     state, rounds interleaved across routers), reported relative to top-2;
  3. routing analysis of the dynamic routers on the test sets: experts per token
     vs noise level (MNIST-1D variants mnist1d/noise_x2, noise_x4, built locally)
     and vs per-example (MNIST-1D) or per-byte (LM) loss; and experts per token on the
     first examples of the training split (what a compute budget holds);
  4. a markdown table per task, OUT/results.json and PNG plots.

  python experiments/compare_routers.py                    # docs/results.md numbers (2-core CPU, ~60 min)
  python experiments/compare_routers.py --preset full      # GPU/TPU size
  python experiments/compare_routers.py --tasks mnist1d --routers dense,top2,dynmoe --seeds 0
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List

import jax
import numpy as np

import common
from dynmoe_jax import config_lib, names, plots, train
from dynmoe_jax.data import pipeline
from dynmoe_jax.default_config import lm_config, mnist1d_config

TASKS = ('mnist1d', 'lm')
ROUTERS = ('dense', 'top1', 'top2', 'top_p0.4', 'top_p0.6', 'damoe', 'dynmoe_2024', 'dynmoe',
           'dynmoe_b1.5', 'dynmoe_b1.0', 'dynmoe_adaptive', 'top2_cap', 'dynmoe_cap',
           'dynmoe_b1.5_cap', 'dynmoe_b1.5_2s', 'dynmoe_b1.5_p', 'dynmoe_b1.5_2sp',
           'dynmoe_b1.5_k4', 'dynmoe_b1.5_k4_cap', 'dynmoe_b1.5_h10', 'dynmoe_b1.5_h20',
           'dynmoe_b1.5_h40', 'dynmoe_b1.0_h20', 'dynmoe_b1.5_h20_fb', 'dynmoe_b1.5_h20_ls',
           'dynmoe_b1.5_h20_fb_ls', 'top_p0.4_b1.5', 'top_p0.4_b1.5_i', 'top_p0.4_b1.5_plain')
DYNAMIC = ('top_p0.4', 'top_p0.6', 'damoe', 'dynmoe_2024', 'dynmoe', 'dynmoe_b1.5',
           'dynmoe_b1.0', 'dynmoe_adaptive', 'dynmoe_cap', 'dynmoe_b1.5_cap', 'dynmoe_b1.5_2s',
           'dynmoe_b1.5_p', 'dynmoe_b1.5_2sp', 'dynmoe_b1.5_k4', 'dynmoe_b1.5_k4_cap',
           'dynmoe_b1.5_h10', 'dynmoe_b1.5_h20', 'dynmoe_b1.5_h40', 'dynmoe_b1.0_h20',
           'dynmoe_b1.5_h20_fb', 'dynmoe_b1.5_h20_ls', 'dynmoe_b1.5_h20_fb_ls',
           'top_p0.4_b1.5', 'top_p0.4_b1.5_i', 'top_p0.4_b1.5_plain')
CAPACITY_SUFFIX = '_cap'  # <router>_cap: the same router with capacity re-planned
NOISE_DATASETS = {1.0: 'mnist1d', 2.0: 'mnist1d/noise_x2', 4.0: 'mnist1d/noise_x4'}
LOSS_BINS = 5

# Steps per task; model sizes beyond the task defaults (default_config.mnist1d_config /
# lm_config: 4 blocks of width 64, blocks 1 and 3 MoE with 8 experts of hidden 64).
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'cpu': {'mnist1d': {'num_train_steps': 400},
            'lm': {'num_train_steps': 300, 'batch_size': 16}},
    # MNIST-1D at the default job's length: at 400 steps top-1 and top-2 lie within two seed
    # stds of each other there (the byte LM's 300 steps already separate them)
    'cpu_long': {'mnist1d': {'num_train_steps': 2000},
                 'lm': {'num_train_steps': 300, 'batch_size': 16}},
    'full': {
        'mnist1d': {'num_train_steps': 4000},
        'lm': {'num_train_steps': 20000, 'batch_size': 64, 'data.seq_len': 256,
               'model.max_len': 256, 'model.dim': 256, 'model.num_heads': 8,
               'model.num_layers': 8, 'model.mlp_dim': 512, 'model.moe.hidden_dim': 256},
    },
    # seconds: the test suite runs the whole pipeline with it
    'smoke': {
        'mnist1d': {'num_train_steps': 10, 'batch_size': 16, 'eval_batch_size': 250,
                    'model.num_layers': 2, 'model.dim': 16, 'model.num_heads': 2,
                    'model.mlp_dim': 16, 'model.moe.hidden_dim': 8,
                    'optimizer.warmup_steps': 2},
        'lm': {'num_train_steps': 10, 'batch_size': 4, 'eval_batch_size': 32,
               'data.eval_split': 'test[:32]', 'data.seq_len': 16, 'model.max_len': 16,
               'model.num_layers': 2, 'model.dim': 16, 'model.num_heads': 2,
               'model.mlp_dim': 16, 'model.moe.hidden_dim': 8, 'optimizer.warmup_steps': 2},
    },
}


# ----------------------------------------------------------------------------- configs


def router_variants() -> Dict[str, Callable]:
  """Each edits a task config in place into one router of the comparison."""

  def dense(c):  # same activated FFN params per token as top-1
    c.model.moe_layers = 'none'
    c.model.mlp_dim = c.model.moe.hidden_dim

  def top_k(k):
    def edit(c):
      c.model.moe.router, c.model.moe.top_k.k = 'top_k', k
    return edit

  def top_p(p):
    def edit(c):
      c.model.moe.router, c.model.moe.top_p.p = 'top_p', p
    return edit

  def top_p_budget(p, target, **controller):  # the budget adapts p (from p)
    def edit(c):
      top_p(p)(c)
      c.budget.target_experts_per_token = target
      for key, value in controller.items():  # default: the library's controller
        c.budget[key] = value
    return edit

  def damoe(c):  # as configs/mnist1d_damoe.py
    c.model.moe.router = 'adaptive_k'
    c.model.moe.adaptive_k.max_k, c.model.moe.adaptive_k.expected_k = 4, 2.0

  def dynmoe(c):  # the reference's 2025 losses (the defaults)
    c.model.moe.router = 'top_any'

  def dynmoe_2024(c):  # the paper's losses: diversity + simplicity only
    dynmoe(c)
    c.model.moe.top_any.load_balance_weight = c.model.moe.top_any.efficiency_weight = 0.0

  def budget(target, two_sided=False, error_unit=None, max_k=None, horizon=None,
             train_fallback=False, learned_scale=False):
    def edit(c):
      dynmoe(c)
      c.budget.target_experts_per_token = target
      c.budget.two_sided = two_sided
      c.budget.error_unit = error_unit
      c.budget.horizon = horizon
      c.model.moe.top_any.max_k = max_k
      c.model.moe.top_any.train_fallback = train_fallback
      if learned_scale:  # the reference's gated_multi_gate_t: 10, learned in log space
        c.model.moe.top_any.learned_scale = True
        c.model.moe.top_any.scale = 10.0
    return edit

  def dynmoe_adaptive(c):
    c.model.moe.router = 'top_any'
    c.model.moe.num_experts = 2
    a = c.adaptive
    a.enabled = True
    a.every = max(1, c.num_train_steps // 5)  # four boundaries
    a.record_steps = max(1, a.every // 5)
    a.compile_lead_steps = 0  # the docs/results.md table was measured with the window at the boundary
    a.min_experts, a.max_experts = 1, 16

  def replanned(base):
    def edit(c):
      base(c)
      a = c.adaptive
      a.capacity = True
      a.every = max(1, c.num_train_steps // 5)  # four boundaries
      a.record_steps = max(1, a.every // 5)
      a.compile_lead_steps = max(0, min(a.every // 10, a.every - a.record_steps))
    return edit

  variants = {'dense': dense, 'top1': top_k(1), 'top2': top_k(2), 'top_p0.4': top_p(0.4),
              'top_p0.6': top_p(0.6), 'top_p0.4_b1.5': top_p_budget(0.4, 1.5),
              # p acts on K at once (no optimizer in between): without the predicted trend /
              # with ReMoE's plain rule
              'top_p0.4_b1.5_i': top_p_budget(0.4, 1.5, horizon=0.0),
              'top_p0.4_b1.5_plain': top_p_budget(0.4, 1.5, horizon=0.0,
                                                  error_unit=0.0),
              'damoe': damoe, 'dynmoe_2024': dynmoe_2024,
              'dynmoe': dynmoe, 'dynmoe_b1.5': budget(1.5), 'dynmoe_b1.0': budget(1.0),
              'dynmoe_b1.5_2s': budget(1.5, two_sided=True),
              # updates scaled with the error (one budget_rate step per 10%, up to 5)
              'dynmoe_b1.5_p': budget(1.5, error_unit=0.1),
              'dynmoe_b1.5_2sp': budget(1.5, two_sided=True, error_unit=0.1),
              # ... on the count predicted H steps ahead (a proportional term)
              **{f'dynmoe_b1.5_h{h}': budget(1.5, error_unit=0.1, horizon=float(h))
                 for h in (10, 20, 40)},
              'dynmoe_b1.0_h20': budget(1.0, error_unit=0.1, horizon=20.0),
              # + the top-1 fallback in training too (no token skips the layer, as in
              # evaluation) / + the reference's learned temperature / both
              'dynmoe_b1.5_h20_fb': budget(1.5, error_unit=0.1, horizon=20.0,
                                           train_fallback=True),
              'dynmoe_b1.5_h20_ls': budget(1.5, error_unit=0.1, horizon=20.0,
                                           learned_scale=True),
              'dynmoe_b1.5_h20_fb_ls': budget(1.5, error_unit=0.1, horizon=20.0,
                                              train_fallback=True, learned_scale=True),
              # at most 4 experts per token: the sorted pair list is T·4 long, not T·E
              'dynmoe_b1.5_k4': budget(1.5, max_k=4),
              'dynmoe_adaptive': dynmoe_adaptive}
  for name in ROUTERS:
    if name.endswith(CAPACITY_SUFFIX):
      variants[name] = replanned(variants[name[:-len(CAPACITY_SUFFIX)]])
  return variants


def make_config(task: str, router: str, seed: int, preset: str):
  c = mnist1d_config('top_any') if task == 'mnist1d' else lm_config('top_any')
  common.apply_overrides(c, PRESETS[preset][task])
  steps = c.num_train_steps
  c.seed = seed
  c.progress_bar = False
  c.eval_every = c.checkpoint_every = steps
  c.keep_checkpoints = 1
  c.log_every = max(1, steps // 20)
  router_variants()[router](c)
  return c


# ----------------------------------------------------------------------------- phase 1


def moe_blocks(task: str, preset: str) -> int:
  """How many blocks are MoE in the compared models (dense: the same blocks)."""
  return len(names.moe_layer_names(config_lib.experts_layout(
      make_config(task, 'top2', 0, preset))))


def expert_params_per_token(config, active: Dict[str, float], blocks: int) -> float:
  """FFN weights a token multiplies by in the MoE blocks (dense: the same blocks' FFN)."""
  m = config.model
  if not active:
    return float(blocks * 2 * m.dim * m.mlp_dim)
  per_expert = (3 if m.moe.glu else 2) * m.dim * m.moe.hidden_dim
  return float(sum(active.values()) * per_expert)


def summarize_run(config, workdir: str, blocks: int) -> Dict[str, Any]:
  summary = common.run_summary(workdir)
  summary['expert_params_per_token'] = expert_params_per_token(
      config, summary['active_experts'], blocks)
  if not summary['active_experts']:  # dense: its FFNs in the same blocks, 2 FLOPs per weight
    summary['activated_flops_per_token'] = summary['train_computed_flops_per_token'] = \
        2 * summary['expert_params_per_token']
  return summary


def say(line: str):
  sys.stdout.write(line + '\n')  # one write: lines from worker threads stay whole
  sys.stdout.flush()


def run_dir(args, task: str, router: str, seed: int) -> str:
  return os.path.join(args.out, 'runs', task, router, f'seed_{seed}')


def train_one(args, task: str, router: str, seed: int) -> Dict[str, Any]:
  workdir = run_dir(args, task, router, seed)
  config = make_config(task, router, seed, args.preset)
  start = time.perf_counter()
  train.Trainer(config, workdir).run()
  summary = summarize_run(config, workdir, moe_blocks(task, args.preset))
  summary['seconds'] = time.perf_counter() - start
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def train_all(args) -> Dict[str, Dict[str, List[Dict]]]:
  """Trains the runs without a summary.json, `--jobs` at a time (each in its own
  process: one JAX process keeps about 1.5 of 2 CPU cores busy on these models)."""
  todo = [(t, r, s) for t in args.tasks for r in args.routers for s in args.seeds
          if not os.path.exists(os.path.join(run_dir(args, t, r, s), 'summary.json'))]

  def launch(index_and_run):
    index, (task, router, seed) = index_and_run
    say(f'[{index + 1}/{len(todo)}] {task} {router} seed {seed}')
    if args.jobs == 1:
      summary = train_one(args, task, router, seed)
    else:
      summary = common.run_in_process(
          [os.path.abspath(__file__), '--preset', args.preset, '--tasks', task, '--routers',
           router, '--seeds', str(seed), '--out', args.out, '--train_only', '--jobs', '1'],
          run_dir(args, task, router, seed), f'{task} {router} seed {seed}')
    say(f"    {task} {router} seed {seed}: {summary['metric']} {summary['value']:.4f}, "
        f"active experts {summary['active_experts']}, {summary['seconds']:.0f}s")

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    list(pool.map(launch, enumerate(todo)))
  runs: Dict[str, Dict[str, List[Dict]]] = {}
  for task in args.tasks:
    for router in args.routers:
      for seed in args.seeds:
        with open(os.path.join(run_dir(args, task, router, seed), 'summary.json')) as f:
          runs.setdefault(task, {}).setdefault(router, []).append(json.load(f))
  return runs


# ----------------------------------------------------------------------------- phase 2


def time_train_steps(args, task: str) -> Dict[str, float]:
  """Steps/s of each router's compiled train step (seed 0's final state), measured in
  interleaved rounds; the median round counts."""
  steppers = {}
  for router in args.routers:
    config = make_config(task, router, args.seeds[0], args.preset)
    trainer, state = common.restored(config, run_dir(args, task, router, args.seeds[0]))
    steppers[router] = common.train_stepper(trainer, state, args.timing_steps)
  return common.steps_per_second(common.interleaved_seconds(steppers, args.timing_rounds),
                                 args.timing_steps)


# ----------------------------------------------------------------------------- phase 3


def per_token_experts(trainer, params, moe_controls, batch):
  """Forward pass in eval mode: (logits, {layer: int[B, S] experts per token})."""
  model = trainer.compiled.model
  inputs = train.model_inputs(batch, trainer.config.model.task)
  (logits, _), state = model.apply({'params': params}, inputs, training=False,
                                   moe_controls=moe_controls, mutable=['intermediates'])
  counts = {name: state['intermediates'][name]['moe']['active_experts_per_token']
            for name in names.moe_layer_names(trainer.compiled.layout.experts)}
  return logits, counts


def routing_analysis(config, workdir: str) -> Dict[str, Any]:
  """Experts per token against difficulty for one finished run."""
  trainer, state = common.restored(config, workdir)
  task = config.model.task

  @jax.jit
  def forward(params, moe_controls, batch):
    logits, counts = per_token_experts(trainer, params, moe_controls, batch)
    return logits, counts, train.example_losses(logits, batch, task)[0]

  d = config.data

  def source_of(name: str, split: str = d.eval_split):
    return pipeline.get_source(name, split, d.data_dir)

  def pass_over(source):
    """Per-example (classify) or per-byte (lm) loss, correctness and experts per token."""
    losses, correct, experts = [], [], []
    with common.mesh_of(trainer):
      for batch in pipeline.eval_batches(source, trainer.preprocess, config.eval_batch_size):
        keep = batch.pop('mask') > 0
        logits, counts, loss = jax.device_get(
            forward(state.params, trainer.compiled.layer_controls(state), batch))
        layer_counts = np.stack([counts[n] for n in sorted(counts, key=names.layer_index)],
                                -1)  # [B, S, L]
        if task == 'classify':
          losses.append(np.asarray(loss)[keep])
          correct.append((logits.argmax(-1) == batch['labels'])[keep])
          experts.append(layer_counts.mean(1)[keep])  # [B, L]: mean over the signal's tokens
        else:
          targets = batch['inputs'][:, 1:]
          valid = (targets > 0) & keep[:, None]
          losses.append(np.asarray(loss)[valid])
          correct.append((logits.argmax(-1) == targets)[valid])
          experts.append(layer_counts[valid])  # [N, L]: the token predicting that byte
    return np.concatenate(losses), np.concatenate(correct), np.concatenate(experts, 0)

  out: Dict[str, Any] = {'layers': names.moe_layer_names(trainer.compiled.layout.experts)}
  test_source = source_of(d.name)
  losses, _, experts = pass_over(test_source)
  edges = np.quantile(losses, np.linspace(0, 1, LOSS_BINS + 1))
  bins = np.clip(np.searchsorted(edges, losses, side='right') - 1, 0, LOSS_BINS - 1)
  out['loss_bins'] = [{
      'median_loss': float(np.median(losses[bins == b])),
      'experts_per_token': experts[bins == b].mean(0).tolist(),
      'count': int((bins == b).sum())} for b in range(LOSS_BINS)]
  out['test_experts_per_token'] = experts.mean(0).tolist()
  # as many training examples as the test split has: routing where a budget holds it
  train_slice = f'train[:{len(test_source)}]'
  out['train_slice'] = train_slice
  out['train_slice_experts_per_token'] = pass_over(
      source_of(d.name, train_slice))[2].mean(0).tolist()
  if task == 'classify' and d.name == 'mnist1d':
    out['noise'] = []
    for multiplier, name in NOISE_DATASETS.items():
      _, correct, noisy_experts = pass_over(source_of(name))
      out['noise'].append({'noise_multiplier': multiplier, 'accuracy': float(correct.mean()),
                           'experts_per_token': noisy_experts.mean(0).tolist()})
  return out


# ----------------------------------------------------------------------------- phase 4


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
           '(train) | final experts per layer | train steps/s vs top-2 | dropped pairs (train) |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    per_layer = ', '.join(f'{v:.2f}' for v in r['active_experts_per_layer'].values())
    active = (f"{r['mean_active_experts']:.2f} ± {r['mean_active_experts_std']:.2f} "
              f'({per_layer})' if r['mean_active_experts'] is not None else '- (dense)')
    finals = sorted({', '.join(str(n) for n in f.values()) for f in r['final_experts']})
    dropped = r['train_dropped_fraction']
    speed = r.get('steps_per_sec_vs_top2')
    lines.append(
        f"| {r['router']} | {scale * r['value']:.{1 if scale > 1 else 3}f} ± "
        f"{scale * r['value_std']:.{1 if scale > 1 else 3}f} | {active} | "
        f"{r['expert_params_per_token'] / 1e3:.1f}k | "
        f"{r['activated_flops_per_token'] / 1e6:.3f} / "
        f"{r['train_computed_flops_per_token'] / 1e6:.3f} | {' / '.join(finals) or '-'} | "
        f"{f'{speed:.2f}×' if speed else '-'} | "
        f"{'-' if dropped is None else f'{100 * dropped:.1f}%'} |")
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


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', choices=sorted(PRESETS))
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--routers', default=','.join(ROUTERS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--timing_rounds', type=int, default=5)
  parser.add_argument('--timing_steps', type=int, default=20)
  parser.add_argument('--jobs', type=int, default=2, help='training runs at a time')
  parser.add_argument('--plots_only', action='store_true',
                      help='redraw the PNGs from OUT/results.json, nothing else')
  parser.add_argument('--train_only', action='store_true',
                      help='phase 1 only (the per-run worker of --jobs > 1)')
  parser.add_argument('--out', default=common.scratch_out('compare_routers'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  args.tasks = args.tasks.split(',')
  args.routers = args.routers.split(',')
  args.seeds = [int(s) for s in args.seeds.split(',')]
  unknown = ([t for t in args.tasks if t not in TASKS]
             + [r for r in args.routers if r not in ROUTERS])
  if unknown:
    parser.error(f'unknown tasks/routers {unknown}; tasks: {TASKS}, routers: {ROUTERS}')
  os.makedirs(args.out, exist_ok=True)
  if args.plots_only:
    with open(os.path.join(args.out, 'results.json')) as f:
      return write_plots(json.load(f), args.out)
  # Seeds of one router compile the same programs: the persistent cache skips the repeats.
  jax.config.update('jax_compilation_cache_dir', os.path.join(args.out, 'runs', '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

  start = time.perf_counter()
  runs = train_all(args)
  train_seconds = time.perf_counter() - start
  if args.train_only:
    return runs
  results: Dict[str, Any] = {'preset': args.preset, 'seeds': args.seeds,
                             'train_seconds': train_seconds, 'tasks': {}}
  for task in args.tasks:
    print(f'timing {task} train steps side by side', flush=True)
    steps_per_sec = time_train_steps(args, task) if 'top2' in args.routers else {}
    analysis = {}
    for router in args.routers:
      if router in DYNAMIC:
        print(f'routing analysis {task} {router}', flush=True)
        analysis[router] = [routing_analysis(
            make_config(task, router, seed, args.preset),
            run_dir(args, task, router, seed)) for seed in args.seeds]
    config = make_config(task, 'dynmoe', args.seeds[0], args.preset)
    results['tasks'][task] = {
        'num_train_steps': config.num_train_steps,
        'steps_per_sec': steps_per_sec,
        'rows': aggregate(runs[task], steps_per_sec, analysis)}
  results['total_seconds'] = time.perf_counter() - start
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  tables = [markdown_table(task, results['tasks'][task]['rows']) for task in args.tasks]
  splits = split_summary(results)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write('\n\n'.join(tables) + '\n\n' + splits + '\n')
  print('\n\n'.join(tables))
  print('\n' + splits)
  print('\n' + difficulty_summary(results))
  written = write_plots(results, args.out)
  print(f"\ntrain phase {train_seconds / 60:.1f} min, total {results['total_seconds'] / 60:.1f} "
        f'min; wrote results.json, results.md, ' + ', '.join(os.path.basename(p) for p in written))
  return results


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


if __name__ == '__main__':
  main()
