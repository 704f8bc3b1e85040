"""Training and evaluation: jitted steps with mesh shardings, orbax checkpoints,
JSON-lines + TensorBoard metrics, a progress bar and PNG plots.

Determinism: batch `s` and the rng of step `s` (fold_in(seed, s)) depend on `s`
alone, so a run resumed from a checkpoint continues exactly as if it had not
stopped.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynmoe_jax import adaptive, checkpointing, config_lib, layers, plots, sharding
from dynmoe_jax.data import pipeline
from dynmoe_jax.models import transformer

log = logging.getLogger('dynmoe_jax')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


class NonFiniteError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- losses


def augment_shift(inputs: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Random translation of signals [B, L] by up to ±max_shift samples (edge padded)."""
  length = inputs.shape[1]
  padded = jnp.pad(inputs, ((0, 0), (max_shift, max_shift)), mode='edge')
  offsets = jax.random.randint(rng, (inputs.shape[0],), 0, 2 * max_shift + 1)
  return jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o,), (length,)))(padded, offsets)


def task_loss(logits: jax.Array, batch: Dict[str, jax.Array], task: str
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Mean loss and per-batch sums used for exact evaluation aggregation."""
  weights = batch.get('mask')
  if task == 'classify':
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    w = jnp.ones_like(losses) if weights is None else weights
    sums = {'loss_sum': (losses * w).sum(), 'correct_sum': (correct * w).sum(),
            'count': w.sum()}
  else:
    targets = batch['inputs'][:, 1:]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = (targets > 0).astype(jnp.float32)
    if weights is not None:
      w = w * weights[:, None]
    sums = {'loss_sum': (losses * w).sum(), 'count': w.sum()}
  return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums


def model_inputs(batch, task):
  return batch['inputs'][:, :-1] if task == 'lm' else batch['inputs']


def summarize_sums(sums: Dict[str, float], task: str) -> Dict[str, float]:
  count = max(sums['count'], 1.0)
  out = {'loss': sums['loss_sum'] / count}
  if task == 'classify':
    out['accuracy'] = sums['correct_sum'] / count
  else:
    out['bits_per_byte'] = out['loss'] / np.log(2.0)
  return out


def flatten_moe_metrics(moe_aux: Dict[str, Any]) -> Dict[str, jax.Array]:
  out = {}
  for name, aux in moe_aux.items():
    for key, value in aux.metrics.items():
      out[f'moe/{name}/{key}'] = value
    out[f'moe/{name}/aux_loss'] = aux.loss
  return out


def nonfinite_report(grads) -> Dict[str, jax.Array]:
  """Per top-level module (and router vs experts inside MoE blocks): are grads finite?"""
  report = {}
  for name, subtree in grads.items():
    if isinstance(subtree, dict) and 'moe' in subtree:
      moe = subtree['moe']
      router = {k: v for k, v in moe.items() if k in ('gate_embeddings', 'thresholds',
                                                      'router_kernel')}
      experts = {k: v for k, v in moe.items() if k not in router}
      rest = {k: v for k, v in subtree.items() if k != 'moe'}
      parts = {f'{name}/router': router, f'{name}/experts': experts, f'{name}/attention': rest}
    else:
      parts = {name: subtree}
    for part, tree in parts.items():
      leaves = jax.tree.leaves(tree)
      report[part] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) \
          if leaves else jnp.array(True)
  return report


# ----------------------------------------------------------------------------- steps


def make_train_step(model: transformer.MoETransformer, tx: optax.GradientTransformation,
                    config) -> Callable:
  task, max_shift = config.model.task, config.data.augment_shift
  augment = config.data.kind == 'signal' and max_shift > 0
  skip_nonfinite = config.skip_nonfinite_updates
  schedule = config_lib.learning_rate_schedule(config)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng = jax.random.split(step_rng)
    inputs = model_inputs(batch, task)
    if augment:
      inputs = augment_shift(inputs, aug_rng, max_shift)

    def loss_fn(params):
      logits, aux = model.apply({'params': params}, inputs, training=True,
                                rngs={'dropout': dropout_rng})
      loss, sums = task_loss(logits, batch, task)
      return loss + aux['loss'], (loss, sums, aux)

    (total, (loss, sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    report = nonfinite_report(grads)
    finite = jnp.isfinite(total) & jnp.all(jnp.stack(list(report.values())))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if skip_nonfinite:
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                               state.replace(step=state.step + 1))
    metrics = {'loss': total, 'task_loss': loss, 'aux_loss': aux['loss'],
               'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state.step),
               'finite': finite, 'skipped': (~finite).astype(jnp.int32) if skip_nonfinite
               else jnp.zeros((), jnp.int32),
               **{f'nonfinite_ok/{k}': v for k, v in report.items()},
               **{k: v for k, v in sums.items()}, **flatten_moe_metrics(aux['moe'])}
    records = {name: a.record for name, a in aux['moe'].items()}
    return new_state, metrics, records

  return train_step


def make_eval_step(model: transformer.MoETransformer, config) -> Callable:
  task = config.model.task

  def eval_step(params, batch):
    logits, aux = model.apply({'params': params}, model_inputs(batch, task), training=False)
    _, sums = task_loss(logits, batch, task)
    for name, a in aux['moe'].items():
      sums[f'moe/{name}/active_experts_sum'] = a.metrics['active_experts'] * sums['count']
      sums[f'moe/{name}/dropped_fraction_sum'] = a.metrics['dropped_fraction'] * sums['count']
    return sums

  return eval_step


# ----------------------------------------------------------------------------- trainer


def model_signature(config) -> Dict[str, Any]:
  """Model-shape fields a checkpoint must agree with (the expert layout apart)."""
  m = config_lib.to_dict(config.model)
  m['moe'] = {k: v for k, v in m['moe'].items() if k not in config_lib._LAYOUT_KEYS}
  for key in ('moe_layers', 'moe_layer_indices', 'dropout'):
    m.pop(key, None)
  return json.loads(json.dumps(m))


@dataclasses.dataclass
class Compiled:
  """Everything that depends on the expert layout; rebuilt when it changes."""
  layout: Tuple[int, ...]
  model: transformer.MoETransformer
  shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings: the restore target
  expert_axes: Dict[Tuple[str, ...], int]
  train_step: Callable
  eval_step: Callable


class Trainer:
  """Owns one run in one workdir. `run()` trains to config.num_train_steps."""

  def __init__(self, config, workdir: str, on_step: Optional[Callable] = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.layout = config_lib.validate(config)
    self.is_main = jax.process_index() == 0
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model)
    self.tx = config_lib.build_optimizer(config)
    self.on_step = on_step  # test hook: called with (trainer, step) after every step
    self._stop_requested = False
    self.records: Dict[str, adaptive.RecordAccumulator] = {}
    self.compiled: Optional[Compiled] = None
    # The next boundary's layout and its train/eval steps, compiling on a thread while
    # training goes on (adaptive.compile_lead_steps); the future is None when the
    # layout will not change.
    self._ahead: Optional[Tuple[Tuple[int, ...], Optional[concurrent.futures.Future]]] = None
    self._compiler: Optional[concurrent.futures.ThreadPoolExecutor] = None
    os.makedirs(self.workdir, exist_ok=True)

    d = config.data
    self.preprocess = pipeline.make_preprocess(d.kind, d.input_key, d.label_key, d.seq_len)
    self.train_source = pipeline.get_source(d.name, d.train_split, d.data_dir)
    self.eval_source = pipeline.get_source(d.name, d.eval_split, d.data_dir)
    self.stream = pipeline.TrainStream(self.train_source, self.preprocess, config.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())
    self.example_batch = self.stream.batch(0)  # shapes and dtypes for init and compilation
    self.sample_inputs = model_inputs({k: v[:1] for k, v in self.example_batch.items()},
                                      config.model.task)
    self.checkpointer = checkpointing.Checkpointer(os.path.join(self.workdir, 'checkpoints'),
                                                   config.keep_checkpoints)

  # -- state construction -------------------------------------------------------------

  def _compile(self, layout: Tuple[int, ...]) -> Compiled:
    # Enters the mesh and axis rules itself (both are thread-local): it also runs on the
    # compile-ahead thread.
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      model = config_lib.build_model(self.config, layout)
      boxed = jax.eval_shape(self._init_boxed(model), jax.random.PRNGKey(0))
      shardings = sharding.param_shardings(boxed, self.mesh)
      abstract_state = jax.tree.map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          sharding.strip_boxes(boxed), shardings)

      def abstract_batch(rows, example):
        return {k: jax.ShapeDtypeStruct((rows,) + np.shape(v)[1:], np.asarray(v).dtype,
                                        sharding=sharding.batch_sharding(self.mesh, np.ndim(v)))
                for k, v in example.items()}
      train_batch = abstract_batch(self.config.batch_size, self.example_batch)
      eval_batch = abstract_batch(self.config.eval_batch_size,
                                  {**self.example_batch, 'mask': np.zeros(1, np.float32)})
      # Both steps are compiled ahead of time, so that a new layout's whole cost is paid
      # (and timed) here rather than at its first step or first evaluation.
      train_step = jax.jit(make_train_step(model, self.tx, self.config),
                           in_shardings=(shardings, jax.tree.map(lambda a: a.sharding,
                                                                 train_batch)),
                           out_shardings=(shardings, None, None), donate_argnums=(0,)
                           ).lower(abstract_state, train_batch).compile()
      eval_step = jax.jit(make_eval_step(model, self.config)).lower(
          abstract_state.params, eval_batch).compile()
    return Compiled(layout, model, shardings, abstract_state,
                    adaptive.expert_axes(boxed.params), train_step, eval_step)

  def _compile_timed(self, layout: Tuple[int, ...]) -> Tuple[Compiled, float]:
    start = time.perf_counter()
    compiled = self._compile(layout)
    return compiled, time.perf_counter() - start

  def _init_boxed(self, model):
    sample = jnp.asarray(self.sample_inputs)

    def init(rng):
      params_rng, data_rng = jax.random.split(rng)
      variables = model.init({'params': params_rng, 'dropout': params_rng}, sample,
                             training=False)
      params = variables['params']
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.tx.init(params), rng=data_rng)
    return init

  def init_state(self, compiled: Compiled) -> TrainState:
    init = self._init_boxed(compiled.model)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=compiled.shardings)(
          jax.random.PRNGKey(self.config.seed))

  def meta(self, layout) -> Dict[str, Any]:
    return {'experts_per_layer': list(layout), 'model': model_signature(self.config),
            'routing_records': {k: v.to_json() for k, v in self.records.items()},
            'config': json.loads(self.config.to_json_best_effort())}

  def _abstract_for(self, meta) -> Any:
    if meta.get('model') != model_signature(self.config):
      theirs, ours = meta.get('model', {}), model_signature(self.config)
      diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
      raise checkpointing.ModelMismatchError(
          f'{self.workdir} holds a run of a different model (fields differ: {diff}). Use a new '
          f'--workdir, or the config that wrote it.')
    layout = tuple(meta['experts_per_layer'])
    if layout != self.layout and not self.config.adaptive.enabled:
      raise checkpointing.ModelMismatchError(
          f'{self.workdir} holds experts_per_layer={list(layout)} but the config asks for '
          f'{list(self.layout)} and adaptive.enabled is False')
    # Falling back to an older step of the same layout reuses the compiled step.
    if self.compiled is None or self.compiled.layout != layout:
      self.compiled = self._compile(layout)
    return self.compiled.abstract_state

  def restore_or_init(self) -> TrainState:
    restored = self.checkpointer.restore_latest(self._abstract_for)
    if restored is not None:
      step, state, meta = restored
      self.records = {k: adaptive.RecordAccumulator.from_json(v)
                      for k, v in meta.get('routing_records', {}).items()}
      log.info('resumed from %s/checkpoints/%d (experts per layer %s)', self.workdir, step,
               list(self.compiled.layout))
      self._truncate_logs(step)
      return state
    self.compiled = self._compile(self.layout)
    return self.init_state(self.compiled)

  def _truncate_logs(self, step: int):
    """Drop log rows written after the checkpoint we resume from (a killed run's tail),
    so the resumed run's rows replace them and nothing is counted twice."""
    if not self.is_main:
      return
    for name in ('metrics.jsonl', 'adaptation.jsonl'):
      path = os.path.join(self.workdir, name)
      rows = plots.read_jsonl(path)
      kept = [r for r in rows if r['step'] <= step]
      if len(kept) != len(rows):
        with open(path, 'w') as f:
          f.writelines(json.dumps(r) + '\n' for r in kept)

  # -- logging --------------------------------------------------------------------------

  def _write(self, row: Dict[str, Any]):
    if not self.is_main:
      return
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self.tb is not None:
      for key, value in row.items():
        if isinstance(value, (int, float)) and key != 'step':
          self.tb.add_scalar(f"{row['split']}/{key}", value, row['step'])
      self.tb.flush()

  def _train_row(self, step: int, window: List[Dict], seconds: float) -> Dict[str, Any]:
    host = jax.device_get(window)
    sums = {k: float(sum(m[k] for m in host)) for k in ('loss_sum', 'count') + (
        ('correct_sum',) if 'correct_sum' in host[0] else ())}
    row = {'split': 'train', 'step': step, **summarize_sums(sums, self.config.model.task)}
    row['loss'] = float(np.mean([m['loss'] for m in host]))
    for key in host[0]:
      if key.startswith('moe/') or key in ('task_loss', 'aux_loss', 'grad_norm'):
        row[key] = np.mean([m[key] for m in host], axis=0).tolist()
    row['learning_rate'] = float(host[-1]['learning_rate'])
    row['skipped_steps'] = int(sum(m['skipped'] for m in host))
    row['steps_per_sec'] = len(window) / max(seconds, 1e-9)
    for name in transformer.moe_layer_names(self.compiled.layout):
      dropped = row.get(f'moe/{name}/dropped_fraction', 0.0)
      if dropped > self.config.dropped_fraction_warning:
        log.warning('step %d: %s dropped %.1f%% of routed pairs for capacity (warning level '
                    '%.0f%%); raise model.moe.capacity_factor', step, name, 100 * dropped,
                    100 * self.config.dropped_fraction_warning)
    return row

  def evaluate(self, state: TrainState) -> Dict[str, float]:
    totals: Dict[str, float] = {}
    for batch in pipeline.eval_batches(self.eval_source, self.preprocess,
                                       self.config.eval_batch_size, jax.process_index(),
                                       jax.process_count()):
      batch = self._device_batch(batch)
      for key, value in jax.device_get(self.compiled.eval_step(state.params, batch)).items():
        totals[key] = totals.get(key, 0.0) + float(value)
    out = summarize_sums(totals, self.config.model.task)
    for key, value in totals.items():
      if key.endswith('_sum') and key.startswith('moe/'):
        out[key[:-4]] = value / max(totals['count'], 1.0)
    return out

  def _device_batch(self, batch):
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(self.mesh, np.ndim(v)), np.asarray(v)) for k, v in batch.items()}

  # -- main loop ------------------------------------------------------------------------

  def _on_sigterm(self, signum, frame):
    del frame
    log.warning('signal %d received: checkpointing at the current step, then exiting', signum)
    self._stop_requested = True

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
    for name in transformer.moe_layer_names(self.compiled.layout):
      flag = lambda key: float(host.get(f'moe/{name}/{key}', 1.0))
      if not flag('input_finite'):
        return f'the input of {name} was already non-finite (a layer before it)'
      if not flag('router_finite'):
        return f'the router of {name} produced non-finite routing weights'
      if not flag('output_finite'):
        return f'the experts of {name} produced non-finite outputs'
    return 'no MoE layer produced it (a dense block, the stem, the head or the loss)'

  def run(self) -> Dict[str, Any]:
    config = self.config
    previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) \
        if _main_thread() else None
    self.tb = None
    if self.is_main:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(self.workdir, 'tensorboard'))
      with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))
    try:
      return self._loop()
    finally:
      if self.tb is not None:
        self.tb.close()
      if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
      self.checkpointer.close()

  def _loop(self) -> Dict[str, Any]:
    config = self.config
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      state = self.restore_or_init()
      step = int(jax.device_get(state.step))
      from tqdm import tqdm
      bar = tqdm(total=config.num_train_steps, initial=step, dynamic_ncols=True,
                 disable=not (config.progress_bar and self.is_main), desc='train')
      window, window_start = [], time.perf_counter()
      eval_row: Dict[str, Any] = {}
      status = 'completed'
      # The next batch is read on a thread while the current step runs.
      prefetch = concurrent.futures.ThreadPoolExecutor(1)
      self._compiler = concurrent.futures.ThreadPoolExecutor(1, 'compile-ahead')
      pending = prefetch.submit(self.stream.batch, step)
      self._maybe_compile_ahead(step)  # a run resumed between a window and its boundary
      while step < config.num_train_steps:
        batch = self._device_batch(pending.result())
        pending = prefetch.submit(self.stream.batch, step + 1)
        state, metrics, records = self.compiled.train_step(state, batch)
        step += 1
        self._check_finite(step, metrics)
        if self._recording(step):
          self._accumulate(records)
        window.append(metrics)
        bar.update(1)
        last = step == config.num_train_steps
        boundary = config.adaptive.enabled and step % config.adaptive.every == 0 and not last
        # A window never spans a resize or a checkpoint, so a resumed run logs the same rows.
        if (step % config.log_every == 0 or last or boundary
            or step % config.checkpoint_every == 0):
          row = self._train_row(step, window, time.perf_counter() - window_start)
          self._write(row)
          bar.set_postfix(self._postfix(row), refresh=False)
          window, window_start = [], time.perf_counter()
        if step % config.eval_every == 0 or last:
          eval_row = {'split': 'eval', 'step': step, **self.evaluate(state)}
          self._write(eval_row)
          log.info('eval step %d: %s', step, {k: round(v, 4) for k, v in eval_row.items()
                                              if isinstance(v, float)})
        if boundary:
          state = self.adapt(state, step)
        if step % config.checkpoint_every == 0 or last or boundary or self._stop_requested:
          self.checkpointer.save(step, state, self.meta(self.compiled.layout))
        self._maybe_compile_ahead(step)
        if self.on_step is not None:  # tests: may inspect or replace self.state
          self.state = state
          self.on_step(self, step)
          state = self.state
        if self._stop_requested:
          status = 'preempted'
          break
      bar.close()
      prefetch.shutdown(wait=True, cancel_futures=True)
      self._compiler.shutdown(wait=True, cancel_futures=True)
    self.state = state
    if self.is_main and status == 'completed':
      plots.write_plots(self.workdir)
    return {'status': status, 'step': step, 'eval': eval_row,
            'experts_per_layer': list(self.compiled.layout)}

  # -- adaptive experts -----------------------------------------------------------------

  def _recording(self, step: int) -> bool:
    """Steps whose routing the next boundary plans from: the `record_steps` steps that
    end `compile_lead_steps` before the boundary."""
    a = self.config.adaptive
    if not a.enabled:
      return False
    into_interval = (step - 1) % a.every + 1  # 1..every
    window_end = a.every - a.compile_lead_steps
    return window_end - a.record_steps < into_interval <= window_end

  def _accumulate(self, records):
    for name, record in jax.device_get(records).items():
      if name not in self.records:
        self.records[name] = adaptive.RecordAccumulator.empty(
            record.tokens_per_expert.shape[0], record.unrouted_input_sum.shape[0])
      self.records[name].add(record)

  def _maybe_compile_ahead(self, step: int):
    """Once the routing window before a boundary is complete, start compiling the layout
    that boundary will produce, so that training goes on meanwhile. The layout follows
    from the records alone; the resize itself waits for the boundary's parameters."""
    a = self.config.adaptive
    if not a.enabled or not a.compile_lead_steps or self._ahead is not None:
      return
    boundary = (step // a.every + 1) * a.every
    if not (boundary - a.compile_lead_steps <= step and boundary < self.config.num_train_steps):
      return
    layout = adaptive.planned_layout(self.compiled.layout, self.records,
                                     min_experts=a.min_experts, max_experts=a.max_experts)
    future = None
    if layout != self.compiled.layout:
      future = self._compiler.submit(self._compile_timed, layout)
      log.info('step %d: routing window complete; compiling experts per layer %s for the '
               'boundary at step %d in the background', step, list(layout), boundary)
    self._ahead = (layout, future)

  def _compiled_for(self, layout: Tuple[int, ...]) -> Tuple[Compiled, float, float, bool]:
    """The steps for `layout`: (compiled, seconds compiling, seconds training waited for
    them, whether they were compiled ahead). A plan that removes as many experts as it
    adds keeps the shapes, and with them the current steps."""
    ahead, self._ahead = self._ahead, None
    if layout == self.compiled.layout:
      return self.compiled, 0.0, 0.0, ahead is not None
    start = time.perf_counter()
    if ahead is not None and ahead[1] is not None and ahead[0] == layout:
      compiled, compile_seconds = ahead[1].result()
      return compiled, compile_seconds, time.perf_counter() - start, True
    if ahead is not None:
      log.warning('the boundary planned experts per layer %s, not the %s compiled ahead; '
                  'compiling now', list(layout), list(ahead[0]))
    compiled, compile_seconds = self._compile_timed(layout)
    return compiled, compile_seconds, compile_seconds, False

  def adapt(self, state: TrainState, step: int) -> TrainState:
    """Plan from the recorded window, reallocate params and optimizer state, and switch
    to the new layout's steps (compiled ahead, or now)."""
    a = self.config.adaptive
    start = time.perf_counter()
    host = jax.device_get(state)
    layout = self.compiled.layout
    plans = {}
    for index, name in enumerate(transformer.moe_layer_names(layout)):
      record = self.records.get(name)
      if record is None or not record.steps:
        continue
      module = (name, 'moe')
      moe_axes = {path[-1]: axis for path, axis in self.compiled.expert_axes.items()
                  if path[:-1] == module}
      moe = layers.MoE(num_experts=layout[int(name.split('_')[-1])],
                       **config_lib.moe_kwargs(self.config))
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step),
                               index)
      plans[module] = adaptive.plan_layer(
          record, host.params[name]['moe'], moe_axes, moe, min_experts=a.min_experts,
          max_experts=a.max_experts, new_expert_init=a.new_expert_init, rng=rng)
    self.records = {}
    plan = adaptive.ResizePlan(plans, self.compiled.expert_axes)
    if plan.is_noop:
      self._ahead = None
      return state
    params, opt_state = adaptive.resize(host.params, host.opt_state, plan)
    new_layout = adaptive.new_layout(layout, plan)
    plan_seconds = time.perf_counter() - start
    self.compiled, compile_seconds, waited, ahead = self._compiled_for(new_layout)
    state = jax.device_put(host.replace(params=params, opt_state=opt_state),
                           self.compiled.shardings)
    paused = time.perf_counter() - start
    if new_layout == layout:
      how = 'the same shapes as before: the current steps are kept'
    elif ahead:
      how = f'compiled in the background over the last {a.compile_lead_steps} steps'
    else:
      how = 'compiled at the boundary'
    log.info('step %d: experts per layer %s -> %s; training paused %.2fs (plan + reallocate '
             '%.2fs, waiting for the new steps %.2fs); the new steps took %.2fs to compile, %s',
             step, list(layout), list(new_layout), paused, plan_seconds, waited,
             compile_seconds, how)
    if self.is_main:
      with open(os.path.join(self.workdir, 'adaptation.jsonl'), 'a') as f:
        for (name, _), layer_plan in plans.items():
          if layer_plan.is_noop:
            continue
          f.write(json.dumps({
              'step': step, 'layer': name, 'added': layer_plan.num_new,
              'removed': list(layer_plan.removed), 'experts_before': layer_plan.old_count,
              'experts_after': layer_plan.new_count, 'compiled_ahead': ahead,
              'seconds': paused, 'plan_seconds': plan_seconds,
              'compile_wait_seconds': waited, 'recompile_seconds': compile_seconds}) + '\n')
    return state

  def _postfix(self, row):
    out = {'loss': f"{row['loss']:.3f}"}
    if 'accuracy' in row:
      out['acc'] = f"{row['accuracy']:.3f}"
    active = [v for k, v in row.items() if k.endswith('/active_experts')]
    if active:
      out['experts'] = f'{np.mean(active):.2f}'
    return out


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  return Trainer(config, workdir).run()
