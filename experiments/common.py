"""What every experiment script shares: loading configs, dotted overrides, run
summaries from a workdir, side-by-side step timing, and restoring a finished run
for analysis through the trainer's public API.

Scripts run as `python experiments/<name>.py`; Python puts this directory first on
sys.path, so `import common` finds this file and nothing edits sys.path.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping

import flax.linen as nn
import jax
import numpy as np

from dynmoe_jax import config_lib, names, plots, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_HELP = ('where the table JSON, plots and runs go (default: %(default)s, a scratch folder; '
            'the committed figures are regenerated with --out experiments/results/...)')


def scratch_out(name: str) -> str:
  """An experiment's default output: never the committed experiments/results/."""
  return os.path.join(ROOT, 'workdir', 'experiments', name)


def load_config(name: str, *args):
  """`get_config(*args)` of configs/<name>.py (or of a path), as --config loads it."""
  path = name if name.endswith('.py') else os.path.join(ROOT, 'configs', f'{name}.py')
  return config_lib.load_config_file(path, *args)


def apply_overrides(config, overrides: Mapping[str, Any]):
  for dotted, value in overrides.items():
    config_lib.set_field(config, dotted, value)
  return config


# The compute budget's first controller (ReMoE's rule, one budget_rate step per update),
# which the earlier budget figures of docs/results.md were measured with; the default is newer.
FIRST_BUDGET_CONTROLLER = {'budget.error_unit': None,
                           'budget.horizon': None}


# ----------------------------------------------------------------------------- runs


def run_in_process(argv: List[str], workdir: str, what: str) -> Dict[str, Any]:
  """Run `python *argv` (a script that trains into `workdir` and writes its
  summary.json) in its own process, its output in `<workdir>.log`; that summary. One
  JAX process keeps about 1.5 of 2 CPU cores busy on these models, so scripts run two."""
  import json
  import subprocess
  import sys
  log_path = workdir + '.log'
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'w') as log_file:
    code = subprocess.call([sys.executable, *argv], stdout=log_file, stderr=subprocess.STDOUT)
  if code:
    raise RuntimeError(f'{what} failed (exit {code}); see {log_path}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- summaries


def run_summary(workdir: str) -> Dict[str, Any]:
  """The final eval row of a finished run, its MoE layers' eval figures, the expert
  counts it ended with, and its training-time drops, slots per expert and computed
  expert FLOPs per token (mean of the last fifth of rows)."""
  rows = plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train_rows = [r for r in rows if r['split'] == 'train']
  final_eval = [r for r in rows if r['split'] == 'eval'][-1]
  layers = names.moe_layers_in([final_eval])
  last_fifth = train_rows[-max(1, len(train_rows) // 5):]
  metric = 'accuracy' if 'accuracy' in final_eval else 'bits_per_byte'
  active = {l: final_eval[names.metric_key(l, 'active_experts')] for l in layers}
  key = lambda layer, name: names.metric_key(layer, name)
  late = lambda name: {l: float(np.mean([r[key(l, name)] for r in last_fifth])) for l in layers}
  return {
      'metric': metric, 'value': final_eval[metric], 'eval_loss': final_eval['loss'],
      'active_experts': active,
      'mean_active_experts': float(np.mean(list(active.values()))) if active else None,
      'final_experts': {l: len(train_rows[-1][key(l, 'expert_load')]) for l in layers},
      'train_dropped_fraction': {l: float(np.mean([r[key(l, 'dropped_fraction')]
                                                   for r in last_fifth])) for l in layers},
      'eval_dropped_fraction': {l: final_eval[key(l, 'dropped_fraction')] for l in layers},
      # Forward expert-FFN FLOPs per token, summed over MoE layers: what the routed pairs
      # need (eval) and what the training step computes (slots, padding included).
      'activated_flops_per_token': float(sum(
          final_eval[key(l, 'activated_flops_per_token')] for l in layers)),
      'train_computed_flops_per_token': float(sum(late('computed_flops_per_token').values())),
      'train_capacity': late('capacity'),
      'train_slot_utilization': late('slot_utilization'),
      'adaptations': plots.read_jsonl(os.path.join(workdir, 'adaptation.jsonl')),
      'load_ratio_last_100_steps': load_ratio(train_rows, layers, 100),
  }


def load_ratio(train_rows, layers, steps: int) -> Dict[str, float]:
  """Per MoE layer, max / min of the experts' mean load over the last `steps` steps (the
  train rows' windows ending there; loads are shares of routed pairs), counting only the
  rows of the expert count the run ended with (adaptive experts change it at boundaries)."""
  last = train_rows[-1]['step'] - steps
  window = [r for r in train_rows if r['step'] > last] or train_rows[-1:]
  out = {}
  for layer in layers:
    loads = [r[names.metric_key(layer, 'expert_load')] for r in window]
    load = np.mean([l for l in loads if len(l) == len(loads[-1])], axis=0)
    out[layer] = float(load.max() / max(load.min(), 1e-6))
  return out


def mean_std(values):
  """(mean, sample std) of the values that are not None; (None, None) if none are."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  if not values.size:
    return None, None
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


# ----------------------------------------------------------------------------- restoring


@contextlib.contextmanager
def mesh_of(trainer: train.Trainer) -> Iterator[None]:
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    yield


def restored(config, workdir: str):
  """(trainer, train state) of a run's newest checkpoint (a fresh state if it has none);
  nothing is written to the workdir. `trainer.compiled` holds the model and steps."""
  trainer = train.Trainer(config, workdir)
  with mesh_of(trainer):
    state = trainer.restore_or_init()
  trainer.close()
  return trainer, state


# ----------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any], reps: int):
  """(median seconds of `reps` calls, seconds of the first call (compile + warm-up), the
  last call's output) of `fn`, each call blocked until its arrays are ready."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), first, out


def interleaved_seconds(steppers: Mapping[str, Callable[[], Any]], rounds: int
                        ) -> Dict[str, float]:
  """Median seconds of each stepper (a callable that runs its work and blocks until it
  is done), timed in `rounds` rounds that visit every stepper in turn, so that machine
  load affects each alike. A first, untimed round warms up."""
  seconds: Dict[str, List[float]] = {name: [] for name in steppers}
  for round_index in range(rounds + 1):
    for name, run in steppers.items():
      start = time.perf_counter()
      run()
      if round_index:
        seconds[name].append(time.perf_counter() - start)
  return {name: float(np.median(s)) for name, s in seconds.items()}


def train_stepper(trainer: train.Trainer, state, steps: int, batch_step: int = 0
                  ) -> Callable[[], None]:
  """A stepper for `interleaved_seconds`: `steps` train steps of the trainer's compiled
  step on one batch, carrying the state from call to call."""
  batch = trainer.device_batch(trainer.stream.batch(batch_step))
  holder = [state]

  def run():
    with mesh_of(trainer):
      state, metrics = holder[0], None
      for _ in range(steps):
        state, metrics, _ = trainer.compiled.train_step(state, batch)
      jax.block_until_ready((state, metrics))
      holder[0] = state
  return run


def steps_per_second(seconds: Mapping[str, float], steps: int) -> Dict[str, float]:
  return {name: steps / s for name, s in seconds.items()}


def save_json(path: str, data: Any):
  import json
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f, indent=1, default=float)

