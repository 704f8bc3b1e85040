"""Metric rows: aggregation of a window of steps, and writing to metrics.jsonl and
TensorBoard. Only process 0 writes."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from dynmoe_jax import names, plots
from dynmoe_jax.train import steps

log = logging.getLogger('dynmoe_jax')
LOG_FILES = ('metrics.jsonl', 'adaptation.jsonl', 'compiled_cost.jsonl')


def train_row(step: int, window: List[Mapping[str, Any]], seconds: float, task: str
              ) -> Dict[str, Any]:
  """One 'train' row from the metrics of the steps since the last row."""
  host = jax.device_get(window)
  sums = {k: float(sum(m[k] for m in host)) for k in ('loss_sum', 'count') + (
      ('correct_sum',) if 'correct_sum' in host[0] else ())}
  row = {'split': 'train', 'step': step, **steps.summarize_sums(sums, task)}
  row['loss'] = float(np.mean([m['loss'] for m in host]))
  for key in host[0]:
    if names.split_metric_key(key) or key in ('task_loss', 'aux_loss', 'grad_norm'):
      row[key] = np.mean([m[key] for m in host], axis=0).tolist()
  for key in [k for k in row if k.endswith('/expert_load')]:
    # max/min load over the window (a dead expert: its floor 1e-6 gives 1e6)
    load = np.asarray(row[key])
    row[key[:-len('expert_load')] + 'load_ratio'] = float(load.max() / max(load.min(), 1e-6))
  row['learning_rate'] = float(host[-1]['learning_rate'])
  row['skipped_steps'] = int(sum(m['skipped'] for m in host))
  row['steps_per_sec'] = len(window) / max(seconds, 1e-9)
  return row


def warn_dropped(row: Mapping[str, Any], layout: Sequence[int], level: float):
  for layer in names.moe_layer_names(layout):
    dropped = row.get(names.metric_key(layer, 'dropped_fraction'), 0.0)
    if dropped > level:
      log.warning('step %d: %s dropped %.1f%% of routed pairs for capacity (warning level '
                  '%.0f%%); raise model.moe.capacity.factor', row['step'], layer, 100 * dropped,
                  100 * level)


class MetricsLog:
  """metrics.jsonl + TensorBoard of one run."""

  def __init__(self, workdir: str, is_main: bool):
    self.workdir = workdir
    self.is_main = is_main
    self.tb = None

  def open(self, purge_step: Optional[int] = None):
    """purge_step: TensorBoard hides events at or after this step from earlier writers
    (a resumed run rewrites the steps after its checkpoint)."""
    if self.is_main:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'), purge_step=purge_step)

  def last_row(self, split: str) -> Dict[str, Any]:
    rows = [r for r in plots.read_jsonl(os.path.join(self.workdir, 'metrics.jsonl'))
            if r.get('split') == split]
    return rows[-1] if rows else {}

  def truncate_after(self, step: int):
    """Drop log rows written after the checkpoint we resume from (a killed run's tail),
    so the resumed run's rows replace them and nothing is counted twice."""
    if not self.is_main:
      return
    for name in LOG_FILES:
      path = os.path.join(self.workdir, name)
      rows = plots.read_jsonl(path)
      kept = [r for r in rows if r['step'] <= step]
      if len(kept) != len(rows):
        with open(path, 'w') as f:
          f.writelines(json.dumps(r) + '\n' for r in kept)

  def write(self, row: Mapping[str, Any]):
    if not self.is_main:
      return
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self.tb is not None:
      for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != 'step':
          self.tb.add_scalar(f"{row['split']}/{key}", value, row['step'])
      self.tb.flush()

  def append_compiled_cost(self, step: int, layout, cost: Mapping[str, float]):
    """One row per compiled layout (a `layout.Layout`) in compiled_cost.jsonl (start and
    every recompile)."""
    row = {'step': step, **layout.to_meta(), **cost}
    log.info('step %d: compiled train step for %s (%.4gM parameters, %.4gM of them in '
             'experts and routers): %.3g FLOPs, %.3g bytes accessed per step (XLA cost '
             'analysis); compiled in %.1fs', step, layout.describe(), cost['parameters'] / 1e6,
             cost['expert_parameters'] / 1e6, cost['flops'], cost['bytes_accessed'],
             cost['compile_seconds'])
    if self.is_main:
      with open(os.path.join(self.workdir, 'compiled_cost.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')

  def append_adaptation(self, events: Sequence[Mapping[str, Any]]):
    if not self.is_main or not events:
      return
    with open(os.path.join(self.workdir, 'adaptation.jsonl'), 'a') as f:
      f.writelines(json.dumps(e) + '\n' for e in events)

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.tb = None
