"""The default LM (configs/lm_small.py, top-p) beside the same decoder with top-any and a
budget of 1.5 experts per token, without and with the top-1 fallback in training (and with
the budget's updates scaled with its error, then also predicted ahead, then two-sided):
final test bits/byte, experts per token, training-time unrouted tokens, throughput, wall
time. Each variant trains into OUT/runs/<variant> (a finished run, one with summary.json,
is only summarised), then a table, JSON and a PNG of the training curves are written.

  python experiments/lm_small.py            # ~80 minutes on a 2-core CPU, runs one at a time
  python experiments/lm_small.py --variants top_p,top_any_fallback   # a subset: the table,
      JSON and plot then hold these; every run's summary stays in OUT/runs/<variant>/
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict

import numpy as np

import common
from dynmoe_jax import names, plots, train

# top-any at a budget of 1.5, with the top-1 fallback in training (routing.top_any)
FALLBACK_BUDGET = {'model.moe.router': 'top_any', 'budget.target_experts_per_token': 1.5,
                   'model.moe.top_any.train_fallback': True}
VARIANTS = {
    'top_p (lm_small)': {},
    'top_any, budget 1.5': {'model.moe.router': 'top_any',
                            'budget.target_experts_per_token': 1.5,
                            **common.FIRST_BUDGET_CONTROLLER},
    # the same with the fallback: can the layers die?
    'top_any_fallback, budget 1.5': {**FALLBACK_BUDGET, **common.FIRST_BUDGET_CONTROLLER},
    # and the budget's updates scaled with its error (budget_error_unit)
    'top_any_fallback_p, budget 1.5': {**FALLBACK_BUDGET, 'budget.error_unit': 0.1,
                                       'budget.horizon': None},
    # and on the count predicted 20 steps ahead: the default controller
    'top_any_fallback_h, budget 1.5': {**FALLBACK_BUDGET, 'budget.error_unit': 0.1,
                                       'budget.horizon': 20.0},
    # and two-sided: below the target at the weight's floor, the price becomes a subsidy
    'top_any_fallback_h2s, budget 1.5': {**FALLBACK_BUDGET, 'budget.error_unit': 0.1,
                                         'budget.horizon': 20.0,
                                         'budget.two_sided': True},
}


def variant_key(variant: str) -> str:
  """A variant's first word: its run directory and its name for --variants."""
  return variant.split(' ')[0].strip(',')


def run_dir(args, variant: str) -> str:
  return os.path.join(args.out, 'runs', variant_key(variant))


def summarize(workdir: str, wall_seconds: float) -> Dict[str, Any]:
  rows = plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_rows = [r for r in rows if r['split'] == 'train']
  final = [r for r in rows if r['split'] == 'eval'][-1]
  layers = names.moe_layers_in([final])
  key = names.metric_key
  late = train_rows[len(train_rows) // 2:]
  return {
      'bits_per_byte': final['bits_per_byte'],
      'eval_active_experts': {l: final[key(l, 'active_experts')] for l in layers},
      'eval_dropped_fraction': {l: final[key(l, 'dropped_fraction')] for l in layers},
      'train_unrouted_fraction_end': {l: train_rows[-1][key(l, 'unrouted_fraction')]
                                      for l in layers},
      'train_capacity_end': {l: train_rows[-1][key(l, 'capacity')] for l in layers},
      'tokens_per_sec': float(np.median([r['tokens_per_sec'] for r in late])),
      'mfu': float(np.median([r['mfu'] for r in late])),
      # Training steps' own time (windows between rows), then the whole process's.
      'train_seconds': float(sum((b['step'] - a['step']) / b['steps_per_sec']
                                 for a, b in zip([{'step': 0}] + train_rows, train_rows))),
      'wall_seconds': wall_seconds,
      'curves': {'step': [r['step'] for r in train_rows],
                 'loss': [r['loss'] for r in train_rows],
                 'unrouted': [float(np.mean([r[key(l, 'unrouted_fraction')] for l in layers]))
                              for r in train_rows]},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=common.scratch_out('lm_small'),
                      help=common.OUT_HELP)
  parser.add_argument('--num_train_steps', type=int, default=None,
                      help="the config's when unset; fewer for a smoke run")
  parser.add_argument('--eval_split', default=None,
                      help="the config's when unset (test[:2048]); a slice for a smoke run")
  parser.add_argument('--variants', default=','.join(map(variant_key, VARIANTS)),
                      help='comma-separated first words of the variants to run and tabulate')
  args = parser.parse_args(argv)
  wanted = args.variants.split(',')
  unknown = sorted(set(wanted) - set(map(variant_key, VARIANTS)))
  if unknown:
    parser.error(f'unknown variants {unknown}')
  results = {}
  for variant, overrides in VARIANTS.items():
    if variant_key(variant) not in wanted:
      continue
    workdir = run_dir(args, variant)
    summary_path = os.path.join(workdir, 'summary.json')
    if not os.path.exists(summary_path):
      config = common.apply_overrides(common.load_config('lm_small'), overrides)
      config.progress_bar = False
      if args.num_train_steps:
        config.num_train_steps = config.eval_every = args.num_train_steps
        config.checkpoint_every = config.log_every = args.num_train_steps
        config.adaptive.capacity = False
      if args.eval_split:
        config.data.eval_split = args.eval_split
      start = time.perf_counter()
      train.Trainer(config, workdir).run()
      common.save_json(summary_path, summarize(workdir, time.perf_counter() - start))
    with open(summary_path) as f:
      results[variant] = json.load(f)
  lines = ['| lm_small variant | test bits/byte | eval experts / token (blocks 1, 3) | train '
           'tokens no threshold or top-p chose at the end | eval pairs dropped | tokens/s | MFU | wall '
           'minutes |', '|---|---|---|---|---|---|---|---|']
  for variant, r in results.items():
    fmt = lambda d, pct=False: ', '.join(f'{100 * v:.0f}%' if pct else f'{v:.2f}'
                                         for v in d.values())
    lines.append(f"| {variant} | {r['bits_per_byte']:.3f} | {fmt(r['eval_active_experts'])} | "
                 f"{fmt(r['train_unrouted_fraction_end'], True)} | "
                 f"{fmt(r['eval_dropped_fraction'], True)} | {r['tokens_per_sec']:.0f} | "
                 f"{100 * r['mfu']:.1f}% | {r['wall_seconds'] / 60:.1f} |")
  table = '\n'.join(lines)
  print(table)
  common.save_json(os.path.join(args.out, 'results.json'), results)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table + '\n')

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (loss_ax, unrouted_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for variant, r in results.items():
    loss_ax.plot(r['curves']['step'], r['curves']['loss'], label=variant)
    unrouted_ax.plot(r['curves']['step'], r['curves']['unrouted'], label=variant)
  loss_ax.set_xlabel('step')
  loss_ax.set_ylabel('train loss (nats/byte + aux)')
  unrouted_ax.set_xlabel('step')
  unrouted_ax.set_ylabel('training tokens with no expert (mean of MoE blocks)')
  for ax in (loss_ax, unrouted_ax):
    ax.legend(fontsize=8)
  print('wrote', plots.save_figure(fig, os.path.join(args.out, 'lm_small.png'), dpi=120))


if __name__ == '__main__':
  main()
