"""MNIST-1D side by side: dense vs DynMoE with 2, 4 and 8 fixed experts vs DynMoE
adaptive (starting from 2 experts per MoE layer), same model, steps and data.

Runs each config to completion in one process, one after another, then prints a
markdown table and writes JSON + PNG. Each run keeps its workdir (metrics,
checkpoints, plots) under --out; a rerun resumes or skips finished runs.

  python experiments/mnist1d_experts.py          # seed 0, all runs, plots (~45 min on 2 CPU cores)
  python experiments/mnist1d_experts.py --steps 200 --runs dense,adaptive   # quick look
  python experiments/mnist1d_experts.py --runs dense,dynmoe_e2,dynmoe_e4,dynmoe_e8,adaptive \
      --seeds 0,1,2                                # the docs/results.md table (seeds 1, 2: ~1.5 h more)
  python experiments/mnist1d_experts.py --runs default_job,dense_w96 --seeds 0,1,2 \
      --results_name results_default_job.json      # the default job vs dense at its width
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

import common
from dynmoe_jax import plots, train
from dynmoe_jax.default_config import mnist1d_config

ROOT = common.ROOT


def run_configs(steps: int, adaptive_every: int, seed: int = 0):
  def dynmoe(num_experts, losses='2025'):
    """Top-any with the reference's 2025 losses (the default) or the paper's 2024 ones."""
    c = mnist1d_config('top_any')
    c.model.moe.num_experts = num_experts
    if losses == '2024':
      c.model.moe.top_any.load_balance_weight = c.model.moe.top_any.efficiency_weight = 0.0
    return c

  dense = mnist1d_config()
  dense.model.moe_layers = 'none'
  adaptive = dynmoe(2)
  adaptive.adaptive.enabled = True
  adaptive.adaptive.every = adaptive_every
  adaptive.adaptive.record_steps = max(1, adaptive_every // 5)
  adaptive.adaptive.compile_lead_steps = adaptive_every // 5
  adaptive.adaptive.min_experts = 1
  adaptive.adaptive.max_experts = 16
  # 8 experts with capacity sized for 4 active experts per token instead of k=2
  e8_k4 = dynmoe(8)
  e8_k4.model.moe.top_any.expected_k = 4.0
  # the budget's first controller (ReMoE's rule: one budget_rate step per update), as the
  # docs/results.md's table measured it
  budget = common.apply_overrides(dynmoe(4), common.FIRST_BUDGET_CONTROLLER)
  budget.budget.target_experts_per_token = 1.5
  budget_two_sided = common.apply_overrides(dynmoe(4), common.FIRST_BUDGET_CONTROLLER)
  budget_two_sided.budget.target_experts_per_token = 1.5
  budget_two_sided.budget.two_sided = True
  # the default job with the top-1 fallback in training / with the reference's learned
  # temperature (gated_multi_gate_t: 10, learned in log space, capped at 100)
  fallback = dynmoe(4)
  fallback.model.moe.top_any.train_fallback = True
  learned_scale = dynmoe(4)
  learned_scale.model.moe.top_any.learned_scale = True
  learned_scale.model.moe.top_any.scale = 10.0
  # dynmoe_e4 is the default job's router and experts at the shared width 64; default_job is
  # configs/mnist1d_dynmoe.py itself (width 96) and dense_w96 the dense model at its width.
  # _2024_losses drops the reference's load balance and efficiency terms, as in the paper
  default_job = common.load_config('mnist1d_dynmoe')
  dense_w96 = mnist1d_config()
  dense_w96.model.moe_layers = 'none'
  for key in ('dim', 'mlp_dim'):
    setattr(dense_w96.model, key, getattr(default_job.model, key))
  configs = {'dense': dense, 'dynmoe_e2': dynmoe(2), 'dynmoe_e4': dynmoe(4),
             'dynmoe_e4_2024_losses': dynmoe(4, losses='2024'), 'dynmoe_e4_budget1.5': budget,
             'dynmoe_e4_budget1.5_two_sided': budget_two_sided,
             'dynmoe_e4_fallback': fallback, 'dynmoe_e4_learned_scale': learned_scale,
             'dynmoe_e8': dynmoe(8), 'dynmoe_e8_k4': e8_k4, 'adaptive': adaptive,
             'default_job': default_job, 'dense_w96': dense_w96}
  for c in configs.values():
    c.num_train_steps = steps
    c.seed = seed
    c.progress_bar = False
  return configs


def summarize(name: str, workdir: str):
  summary = common.run_summary(workdir)
  train_rows = [r for r in plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
                if r['split'] == 'train']
  layers = list(summary['active_experts'])
  return {
      'name': name, 'accuracy': summary['value'], 'active_experts': summary['active_experts'],
      'final_experts': summary['final_experts'],
      'steps_per_sec': float(np.median([r['steps_per_sec'] for r in train_rows[1:] or train_rows])),
      'adaptation_seconds': [e['seconds'] for e in summary['adaptations'][::max(1, len(layers))]],
      'adaptations': summary['adaptations'],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--adaptive_every', type=int, default=500)
  parser.add_argument('--runs',
                      default='dense,dynmoe_e2,dynmoe_e4,dynmoe_e8,dynmoe_e8_k4,adaptive')
  parser.add_argument('--seeds', default='0', help='comma-separated; seed 0 runs keep '
                      'their old workdir names, others get a _seed<N> suffix')
  parser.add_argument('--out', default=common.scratch_out('mnist1d_experts'),
                      help=common.OUT_HELP)
  parser.add_argument('--results_name', default=None,
                      help='JSON file name under --out (default: results.json for seed 0 '
                      'alone, results_seeds.json for several)')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  results, by_seed = [], {}
  for seed in seeds:
    configs = run_configs(args.steps, args.adaptive_every, seed)
    for name in args.runs.split(','):
      workdir = os.path.join(args.out, 'runs', name + (f'_seed{seed}' if seed else ''))
      print(f'== {name} seed {seed}', flush=True)
      train.Trainer(configs[name], workdir).run()
      summary = summarize(name, workdir)
      summary['seed'] = seed
      by_seed.setdefault(name, []).append(summary)
      if seed == seeds[0]:
        results.append(summary)
      print(json.dumps({k: v for k, v in summary.items() if k != 'adaptations'}), flush=True)

  out_name = args.results_name or ('results.json' if seeds == [0] else 'results_seeds.json')
  with open(os.path.join(args.out, out_name), 'w') as f:
    json.dump({'steps': args.steps, 'seeds': seeds, 'results': results,
               'by_seed': by_seed}, f, indent=2)
  if len(seeds) > 1:
    print(f'\n| run | test accuracy, seeds {args.seeds} | mean ± std | eval experts / token '
          '(mean of MoE layers), per seed |')
    print('|---|---|---|---|')
    for name, runs in by_seed.items():
      accs = 100 * np.array([r['accuracy'] for r in runs])
      active = [np.mean(list(r['active_experts'].values())) if r['active_experts'] else 0.0
                for r in runs]
      print(f"| {name} | {', '.join(f'{a:.1f}' for a in accs)} | "
            f'{accs.mean():.2f} ± {accs.std(ddof=1):.2f} | '
            f"{', '.join(f'{a:.2f}' for a in active)} |")
    return
  print('\n| run | test accuracy | active experts / token (per MoE layer) | experts per layer '
        '(final) | train steps/s |')
  print('|---|---|---|---|---|')
  for r in results:
    active = ', '.join(f'{v:.2f}' for v in r['active_experts'].values()) or '-'
    final = ', '.join(str(v) for v in r['final_experts'].values()) or '-'
    print(f"| {r['name']} | {100 * r['accuracy']:.1f}% | {active} | {final} | "
          f"{r['steps_per_sec']:.2f} |")
  adaptive = next((r for r in results if r['name'] == 'adaptive'), None)
  if adaptive and adaptive['adaptation_seconds']:
    per_step = 1.0 / adaptive['steps_per_sec']
    worst = max(adaptive['adaptation_seconds'])
    print(f'\nadaptive run paused at a boundary (plan + reallocate + any wait for the '
          f'compile-ahead thread): worst {worst:.2f}s = {worst / per_step:.1f} of its train '
          'steps (the full cost on an idle machine: experiments/adaptation_cost.py)')
    src = os.path.join(args.out, 'runs', 'adaptive', 'plots', 'experts_per_layer.png')
    if os.path.exists(src):
      shutil.copy(src, os.path.join(args.out, 'adaptive_experts_per_layer.png'))
  plot(results, os.path.join(args.out, 'accuracy_vs_experts.png'))


def plot(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results:
    active = float(np.mean(list(r['active_experts'].values()))) if r['active_experts'] else 0.0
    ax.scatter(active, 100 * r['accuracy'], s=40)
    ax.annotate(r['name'], (active, 100 * r['accuracy']), fontsize=8, xytext=(4, 4),
                textcoords='offset points')
  ax.set_xlabel('mean active experts per token (MoE layers; dense = 0)')
  ax.set_ylabel('MNIST-1D test accuracy (%)')
  ax.set_title('MNIST-1D, same model/steps/data')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
