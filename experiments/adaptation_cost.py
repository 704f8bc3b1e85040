"""What one adaptive-experts boundary costs, in train steps of the default config.

Measured in one process, one after the other, on an otherwise idle machine:
  1. the default job's (configs/mnist1d_dynmoe.py: 4 experts per MoE block) train step:
     median of `--rounds` rounds of `--steps` steps;
  2. the default job started from 2 experts with adaptive experts on, boundaries every
     `--every` steps, run once per `--leads` value: 0 compiles each new layout at its
     boundary (training waits), N > 0 compiles it on a thread while the last N steps
     before the boundary train. A boundary costs the time training was paused there (plan
     + reallocate + any wait for the compiler, from adaptation.jsonl) plus how much slower
     the lead steps ran while the compiler shared the CPU: the sum over those steps of
     (step time - the median step time of the same layout's steps outside any window);
  3. what a compile is made of: `Trainer.compile` of the default model with dense
     FFNs, with top-k, and with top-any (the default), each timed once.

`--spare_core` measures a host where the compiler has a core of its own: training (the
main thread and XLA's intra-op pool, sized at start-up to the one CPU the process may use)
is pinned to CPU 0 and every other thread (XLA's compile threads, the compile-ahead
thread) to CPU 1. Linux only; train steps are then slower, and costs are counted in
steps of that pinned training.

  python experiments/adaptation_cost.py                 # ~6 minutes on 2 CPU cores (idle)
  python experiments/adaptation_cost.py --spare_core --out experiments/results/adaptation_cost_spare_core
  python experiments/adaptation_cost.py --spare_core --leads 150 --every 200 \
      --out experiments/results/adaptation_cost_spare_core_lead150
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

# Before jax starts: XLA sizes its intra-op thread pool from the CPUs this process may use.
if __name__ == '__main__' and '--spare_core' in sys.argv:
  os.sched_setaffinity(0, {0})

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from dynmoe_jax import plots, train  # noqa: E402


def default_config():
  config = common.load_config('mnist1d_dynmoe')
  config.progress_bar = False
  return config


class CompilerToSpareCore:
  """Moves every thread but training's (the main thread, XLA's intra-op pool) to CPU 1,
  checking for new threads whenever it is called (once per step)."""

  def __init__(self):
    self.training = {threading.get_native_id()}
    self.seen = set()

  def __call__(self, *_):
    for name in os.listdir('/proc/self/task'):
      tid = int(name)
      if tid in self.seen or tid in self.training:
        continue
      self.seen.add(tid)
      try:
        with open(f'/proc/self/task/{tid}/comm') as f:
          if f.read().strip().startswith('tf_XLAEigen'):
            continue
        os.sched_setaffinity(tid, {1})
      except OSError:  # the thread ended
        pass


def default_step_seconds(workdir: str, rounds: int, steps: int) -> float:
  trainer, state = common.restored(default_config(), workdir)
  stepper = common.train_stepper(trainer, state, steps)
  return common.interleaved_seconds({'default': stepper}, rounds)['default'] / steps


def compile_seconds(workdir: str) -> dict:
  """Seconds to build and ahead-of-time compile the train step, per model variant."""
  from dynmoe_jax import config_lib
  variants = {'dense FFNs': {'moe_layers': 'none'}, 'top-k (k=2)': {'router': 'top_k'},
              'top-any (default)': {}}
  out = {}
  for name, edit in variants.items():
    config = default_config()
    if 'moe_layers' in edit:
      config.model.moe_layers = edit['moe_layers']
    if 'router' in edit:
      config.model.moe.router = edit['router']
    trainer = train.Trainer(config, os.path.join(workdir, name.split()[0]))
    out[name] = trainer.compile(config_lib.experts_layout(config)).seconds
    trainer.close()
  return out


def adaptive_run(workdir: str, every: int, record_steps: int, lead: int,
                 boundaries: int, on_step=None) -> dict:
  """Train the default job from 2 experts; per boundary: seconds paused there and seconds
  lost to the lead steps' slowdown, from per-step wall times."""
  config = default_config()
  config.model.moe.num_experts = 2
  config.num_train_steps = every * (boundaries + 1)
  config.eval_every = config.checkpoint_every = config.num_train_steps
  config.adaptive.enabled = True
  config.adaptive.every = every
  config.adaptive.record_steps = record_steps
  config.adaptive.compile_lead_steps = lead
  ends = {}  # step -> wall time when it had finished (the trainer syncs every step)

  def record_end(state, step):
    ends[step] = time.perf_counter()
    if on_step is not None:
      on_step(state, step)
  trainer = train.Trainer(config, workdir, on_step=record_end)
  result = trainer.run()
  seconds = {s: ends[s] - ends[s - 1] for s in ends if s - 1 in ends}
  events = plots.read_jsonl(os.path.join(workdir, 'adaptation.jsonl'))
  by_step = {}
  for e in events:  # one row per resized layer; the timings are per boundary
    by_step.setdefault(e['step'], e)
  rows = []
  for boundary, e in sorted(by_step.items()):
    interval_start = boundary - every
    window_start = boundary - lead - record_steps
    # Steps of the same layout that are neither recorded, nor compiling, nor a boundary.
    clean = [seconds[s] for s in range(interval_start + 2, window_start + 1) if s in seconds]
    lead_steps = [seconds[s] for s in range(boundary - lead + 1, boundary) if s in seconds]
    baseline = float(np.median(clean))
    slowdown = float(sum(t - baseline for t in lead_steps))
    rows.append({'step': boundary, 'lead_steps': lead, 'paused_seconds': e['seconds'],
                 'plan_seconds': e['plan_seconds'],
                 'compile_wait_seconds': e['compile_wait_seconds'],
                 'compile_seconds': e['recompile_seconds'],
                 'lead_slowdown_seconds': slowdown, 'step_seconds_outside_windows': baseline,
                 'total_seconds': e['seconds'] + slowdown,
                 'experts_after': {x['layer']: x['experts_after'] for x in events
                                   if x['step'] == boundary}})
  return {'rows': rows, 'final_experts_per_layer': result['experts_per_layer']}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--every', type=int, default=160)
  parser.add_argument('--record_steps', type=int, default=20)
  parser.add_argument('--leads', default='0,100',
                      help='adaptive.compile_lead_steps of each run; 0 compiles at the '
                           "boundary, 100 is the default config's value")
  parser.add_argument('--boundaries', type=int, default=3)
  parser.add_argument('--spare_core', action='store_true',
                      help='training on CPU 0, the compiler on CPU 1 (see the module doc)')
  parser.add_argument('--out', default=common.scratch_out('adaptation_cost'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  if args.spare_core and (os.sched_getaffinity(0) != {0} or (os.cpu_count() or 1) < 2):
    parser.error('--spare_core needs 2 CPUs and pins the process before jax starts: run '
                 'the script directly')
  os.makedirs(args.out, exist_ok=True)
  on_step = CompilerToSpareCore() if args.spare_core else None
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    step_seconds = default_step_seconds(os.path.join(tmp, 'default'), args.rounds, args.steps)
    for lead in [int(x) for x in args.leads.split(',')]:
      mode = f'{lead} steps ahead' if lead else 'at boundary'
      runs[mode] = adaptive_run(os.path.join(tmp, f'lead{lead}'), args.every,
                                args.record_steps, lead, args.boundaries, on_step)
    variants = compile_seconds(os.path.join(tmp, 'variants'))
  print(f'default config train step: {1e3 * step_seconds:.0f} ms (median of {args.rounds} '
        f'rounds of {args.steps})' + (', training on CPU 0, compiler on CPU 1'
                                      if args.spare_core else ''))
  print('| compile | boundary step | paused s (of which waiting for compiler) | lead-step '
        'slowdown s | compile s | total s | in default train steps |')
  print('|---|---|---|---|---|---|---|')
  for mode, run in runs.items():
    for r in run['rows']:
      r['in_default_steps'] = r['total_seconds'] / step_seconds
      print(f"| {mode} | {r['step']} | {r['paused_seconds']:.2f} "
            f"({r['compile_wait_seconds']:.2f}) | {r['lead_slowdown_seconds']:.2f} | "
            f"{r['compile_seconds']:.2f} | {r['total_seconds']:.2f} | "
            f"{r['in_default_steps']:.1f} |")
  print('\n| model (default job) | train + eval step compile s | in default train steps |')
  print('|---|---|---|')
  for name, seconds in variants.items():
    print(f'| {name} | {seconds:.2f} | {seconds / step_seconds:.1f} |')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'default_step_seconds': step_seconds, 'args': vars(args), 'runs': runs,
               'compile_seconds': variants, 'devices': str(jax.devices())}, f, indent=1)
  plot(runs, step_seconds, os.path.join(args.out, 'adaptation_cost.png'),
       'training on CPU 0, compiler on CPU 1' if args.spare_core
       else 'training and compiler share the 2 cores')
  return runs


def plot(runs, step_seconds, path, title=''):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4.5))
  width = 0.8 / len(runs)
  for i, (mode, run) in enumerate(runs.items()):
    x = np.arange(len(run['rows'])) + i * width
    paused = [r['paused_seconds'] / step_seconds for r in run['rows']]
    slowdown = [max(r['lead_slowdown_seconds'], 0.0) / step_seconds for r in run['rows']]
    ax.bar(x, paused, width, label=f'compile {mode}: training paused', color=f'C{2 * i}')
    ax.bar(x, slowdown, width, bottom=paused, label=f'compile {mode}: lead steps slower',
           color=f'C{2 * i + 1}')
  labels = [str(r['step']) for r in next(iter(runs.values()))['rows']]
  ax.set_xticks(np.arange(len(labels)) + width * (len(runs) - 1) / 2, labels)
  ax.axhline(50, color='red', linestyle='--', label='target: 50 steps')
  ax.set_xlabel('boundary')
  ax.set_ylabel('cost in default-config train steps')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.18), ncol=2)
  plots.save_figure(fig, path, dpi=120)


if __name__ == '__main__':
  main()
