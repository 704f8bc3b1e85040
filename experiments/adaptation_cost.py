"""What one adaptive-experts boundary costs, in train steps of the default config.

Measured in one process, one after the other, on an otherwise idle machine:
  1. the default job's (configs/mnist1d_dynmoe.py, 8 experts per MoE block) train step:
     median of `--rounds` rounds of `--steps` steps;
  2. the default job started from 2 experts with adaptive experts on, boundaries every
     `--every` steps: each boundary's plan + reallocate and recompile seconds, as the
     trainer logs them in adaptation.jsonl;
  3. what the recompile is made of: `Trainer._compile` of the default model with dense
     FFNs, with top-k, and with top-any (the default), each timed once.

  python experiments/adaptation_cost.py        # ~3 minutes on 2 CPU cores (idle)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dynmoe_jax import plots, sharding, train  # noqa: E402
from dynmoe_jax.default_config import mnist1d_config  # noqa: E402


def default_step_seconds(workdir: str, rounds: int, steps: int) -> float:
  config = mnist1d_config('top_any')
  config.progress_bar = False
  trainer = train.Trainer(config, workdir)
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    state = trainer.restore_or_init()
    batch = trainer._device_batch(trainer.stream.batch(0))
    times = []
    for round_index in range(rounds + 1):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics, _ = trainer.compiled.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      if round_index:  # round 0 warms up
        times.append((time.perf_counter() - start) / steps)
  trainer.checkpointer.close()
  return float(np.median(times))


def compile_seconds(workdir: str) -> dict:
  """Seconds to build and ahead-of-time compile the train step, per model variant."""
  from dynmoe_jax import config_lib
  variants = {'dense FFNs': {'moe_layers': 'none'}, 'top-k (k=2)': {'router': 'top_k'},
              'top-any (default)': {}}
  out = {}
  for name, edit in variants.items():
    config = mnist1d_config('top_any')
    config.progress_bar = False
    if 'moe_layers' in edit:
      config.model.moe_layers = edit['moe_layers']
    if 'router' in edit:
      config.model.moe.router = edit['router']
    trainer = train.Trainer(config, os.path.join(workdir, name.split()[0]))
    start = time.perf_counter()
    trainer._compile(config_lib.experts_layout(config))
    out[name] = time.perf_counter() - start
    trainer.checkpointer.close()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--every', type=int, default=30)
  parser.add_argument('--boundaries', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results',
                                                     'adaptation_cost'))
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    step_seconds = default_step_seconds(os.path.join(tmp, 'default'), args.rounds, args.steps)
    config = mnist1d_config('top_any')
    config.progress_bar = False
    config.model.moe.num_experts = 2
    config.num_train_steps = args.every * (args.boundaries + 1)
    config.eval_every = config.checkpoint_every = config.num_train_steps
    config.adaptive.enabled = True
    config.adaptive.every = args.every
    config.adaptive.record_steps = args.every // 2
    workdir = os.path.join(tmp, 'adaptive')
    result = train.Trainer(config, workdir).run()
    events = plots.read_jsonl(os.path.join(workdir, 'adaptation.jsonl'))
    variants = compile_seconds(os.path.join(tmp, 'variants'))
  boundaries = {}
  for e in events:  # one row per resized layer; the timings are per boundary
    boundaries.setdefault(e['step'], e)
  rows = [{'step': step, 'seconds': e['seconds'], 'recompile_seconds': e['recompile_seconds'],
           'in_default_steps': e['seconds'] / step_seconds}
          for step, e in sorted(boundaries.items())]
  print(f'default config train step: {1e3 * step_seconds:.0f} ms (median of {args.rounds} '
        f'rounds of {args.steps})')
  print('| boundary step | adaptation s | of which recompile s | in default train steps |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['step']} | {r['seconds']:.2f} | {r['recompile_seconds']:.2f} | "
          f"{r['in_default_steps']:.1f} |")
  print('\n| model (default job) | train step compile s | in default train steps |')
  print('|---|---|---|')
  for name, seconds in variants.items():
    print(f'| {name} | {seconds:.2f} | {seconds / step_seconds:.1f} |')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'default_step_seconds': step_seconds, 'boundaries': rows,
               'compile_seconds': variants,
               'final_experts_per_layer': result['experts_per_layer'],
               'devices': str(jax.devices())}, f, indent=1)
  plot(rows, step_seconds, os.path.join(args.out, 'adaptation_cost.png'))
  return rows


def plot(rows, step_seconds, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  steps = [str(r['step']) for r in rows]
  recompile = [r['recompile_seconds'] / step_seconds for r in rows]
  rest = [(r['seconds'] - r['recompile_seconds']) / step_seconds for r in rows]
  ax.bar(steps, rest, label='plan + reallocate')
  ax.bar(steps, recompile, bottom=rest, label='recompile')
  ax.axhline(50, color='red', linestyle='--', label='target: 50 steps')
  ax.set_xlabel('boundary step')
  ax.set_ylabel('cost in default-config train steps')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
