"""The MoE linen module: a router from `routers` + an expert path from `experts`.

Shape letters: T tokens, D width, F expert hidden width, E experts, C capacity.
Every parameter carries logical axis names ('expert', 'embed', 'mlp'); the
rules mapping them to mesh axes live in `dynmoe_jax.sharding`. The module holds
no router- or dispatch-specific branch: both are looked up by name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dynmoe_jax import capacity as capacity_lib
from dynmoe_jax import experts, grouped_matmul, routers, routing
from dynmoe_jax.capacity import Capacity

ROUTERS = routers.NAMES
DISPATCH_IMPLS = tuple(experts.PATHS)
RAGGED_BACKENDS = grouped_matmul.BACKENDS
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': nn.gelu, 'relu': nn.relu, 'silu': nn.silu, 'swish': nn.swish}


@flax.struct.dataclass
class RoutingRecord:
  """What adaptive training needs from one forward pass of one layer."""
  tokens_per_expert: jax.Array   # int32[E], routed pairs per expert (before capacity)
  unrouted_count: jax.Array      # int32[], tokens that activated no expert
  unrouted_input_sum: jax.Array  # float32[D], sum of router inputs of those tokens
  dropped_pairs: jax.Array       # int32[], routed pairs dropped for capacity
  num_tokens: jax.Array          # int32[], tokens routed (masked ones excluded)


@flax.struct.dataclass
class MoEAux:
  loss: jax.Array                # weighted sum of this layer's auxiliary losses
  metrics: Dict[str, jax.Array]  # 'active_experts', 'dropped_fraction', 'expert_load', ...
  record: RoutingRecord
  num_tokens: jax.Array          # float32[], tokens the metrics average over (token_mask)
  total_tokens: jax.Array        # float32[], every token of the input, masked ones included
  rows: jax.Array                # float32[], expert-FFN rows computed (slots, padding included)


def stacked_kernel_init(scale: float = 1.0):
  """Fan-in variance scaling for [E, in, out] kernels: each expert is initialised
  as an independent dense layer (the expert axis is a batch axis)."""
  return nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal',
                                          in_axis=-2, out_axis=-1, batch_axis=(0,))


class MoE(nn.Module):
  """Mixture-of-Experts FFN with a choice of routers and dispatch implementations.

  Attributes:
    num_experts: E.
    hidden_dim: F, hidden width of each expert.
    router: a router's settings object (`routers.TopAny(scale=10.0)`, `routers.TopK(k=1)`,
      ...: its own fields and loss weights), or a name in `routers.NAMES` for that
      router's defaults.
    capacity: `capacity.Capacity`: slots per expert (factor rule, explicit slots or a
      re-planned capacity) and routing groups.
    dispatch_impl: a name in `experts.PATHS` (DISPATCH_IMPLS).
    ragged_backend: the grouped matmul of dispatch_impl='ragged', a name in
      `grouped_matmul.BACKENDS`: 'auto' (megablox on TPU, the Pallas Triton kernel on
      GPU, XLA elsewhere, chosen by the platform the step is lowered for), 'xla',
      'megablox', 'pallas_triton' or 'tokamax'.
    activation: key of ACTIVATIONS. glu: gated FFN act(x·wi) * (x·wi_gate).
    dtype: compute dtype of the expert FFNs (routing is at least float32).
    param_dtype: parameter dtype.
  Defaults live in the settings classes; docs/guide.md, "The layer", lists them.
  """
  num_experts: int
  hidden_dim: int
  router: Union[str, routers.RouterSettings] = 'top_any'
  capacity: Capacity = Capacity()
  dispatch_impl: str = 'sort'
  ragged_backend: str = 'auto'
  activation: str = 'gelu'
  glu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = stacked_kernel_init()
  router_init: Callable[..., jax.Array] = nn.initializers.normal(0.02)

  @property
  def spec(self) -> routers.RouterSpec:
    return routers.resolve(self.router)[0]

  @property
  def settings(self) -> routers.RouterSettings:
    """The router's settings (its defaults where `router` is a name)."""
    return routers.resolve(self.router)[1]

  def _validate(self):
    E = self.num_experts
    if not isinstance(E, int) or E < 1:
      raise ValueError(f'MoE.num_experts must be an int >= 1, got {E!r}')
    if self.hidden_dim < 1:
      raise ValueError(f'MoE.hidden_dim must be >= 1, got {self.hidden_dim}')
    routers.resolve(self.router)
    if not isinstance(self.capacity, Capacity):
      raise ValueError(f'MoE.capacity must be a capacity.Capacity, got {self.capacity!r}')
    for name, value, allowed in (('dispatch_impl', self.dispatch_impl, DISPATCH_IMPLS),
                                 ('ragged_backend', self.ragged_backend, RAGGED_BACKENDS),
                                 ('activation', self.activation, tuple(ACTIVATIONS))):
      if value not in allowed:
        raise ValueError(f'MoE.{name}={value!r} is not one of {allowed}')
    for field, message in routers.check(self.router, self.capacity, E):
      on_capacity = field.startswith('capacity.')
      owner = 'MoE' if on_capacity else type(self.settings).__name__
      value = (getattr(self.capacity, field.split('.', 1)[1]) if on_capacity
               else getattr(self.settings, field))
      raise ValueError(f'{owner}.{field}={value!r} {message} (num_experts={E})')

  def _param(self, name, init, shape, axes):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

  def _check_width(self, width: int):
    if self.has_variable('params', 'wo'):
      expected = jnp.shape(nn.meta.unbox(self.get_variable('params', 'wo')))[-1]
      if width != expected:
        raise ValueError(f'MoE: input last dimension {width} != model width {expected} '
                         'the layer was initialised with')

  def _priority(self, route) -> Optional[jax.Array]:
    order = getattr(self.settings, 'priority', 'score')
    if order == 'score':
      return route.scores
    if order == 'index':
      return None
    order_of = lambda scores, mask: routing.choice_priority(scores, mask, order)
    return routing.per_group(order_of, self.capacity.group_size)(route.scores, route.mask)

  def _aux_loss(self, route, logits, router_params, controls):
    """The router's auxiliary losses and their metrics, averaged over routing groups."""
    settings = self.settings
    losses = lambda r, l: routers.aux_loss(settings, r, l, router_params, controls)
    if self.capacity.group_size is None:
      return losses(route, logits)
    total, metrics = routing.per_group(losses, self.capacity.group_size, stacked=True)(
        route, logits)
    return total.mean(), {k: v.mean() for k, v in metrics.items()}

  def slots_per_expert(self, num_tokens: int, training: bool) -> int:
    """Slots per expert for a group of `num_tokens` tokens (a Python int)."""
    return capacity_lib.slots_per_expert(self.capacity, self.settings, num_tokens,
                                     self.num_experts, training)

  def _experts(self, width: int) -> experts.ExpertFFN:
    E, F = self.num_experts, self.hidden_dim
    axes_in, axes_out = ('expert', 'embed', 'mlp'), ('expert', 'mlp', 'embed')
    wi = self._param('wi', self.kernel_init, (E, width, F), axes_in)
    wi_gate = self._param('wi_gate', self.kernel_init, (E, width, F), axes_in) if self.glu \
        else None
    wo = self._param('wo', self.kernel_init, (E, F, width), axes_out)
    cast = lambda w: None if w is None else w.astype(self.dtype)
    return experts.ExpertFFN(cast(wi), cast(wi_gate), cast(wo), ACTIVATIONS[self.activation],
                             grouped_matmul.get(self.ragged_backend))

  @nn.compact
  def __call__(self, x: jax.Array, training: bool = False,
               token_importance: Optional[jax.Array] = None,
               token_mask: Optional[jax.Array] = None,
               controls: Optional[Dict[str, jax.Array]] = None):
    """x [..., D] -> (y [..., D], MoEAux).

    token_importance [...]: for routers that need it ('adaptive_k').
    token_mask bool[...]: tokens to route; the others (e.g. padding rows of an eval
      batch) get no expert, take no capacity and are left out of every metric.
    controls: a compute budget's traced values: weights that replace the named auxiliary
      loss weights (top-any's 'efficiency') or routing settings (top-p's 'p').
    """
    self._validate()
    self._check_width(x.shape[-1])
    lead_shape, width = x.shape[:-1], x.shape[-1]
    for name, value in (('token_importance', token_importance), ('token_mask', token_mask)):
      if value is not None:
        chex.assert_shape(value, lead_shape, custom_message=f'MoE {name}')
    tokens = x.reshape(-1, width)
    valid = None if token_mask is None else token_mask.reshape(-1).astype(jnp.bool_)
    spec, settings = routers.resolve(self.router)
    group_size = self.capacity.group_size
    if group_size is not None and tokens.shape[0] % group_size:
      raise ValueError(f'MoE: {tokens.shape[0]} tokens do not split into routing groups of '
                       f'capacity.group_size={group_size}')

    with jax.named_scope('router'):
      route, logits, router_params = spec.route(self, settings, tokens, training,
                                                  token_importance, controls or {})
    if valid is not None:
      route = routing.mask_tokens(route, valid)
    ffn = self._experts(width)

    impl = self.dispatch_impl
    if impl == 'shard_map_a2a' and self.is_initializing():
      impl = 'sort'  # same parameters; init runs on one example that need not split over a mesh
    routed = experts.Routed(
        tokens=tokens.astype(self.dtype), route=route,
        priority=self._priority(route),
        max_k=settings.pairs_per_token(),
        capacity=lambda num_tokens: self.slots_per_expert(num_tokens, training),
        group_size=group_size)
    computed = experts.PATHS[impl](routed, ffn)
    y = computed.output

    aux_loss, loss_metrics = self._aux_loss(route, logits, router_params, controls)
    metrics, record = _metrics_and_record(x, y, tokens, route, computed, ffn, valid)
    metrics.update(loss_metrics)
    num_tokens = (jnp.asarray(tokens.shape[0], jnp.float32) if valid is None
                  else valid.sum(dtype=jnp.float32))
    # Per-token expert counts for analysis (harder inputs, more experts?); stored only
    # when the caller makes 'intermediates' mutable, otherwise a no-op.
    self.sow('intermediates', 'active_experts_per_token', route.num_active.reshape(lead_shape),
             init_fn=lambda: None, reduce_fn=lambda _, new: new)
    y = y.reshape(*lead_shape, width).astype(x.dtype)
    return y, MoEAux(loss=aux_loss, metrics=metrics, record=record, num_tokens=num_tokens,
                     total_tokens=jnp.asarray(tokens.shape[0], jnp.float32),
                     rows=jnp.asarray(computed.rows, jnp.float32))


def _metrics_and_record(x, y, tokens, route, computed, ffn, valid
                        ) -> Tuple[Dict[str, jax.Array], RoutingRecord]:
  """A call's metrics (over the valid tokens) and its routing record."""
  routed_per_expert = route.mask.sum(axis=0, dtype=jnp.int32)
  unrouted = routing.unrouted(route)
  if valid is not None:
    unrouted = unrouted & valid
  active = _token_mean(route.num_active.astype(jnp.float32), valid)
  kept = (computed.num_routed - computed.num_dropped).astype(jnp.float32)
  metrics = {
      'active_experts': active,
      'dropped_fraction': computed.num_dropped / jnp.maximum(computed.num_routed, 1).astype(
          jnp.float32),
      'expert_load': routed_per_expert / jnp.maximum(routed_per_expert.sum(), 1).astype(
          jnp.float32),
      'unrouted_fraction': _token_mean(unrouted.astype(jnp.float32), valid),
      # Compute that follows the router, or not: slots per expert and how full they are;
      # forward expert-FFN FLOPs per token for the routed pairs and for what was computed
      # (padding slots included).
      'capacity': jnp.asarray(computed.capacity, jnp.float32),
      'slot_utilization': kept / computed.rows,
      'activated_flops_per_token': active * ffn.flops_per_row,
      'computed_flops_per_token': jnp.asarray(
          computed.rows * ffn.flops_per_row / tokens.shape[0], jnp.float32),
      # 1.0 / 0.0 flags: lets the trainer name the layer where NaN/Inf first appears.
      'input_finite': jnp.all(jnp.isfinite(x)).astype(jnp.float32),
      'router_finite': jnp.all(jnp.isfinite(route.weights)).astype(jnp.float32),
      'output_finite': jnp.all(jnp.isfinite(y)).astype(jnp.float32),
  }
  record = RoutingRecord(
      tokens_per_expert=routed_per_expert,
      unrouted_count=unrouted.sum(dtype=jnp.int32),
      unrouted_input_sum=jnp.where(unrouted[:, None], routing.upcast(tokens), 0.0).sum(0),
      dropped_pairs=computed.num_dropped.astype(jnp.int32),
      num_tokens=(jnp.asarray(tokens.shape[0], jnp.int32) if valid is None
                  else valid.sum(dtype=jnp.int32)))
  return metrics, record


def _token_mean(values: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
  if valid is None:
    return values.mean()
  return jnp.where(valid, values, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(values.dtype)
