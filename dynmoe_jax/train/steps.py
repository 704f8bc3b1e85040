"""Pure step builders: the jitted train and eval steps take explicit arguments,
never the whole config.

Determinism: the rng of step `s` is fold_in(state.rng, s), so a step depends on
(state, batch) alone and a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynmoe_jax import names, routers
from dynmoe_jax.data import augment
from dynmoe_jax.train.state import TrainState


def model_inputs(batch: Mapping[str, Any], task: str):
  """The LM reads bytes [:-1] and predicts [1:]; a classifier reads its inputs whole."""
  return batch['inputs'][:, :-1] if task == 'lm' else batch['inputs']


def example_losses(logits: jax.Array, batch: Mapping[str, jax.Array], task: str
                   ) -> Tuple[jax.Array, jax.Array]:
  """Per-example (classify: [B]) or per-target-byte (lm: [B, S]) cross-entropy, and the
  weight of each (0 for padding rows and padding bytes)."""
  weights = batch.get('mask')
  if task == 'classify':
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])
    return losses, (jnp.ones_like(losses) if weights is None else weights)
  targets = batch['inputs'][:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  w = (targets > 0).astype(jnp.float32)
  return losses, (w if weights is None else w * weights[:, None])


def task_loss(logits: jax.Array, batch: Mapping[str, jax.Array], task: str
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Mean loss and per-batch sums used for exact evaluation aggregation."""
  losses, w = example_losses(logits, batch, task)
  sums = {'loss_sum': (losses * w).sum()}
  if task == 'classify':
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    sums['correct_sum'] = (correct * w).sum()
  sums['count'] = w.sum()
  return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums


def summarize_sums(sums: Mapping[str, float], task: str) -> Dict[str, float]:
  count = max(sums['count'], 1.0)
  out = {'loss': sums['loss_sum'] / count}
  if task == 'classify':
    out['accuracy'] = sums['correct_sum'] / count
  else:
    out['bits_per_byte'] = out['loss'] / np.log(2.0)
  return out


def flatten_moe_metrics(moe_aux: Mapping[str, Any]) -> Dict[str, jax.Array]:
  out = {}
  for layer, aux in moe_aux.items():
    for key, value in aux.metrics.items():
      out[names.metric_key(layer, key)] = value
    out[names.metric_key(layer, 'aux_loss')] = aux.loss
  return out


def nonfinite_report(grads) -> Dict[str, jax.Array]:
  """Per top-level module (and router vs experts vs the rest inside MoE blocks): are
  the gradients finite?"""
  report = {}
  for name, subtree in grads.items():
    if isinstance(subtree, dict) and 'moe' in subtree:
      moe = subtree['moe']
      router = {k: v for k, v in moe.items() if routers.is_router_param(k)}
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


def make_train_step(model, tx: optax.GradientTransformation, *, task: str,
                    learning_rate_fn: optax.Schedule, augment_shift: int = 0,
                    skip_nonfinite: bool = False, controllers=None) -> Callable:
  """(state, batch) -> (state, metrics, routing records per MoE layer).

  augment_shift > 0: signals are randomly shifted by up to that many samples.
  skip_nonfinite: a step whose loss or gradients are not finite leaves the params
  and optimizer state as they were (the step counter still advances).
  controllers: a `train.controls.Controllers` (a compute budget, loss-free balancing), whose
  values (state.moe_controls) the routers read (a loss weight, top-p's p, a selection
  bias) and which are updated from this step's routing.
  """

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng = jax.random.split(step_rng)
    inputs = model_inputs(batch, task)
    if augment_shift > 0:
      inputs = augment.augment_shift(inputs, aug_rng, augment_shift)

    layer_controls = controllers.layer_controls(state.moe_controls) if controllers else None

    def loss_fn(params):
      logits, aux = model.apply({'params': params}, inputs, training=True,
                                rngs={'dropout': dropout_rng}, moe_controls=layer_controls)
      loss, sums = task_loss(logits, batch, task)
      return loss + aux['loss'], (loss, sums, aux)

    (total, (loss, sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    report = nonfinite_report(grads)
    finite = jnp.isfinite(total) & jnp.all(jnp.stack(list(report.values())))
    moe_metrics = flatten_moe_metrics(aux['moe'])
    controls = state.moe_controls
    if controllers:
      controls = controllers.update(state.moe_controls, moe_metrics)
      moe_metrics.update(controllers.report(state.moe_controls))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              moe_controls=controls)
    if skip_nonfinite:
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                               state.replace(step=state.step + 1))
    metrics = {'loss': total, 'task_loss': loss, 'aux_loss': aux['loss'],
               'grad_norm': optax.tree.norm(grads), 'learning_rate': learning_rate_fn(state.step),
               'finite': finite, 'skipped': (~finite).astype(jnp.int32) if skip_nonfinite
               else jnp.zeros((), jnp.int32),
               **{f'nonfinite_ok/{k}': v for k, v in report.items()},
               **{k: v for k, v in sums.items()}, **moe_metrics}
    records = {layer: a.record for layer, a in aux['moe'].items()}
    return new_state, metrics, records

  return train_step


# Per MoE layer, the eval step's sums over batches: valid tokens, all tokens (padding
# rows included), routed pairs per expert, tokens that activated no expert, pairs dropped
# for capacity, expert-FFN rows computed, routed and computed forward FLOPs, and slots per
# expert (divided by the number of batches).
EVAL_COUNTS = ('tokens', 'all_tokens', 'routed_pairs', 'unrouted_tokens', 'dropped_pairs',
               'rows', 'activated_flops', 'computed_flops', 'capacity')


def make_eval_step(model, *, task: str, controllers=None) -> Callable:
  """(params, moe_controls, batch with 'mask') -> sums to add up over the eval set.
  Padding rows (mask 0) are routed nowhere, so every figure is the same for any batch
  size. A budget's controllers (the train state's moe_controls) route as in training:
  top-p's adapted p is part of the model it trained."""

  def eval_step(params, moe_controls, batch):
    layer_controls = controllers.layer_controls(moe_controls) if controllers else None
    logits, aux = model.apply({'params': params}, model_inputs(batch, task), training=False,
                              example_mask=batch['mask'], moe_controls=layer_controls)
    _, sums = task_loss(logits, batch, task)
    for layer, a in aux['moe'].items():
      m = a.metrics
      counts = (a.num_tokens, a.total_tokens, a.record.tokens_per_expert,
                a.record.unrouted_count, a.record.dropped_pairs, a.rows,
                m['activated_flops_per_token'] * a.num_tokens,
                m['computed_flops_per_token'] * a.total_tokens, m['capacity'])
      for key, value in zip(EVAL_COUNTS, counts):
        sums[names.metric_key(layer, key)] = value
    sums['batches'] = jnp.ones((), jnp.float32)
    return sums

  return eval_step


def summarize_eval(totals: Mapping[str, Any], task: str) -> Dict[str, Any]:
  """Eval sums over the whole split -> the eval row's figures (plain Python numbers)."""
  out: Dict[str, Any] = {k: float(v) for k, v in summarize_sums(
      {k: float(totals[k]) for k in ('loss_sum', 'count', 'correct_sum') if k in totals},
      task).items()}
  for layer in names.moe_layers_in([totals]):
    get = lambda key: np.asarray(totals[names.metric_key(layer, key)], np.float64)
    tokens, routed = max(float(get('tokens')), 1.0), get('routed_pairs')
    pairs = max(float(routed.sum()), 1.0)
    key = lambda name: names.metric_key(layer, name)
    out[key('active_experts')] = float(routed.sum()) / tokens
    out[key('dropped_fraction')] = float(get('dropped_pairs')) / pairs
    out[key('unrouted_fraction')] = float(get('unrouted_tokens')) / tokens
    out[key('expert_load')] = (routed / pairs).tolist()
    out[key('capacity')] = float(get('capacity')) / max(float(totals['batches']), 1.0)
    out[key('slot_utilization')] = (float(routed.sum() - get('dropped_pairs'))
                                    / max(float(get('rows')), 1.0))
    out[key('activated_flops_per_token')] = float(get('activated_flops')) / tokens
    out[key('computed_flops_per_token')] = (float(get('computed_flops'))
                                            / max(float(get('all_tokens')), 1.0))
  return out
