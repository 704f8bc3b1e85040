"""The trainer: one run in one workdir, a loop of periodic actions.

Determinism: batch `s` and the rng of step `s` depend on `s` alone, so a run
resumed from a checkpoint continues exactly as if it had not stopped.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from dynmoe_jax import checkpointing, config_lib, names, plots, sharding
from dynmoe_jax.data import pipeline
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import compiled as compiled_lib
from dynmoe_jax.train import compat, init_from, metrics_log, steps, throughput
from dynmoe_jax.train.boundary import LayoutBoundary
from dynmoe_jax.train.state import TrainState

log = logging.getLogger('dynmoe_jax')


class NonFiniteError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class Every:
  """A periodic action's schedule: every `steps` steps, and at the last step."""
  steps: int
  at_last: bool = True

  def fires(self, step: int, last: bool) -> bool:
    return step % self.steps == 0 or (self.at_last and last)


class Trainer:
  """Owns one run in one workdir. `run()` trains to config.num_train_steps."""

  def __init__(self, config, workdir: str, on_step: Optional[Callable] = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    compat.check_workdir(self.workdir)
    self.layout = Layout(config_lib.validate(config))
    # Nothing is written to the workdir until the state is restored or built (see _loop):
    # a refused run leaves it as it was. Is it this run, or a new one?
    saved = compat.saved_config(self.workdir)
    compat.check(saved, config, self.workdir)
    if config.init_from and saved is None:
      init_from.dense_config(config.init_from, config)  # before the minutes of compiling
    self.is_main = jax.process_index() == 0
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
    self.tx = config_lib.build_optimizer(config)
    if config.model.moe.dispatch_impl == 'ragged':
      log.info('ragged dispatch: %s', compiled_lib.check_grouped_matmul(config))
    self.on_step = on_step  # test hook: called with (trainer, step) after every step
    self._stop_requested = False
    self.compiled: Optional[compiled_lib.Compiled] = None

    d = config.data
    self.preprocess = pipeline.make_preprocess(d.kind, d.input_key, d.label_key, d.seq_len)
    self.train_source = pipeline.get_source(d.name, d.train_split, d.data_dir)
    self.eval_source = pipeline.get_source(d.name, d.eval_split, d.data_dir)
    self.stream = pipeline.TrainStream(self.train_source, self.preprocess, config.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())
    self.example_batch = self.stream.batch(0)  # shapes and dtypes for init and compilation
    self.eval_rows = eval_rows(config.eval_batch_size, self.mesh, jax.process_count())
    if self.eval_rows != config.eval_batch_size:
      log.info('eval batches of %d rows (eval_batch_size=%d padded to what the mesh splits; '
               'padding rows are masked out)', self.eval_rows, config.eval_batch_size)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints'),
                                                   config.keep_checkpoints)
    self.metrics = metrics_log.MetricsLog(self.workdir, self.is_main)
    self.boundary = LayoutBoundary(config, self.compile, self.metrics)

  # -- state -------------------------------------------------------------------------------

  def compile(self, layout) -> compiled_lib.Compiled:
    """The compiled steps of `layout` (a Layout, or experts per block)."""
    return compiled_lib.compile_layout(self.config, Layout.of(layout), mesh=self.mesh, tx=self.tx,
                                       example_batch=self.example_batch,
                                       eval_rows=self.eval_rows)

  def meta(self, layout: Layout) -> Dict[str, Any]:
    return {**layout.to_meta(), 'routing_records': self.boundary.records_json(),
            'config': compat.config_json(self.config)}

  def _check_layout(self, meta, layout: Layout):
    # Every step restore may fall back to was written by this config, or it is refused.
    compat.check(meta.get('config', {}), self.config, self.workdir)
    if layout.experts != self.layout.experts and not self.config.adaptive.enabled:
      raise checkpointing.ModelMismatchError(
          f'{self.workdir} holds experts_per_layer={list(layout.experts)} but the config asks '
          f'for {list(self.layout.experts)} and adaptive.enabled is False')

  def _abstract_for(self, meta) -> Any:
    layout = Layout.from_meta(meta)
    self._check_layout(meta, layout)
    # Falling back to an older step of the same layout reuses the compiled steps.
    if self.compiled is None or self.compiled.layout != layout:
      self.compiled = self.compile(layout)
    return self.compiled.abstract_state

  def restore_or_init(self) -> TrainState:
    """The newest readable checkpoint, or a fresh state; sets `self.compiled`. Writes
    nothing (an unreadable checkpoint is moved aside, see Checkpointer.restore_latest)."""
    had_checkpoints = bool(self.checkpointer.all_steps())
    restored = self.checkpointer.restore_latest(self._abstract_for)
    if restored is not None:
      step, state, meta = restored
      self.boundary.load_records(meta.get('routing_records', {}))
      log.info('resumed from %s/checkpoints/%d (%s)', self.workdir, step,
               self.compiled.layout.describe())
      return state
    if had_checkpoints:
      raise checkpointing.NoReadableCheckpointError(
          f'no checkpoint in {self.workdir}/checkpoints could be read (each was moved, not '
          f'deleted, to {self.workdir}/unreadable_checkpoints); starting at step 0 would '
          'overwrite this run. Use a new --workdir to start over.')
    self.compiled = self.compile(self.layout)
    state = compiled_lib.init_state(self.compiled, self.mesh, self.config.seed)
    if self.config.init_from:
      state = self._upcycled(state)
    return state

  def _upcycled(self, state: TrainState) -> TrainState:
    """The fresh state with its params upcycled from the dense run in config.init_from
    (fresh optimizer state, step 0)."""
    # Global batches (process 0 of 1): every process computes the same gates.
    stream = pipeline.TrainStream(self.train_source, self.preprocess, self.config.batch_size,
                                  self.config.seed, 0, 1)
    params = init_from.from_checkpoint(self.config, jax.device_get(state.params),
                                     self.example_batch, stream.batch)
    return state.replace(params=jax.device_put(params, self.compiled.shardings.params))

  def close(self):
    """Release the checkpointer (a trainer used only to restore, e.g. for analysis)."""
    self.checkpointer.close()

  def device_batch(self, batch):
    """Host batch (this process's rows) -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(self.mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()}

  # -- evaluation --------------------------------------------------------------------------

  def evaluate(self, state: TrainState) -> Dict[str, Any]:
    """Loss, accuracy or bits/byte and each MoE layer's routing over the eval split,
    padding rows excluded (the same figures for any eval batch size and mesh)."""
    totals: Dict[str, Any] = {}
    for batch in pipeline.eval_batches(self.eval_source, self.preprocess, self.eval_rows,
                                       jax.process_index(), jax.process_count()):
      sums = self.compiled.eval_step(state.params, state.moe_controls, self.device_batch(batch))
      for key, value in jax.device_get(sums).items():
        totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    return steps.summarize_eval(totals, self.config.model.task)

  # -- faults ------------------------------------------------------------------------------

  def _on_signal(self, signum, frame):
    del frame
    log.warning('%s received: checkpointing at the current step, then exiting%s',
                signal.Signals(signum).name,
                ' (Ctrl-C again stops at once)' if signum == signal.SIGINT else '')
    self._stop_requested = True
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def _check_finite(self, step: int, metrics):
    if bool(jax.device_get(metrics['finite'])) or self.config.skip_nonfinite_updates:
      return
    host = jax.device_get(metrics)
    bad_grads = [k.split('/', 1)[1] for k, ok in host.items()
                 if k.startswith('nonfinite_ok/') and not ok]
    last = self.checkpointer.all_steps()
    raise NonFiniteError(
        f'non-finite loss or gradients at step {step}: {self._blame(host)}; non-finite '
        f'gradients in {bad_grads or "none"}. Nothing after it was saved; the last good '
        f'checkpoint is step {last[-1] if last else "none"} in {self.workdir}/checkpoints. '
        'Set skip_nonfinite_updates=True to skip such steps instead.')

  def _blame(self, host) -> str:
    """The first MoE layer, in forward order, whose router or experts turned finite
    inputs into NaN/Inf."""
    for layer in names.moe_layer_names(self.compiled.layout.experts):
      flag = lambda key: float(host.get(names.metric_key(layer, key), 1.0))
      if not flag('input_finite'):
        return f'the input of {layer} was already non-finite (a layer before it)'
      if not flag('router_finite'):
        return f'the router of {layer} produced non-finite routing weights'
      if not flag('output_finite'):
        return f'the experts of {layer} produced non-finite outputs'
    return 'no MoE layer produced it (a dense block, the stem, the head or the loss)'

  # -- the loop ----------------------------------------------------------------------------

  def _throughput(self, peak) -> Optional[throughput.LMThroughput]:
    """Tokens/s and MFU for the train rows of the current layout (LMs only)."""
    rates = (throughput.lm_throughput(self.config, self.compiled.layout.experts, peak)
             if peak else None)
    if rates is not None:
      log.info('throughput: %d tokens per step, %.3g model FLOPs per token forward besides '
               'the routed experts; MFU against %.3g FLOP/s (%s)', rates.tokens_per_step,
               rates.forward_flops_per_token, rates.peak_flops, rates.peak_source)
    return rates

  def finished(self) -> Optional[Dict[str, Any]]:
    """The result of a run already trained and evaluated to config.num_train_steps whose
    last checkpoint reads back, found without compiling anything; None otherwise."""
    steps_saved = self.checkpointer.all_steps()
    last_eval = self.metrics.last_row('eval')
    if (not steps_saved or steps_saved[-1] != self.config.num_train_steps or
        last_eval.get('step') != steps_saved[-1]):
      return None
    try:
      meta = self.checkpointer.read_meta(steps_saved[-1])
    except Exception:  # noqa: BLE001  unreadable: the normal path sets it aside
      return None
    layout = Layout.from_meta(meta)
    self._check_layout(meta, layout)
    if not self.checkpointer.readable(steps_saved[-1]):
      return None
    log.info('%s already holds this run trained to step %d: nothing to do', self.workdir,
             steps_saved[-1])
    return {'status': 'completed', 'step': steps_saved[-1], 'eval': last_eval,
            'experts_per_layer': list(layout.experts),
            'capacity_per_layer': list(layout.capacity)}

  def run(self) -> Dict[str, Any]:
    """Train to config.num_train_steps (or until SIGTERM / Ctrl-C: then checkpoint the
    current step and return with status 'preempted'). A run already finished returns its
    result at once."""
    done = self.finished()
    if done is not None:
      self.close()
      return done
    handlers = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        handlers[signum] = signal.signal(signum, self._on_signal)
    try:
      return self._loop()
    finally:
      self.metrics.close()
      for signum, handler in handlers.items():
        signal.signal(signum, handler)
      self.close()

  def _begin_writing(self, state) -> int:
    """The run's first writes (every refusal has been raised by now); its step."""
    if self.is_main:
      os.makedirs(self.workdir, exist_ok=True)
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(self.config.to_json_best_effort(indent=2))
    step = int(jax.device_get(state.step))
    # Rows logged after that step (a killed run's tail; all of them for a run killed
    # before its first checkpoint) are redone by this run, not kept twice.
    self.metrics.truncate_after(step)
    # A resumed run's TensorBoard steps after its checkpoint replace the old ones.
    self.metrics.open(purge_step=step + 1 if step else None)
    self.metrics.append_compiled_cost(step, self.compiled.layout, self.compiled.cost())
    if (step == 0 and self.config.init_from and
        self.metrics.last_row('eval').get('step') != 0):
      # The upcycled starting point, on record before any training.
      self.metrics.write({'split': 'eval', 'step': 0, **self.evaluate(state)})
    return step

  def _write_train_row(self, step: int, window, seconds: float, rates) -> Dict[str, Any]:
    row = metrics_log.train_row(step, window, seconds, self.config.model.task)
    if rates is not None:
      row.update(rates.row_fields(row))
    metrics_log.warn_dropped(row, self.compiled.layout.experts,
                             self.config.dropped_fraction_warning)
    self.metrics.write(row)
    return row

  def _cross_boundary(self, state, step: int, rates, peak):
    """(state, throughput rates) after the layout boundary at `step`."""
    before = self.compiled
    state, self.compiled = self.boundary.apply(state, step, self.compiled)
    if self.compiled is not before:
      self.metrics.append_compiled_cost(step, self.compiled.layout, self.compiled.cost())
      if self.compiled.layout.experts != before.layout.experts:  # capacity: same FLOPs
        rates = self._throughput(peak)
    return state, rates

  def _loop(self) -> Dict[str, Any]:
    config = self.config
    log_every, eval_every = Every(config.log_every), Every(config.eval_every)
    checkpoint_every = Every(config.checkpoint_every)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      state = self.restore_or_init()
      step = self._begin_writing(state)
      peak = throughput.device_peak_flops(jax.devices()) if config.model.task == 'lm' else None
      rates = self._throughput(peak)
      bar = tqdm(total=config.num_train_steps, initial=step, dynamic_ncols=True,
                 disable=not (config.progress_bar and self.is_main), desc='train')
      window: List[Dict[str, Any]] = []
      window_start = time.perf_counter()
      eval_row: Dict[str, Any] = {}
      status = 'completed'
      # The next batch is read on a thread while the current step runs.
      prefetch = concurrent.futures.ThreadPoolExecutor(1)
      self.boundary.start()
      pending = prefetch.submit(self.stream.batch, step)
      self.boundary.maybe_compile_ahead(step, self.compiled.layout)  # resumed mid-window
      while step < config.num_train_steps:
        batch = self.device_batch(pending.result())
        pending = prefetch.submit(self.stream.batch, step + 1)
        state, metrics, records = self.compiled.train_step(state, batch)
        step += 1
        self._check_finite(step, metrics)
        if self.boundary.recording(step):
          self.boundary.accumulate(records)
        window.append(metrics)
        bar.update(1)
        last = step == config.num_train_steps
        at_boundary = self.boundary.fires(step)
        # A window never spans a resize or a checkpoint, so a resumed run logs the same rows.
        if log_every.fires(step, last) or at_boundary or checkpoint_every.fires(step, False):
          row = self._write_train_row(step, window, time.perf_counter() - window_start, rates)
          bar.set_postfix(postfix(row), refresh=False)
          window, window_start = [], time.perf_counter()
        if eval_every.fires(step, last):
          eval_row = {'split': 'eval', 'step': step, **self.evaluate(state)}
          self.metrics.write(eval_row)
          log.info('eval step %d: %s', step, {k: round(float(v), 4) for k, v in eval_row.items()
                                              if isinstance(v, float)})
        if at_boundary:
          state, rates = self._cross_boundary(state, step, rates, peak)
        if checkpoint_every.fires(step, last) or at_boundary or self._stop_requested:
          self.checkpointer.save(step, state, self.meta(self.compiled.layout))
        self.boundary.maybe_compile_ahead(step, self.compiled.layout)
        if self.on_step is not None:  # tests: may inspect or replace self.state
          self.state = state
          self.on_step(self, step)
          state = self.state
        if self._stop_requested:
          status = 'preempted'
          break
      bar.close()
      prefetch.shutdown(wait=True, cancel_futures=True)
      self.boundary.shutdown()
    self.state = state
    if self.is_main:
      plots.write_plots(self.workdir)
    if not eval_row:  # nothing was evaluated in this call: report the run's last evaluation
      eval_row = self.metrics.last_row('eval')
    return {'status': status, 'step': step, 'eval': eval_row,
            'experts_per_layer': list(self.compiled.layout.experts),
            'capacity_per_layer': list(self.compiled.layout.capacity)}


def eval_rows(eval_batch_size: int, mesh, process_count: int) -> int:
  """Rows of a global eval batch: eval_batch_size rounded up so that the batch axes of
  the mesh (and the processes) split it; the padding rows carry mask 0."""
  data_parallel = sharding.axis_size(mesh, ('data', 'expert'))
  multiple = math.lcm(data_parallel, process_count)
  return -(-eval_batch_size // multiple) * multiple


def postfix(row: Dict[str, Any]) -> Dict[str, str]:
  out = {'loss': f"{row['loss']:.3f}"}
  if 'tokens_per_sec' in row:
    out['tok/s'] = f"{row['tokens_per_sec']:.3g}"
    out['mfu'] = f"{100 * row['mfu']:.1f}%"
  if 'accuracy' in row:
    out['acc'] = f"{row['accuracy']:.3f}"
  active = [v for k, v in row.items()
            if (names.split_metric_key(k) or ('', ''))[1] == 'active_experts']
  if active:
    out['experts'] = f'{np.mean(active):.2f}'
  return out


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  return Trainer(config, workdir).run()
