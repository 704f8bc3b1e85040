"""The MoE linen module: a router from `routers` + an expert path from `experts`.

Shape letters: T tokens, D width, F expert hidden width, E experts, C capacity.
Every parameter carries logical axis names ('expert', 'embed', 'mlp'); the
rules mapping them to mesh axes live in `dynmoe_jax.sharding`. The module holds
no router- or dispatch-specific branch: both are looked up by name.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dynmoe_jax import experts, grouped_matmul, routers, routing

ROUTERS = routers.NAMES
DISPATCH_IMPLS = tuple(experts.PATHS)
RAGGED_BACKENDS = grouped_matmul.BACKENDS
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': nn.gelu, 'relu': nn.relu, 'silu': nn.silu, 'swish': nn.swish}
PRIORITIES = ('score', 'index', 'gshard', 'batch')


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
    router: a name in `routers.REGISTRY` (ROUTERS).
    k: experts per token. 'top_k': exactly k. 'expert_choice': k on average (each
      expert takes ceil(T·k/E) tokens). 'adaptive_k': the largest K when max_k is
      unset. Dynamic routers: the experts per token capacity is sized for, unless
      `expected_k` is set.
    p: top-p threshold in (0, 1].
    max_k: cap on experts per token for 'top_p' and 'top_any' (None = E: the pair list
      the sort and ragged paths build is T·max_k long) and the largest K for
      'adaptive_k' (None = k).
    expected_k: experts per token assumed when sizing capacity (None: the router's
      default, see `routers.RouterSpec.expected_k`).
    capacity_factor / eval_capacity_factor: slots per expert relative to the
      expected load, in training / evaluation.
    capacity_multiple_of: capacity is rounded up to a multiple of this.
    capacity: slots per expert, exactly as given (no factor, no rounding to
      capacity_multiple_of), in training and evaluation, for each call, or under
      shard_map_a2a for each token shard, which routes apart. None: the factor rule.
    group_size: tokens per routing group (GShard, flaxformer, V-MoE): capacity, drops,
      priority, expert choice and the auxiliary losses (averaged over groups) are per
      group of this many consecutive tokens; a call's token count (a shard's, under
      shard_map_a2a) must divide into groups. None: one group per call.
    planned_capacity: (slots, tokens): capacity re-planned from recorded routing (the
      trainer's `adaptive.capacity`): `slots` per expert for a training call of `tokens`
      tokens, replacing the capacity-factor rule. A call (or a device's shard) of n tokens
      gets ceil(slots·n/tokens) slots in training and eval_capacity_factor/capacity_factor
      times that in evaluation, rounded up to capacity_multiple_of. None: the rule.
    dispatch_impl: a name in `experts.PATHS` (DISPATCH_IMPLS).
    ragged_backend: the grouped matmul of dispatch_impl='ragged', a name in
      `grouped_matmul.BACKENDS`: 'auto' (megablox on TPU, the Pallas Triton kernel on
      GPU, XLA elsewhere, chosen by the platform the step is lowered for), 'xla',
      'megablox', 'pallas_triton' or 'tokamax'.
    priority: which pairs an overflowing expert keeps: 'score' the most confident,
      'index' the earlier tokens, 'gshard' every first choice before any second choice,
      each by token index, 'batch' the same with each choice by the token's top-1 score
      (V-MoE's batch priority; see routing.choice_priority). None: the router's default
      ('gshard' for top_k, as flaxformer and V-MoE; 'score' for the others).
    activation: key of ACTIVATIONS. glu: gated FFN act(x·wi) * (x·wi_gate).
    dtype: compute dtype of the expert FFNs (routing is at least float32).
    param_dtype: parameter dtype.
    normalize_top_k: renormalise top-k weights to sum to 1; None: only for k >= 2 (at k = 1
      the raw probability, as Switch: see routing.top_k).
    top_any_scale: temperature of top-any's cosine scores and thresholds (it changes the
      gradients, not which experts are active); with `top_any_learned_scale` its initial
      value, learned in log space and capped at `top_any_max_scale` (the reference's
      gated_multi_gate_t: 10, capped at 100).
    top_any_train_fallback: tokens with no active expert take their top-1 by score in
      training too, not only in evaluation (`routing.top_any`).
    top_any_differentiable_normalization: combine weights 1/K with the gradient of the
      normalisation (the reference's Tutel variant); False: K a constant (its DeepSpeed
      variant). Forward values are the same.
    target_experts_per_token: a compute budget (routers whose spec has a
      budget_control): capacity is sized for it, and the trainer adapts the control every
      step (multiplied or divided by budget_rate) so the mean experts per token meets it:
      top-any's efficiency-loss weight, top-p's p; `budget_two_sided` lets top-any's
      weight turn negative below the target, and
      `budget_error_unit` scales each update with the error and `budget_horizon` acts
      on the count predicted that many steps ahead (train.budget).
    *_weight: auxiliary loss weights; a loss whose weight is 0 is not computed.
      Top-any: diversity, simplicity, load_balance (over tokens with an expert) and
      efficiency (mean K / E), the reference's four terms, and optionally gshard_balance
      (GShard's loss on the binary scores, off by default); the others: load_balance,
      z_loss (and entropy for top-p). See `routers.REGISTRY`.
  The defaults are those of `default_config.base_config().model.moe`.
  """
  num_experts: int
  hidden_dim: int
  router: str = 'top_any'
  k: int = 2
  p: float = 0.4
  max_k: Optional[int] = None
  expected_k: Optional[float] = None
  capacity_factor: float = 2.0
  eval_capacity_factor: float = 4.0
  capacity_multiple_of: int = 8
  capacity: Optional[int] = None
  group_size: Optional[int] = None
  planned_capacity: Optional[Tuple[int, int]] = None
  dispatch_impl: str = 'sort'
  ragged_backend: str = 'auto'
  priority: Optional[str] = None
  activation: str = 'gelu'
  glu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  normalize_top_k: Optional[bool] = None
  top_any_scale: float = 1.0
  top_any_learned_scale: bool = False
  top_any_max_scale: float = 100.0
  top_any_train_fallback: bool = False
  top_any_differentiable_normalization: bool = False
  diversity_weight: float = 0.01
  simplicity_weight: float = 0.01
  load_balance_weight: float = 0.01
  efficiency_weight: float = 0.01
  gshard_balance_weight: float = 0.0
  z_loss_weight: float = 1e-3
  target_experts_per_token: Optional[float] = None
  budget_rate: float = 1.05
  budget_two_sided: bool = False
  budget_error_unit: Optional[float] = 0.1
  budget_horizon: Optional[float] = 20.0
  entropy_weight: float = 1e-4
  kernel_init: Callable[..., jax.Array] = stacked_kernel_init()
  router_init: Callable[..., jax.Array] = nn.initializers.normal(0.02)

  def _validate(self):
    E = self.num_experts
    if not isinstance(E, int) or E < 1:
      raise ValueError(f'MoE.num_experts must be an int >= 1, got {E!r}')
    if self.hidden_dim < 1:
      raise ValueError(f'MoE.hidden_dim must be >= 1, got {self.hidden_dim}')
    if self.router not in ROUTERS:
      raise ValueError(f'MoE.router={self.router!r} is not one of {ROUTERS}')
    if self.dispatch_impl not in DISPATCH_IMPLS:
      raise ValueError(f'MoE.dispatch_impl={self.dispatch_impl!r} is not one of {DISPATCH_IMPLS}')
    if self.ragged_backend not in RAGGED_BACKENDS:
      raise ValueError(f'MoE.ragged_backend={self.ragged_backend!r} is not one of '
                       f'{RAGGED_BACKENDS}')
    for field, message in routers.check(self, E):
      raise ValueError(f'MoE.{field}={getattr(self, field)!r} {message} '
                       f'(router={self.router!r}, num_experts={E})')
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f'MoE.p={self.p} must be in (0, 1]')
    for name in ('capacity_factor', 'eval_capacity_factor'):
      if getattr(self, name) <= 0:
        raise ValueError(f'MoE.{name} must be > 0, got {getattr(self, name)}')
    if self.planned_capacity is not None and (
        len(self.planned_capacity) != 2 or min(self.planned_capacity) < 1):
      raise ValueError(f'MoE.planned_capacity must be (slots >= 1, tokens >= 1), got '
                       f'{self.planned_capacity!r}')
    if self.capacity is not None:
      if not isinstance(self.capacity, int) or isinstance(self.capacity, bool) or \
          self.capacity < 1:
        raise ValueError(f'MoE.capacity must be an int >= 1 (slots per expert), got '
                         f'{self.capacity!r}')
      if self.planned_capacity is not None:
        raise ValueError(f'MoE.capacity={self.capacity} fixes the slots per expert and '
                         f'planned_capacity={self.planned_capacity} re-plans them: set one')
    if self.group_size is not None and (not isinstance(self.group_size, int) or
                                        isinstance(self.group_size, bool) or
                                        self.group_size < 1):
      raise ValueError(f'MoE.group_size must be an int >= 1 (tokens per routing group), got '
                       f'{self.group_size!r}')
    if self.expected_k is not None and self.expected_k <= 0:
      raise ValueError(f'MoE.expected_k must be > 0, got {self.expected_k}')
    if self.priority is not None and self.priority not in PRIORITIES:
      raise ValueError(f'MoE.priority must be one of {PRIORITIES}, got {self.priority!r}')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'MoE.activation={self.activation!r} is not one of {tuple(ACTIVATIONS)}')

  def _param(self, name, init, shape, axes):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

  def _check_width(self, width: int):
    if self.has_variable('params', 'wo'):
      expected = jnp.shape(nn.meta.unbox(self.get_variable('params', 'wo')))[-1]
      if width != expected:
        raise ValueError(f'MoE: input last dimension {width} != model width {expected} '
                         'the layer was initialised with')

  def _priority(self, route, spec) -> Optional[jax.Array]:
    order = self.priority or spec.default_priority
    if order == 'score':
      return route.scores
    if order == 'index':
      return None
    order_of = lambda scores, mask: routing.choice_priority(scores, mask, order)
    return routing.per_group(order_of, self.group_size)(route.scores, route.mask)

  def _aux_loss(self, route, logits, router_params, controls):
    """The router's auxiliary losses and their metrics, averaged over routing groups."""
    losses = lambda r, l: routers.aux_loss(self, r, l, router_params, controls)
    if self.group_size is None:
      return losses(route, logits)
    total, metrics = routing.per_group(losses, self.group_size, stacked=True)(route, logits)
    return total.mean(), {k: v.mean() for k, v in metrics.items()}

  def slots_per_expert(self, num_tokens: int, training: bool) -> int:
    """Slots per expert for a call of `num_tokens` tokens (a Python int)."""
    return routers.capacity(self, num_tokens, self.num_experts, training)

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
    spec = routers.get(self.router)
    if self.group_size is not None and tokens.shape[0] % self.group_size:
      raise ValueError(f'MoE: {tokens.shape[0]} tokens do not split into routing groups of '
                       f'group_size={self.group_size}')

    with jax.named_scope('router'):
      route, logits, router_params = spec.route(self, tokens, training, token_importance,
                                                  controls or {})
    if valid is not None:
      route = routing.mask_tokens(route, valid)
    ffn = self._experts(width)

    impl = self.dispatch_impl
    if impl == 'shard_map_a2a' and self.is_initializing():
      impl = 'sort'  # same parameters; init runs on one example that need not split over a mesh
    routed = experts.Routed(
        tokens=tokens.astype(self.dtype), route=route,
        priority=self._priority(route, spec),
        max_k=spec.pairs_per_token(self),
        capacity=lambda num_tokens: self.slots_per_expert(num_tokens, training),
        group_size=self.group_size)
    computed = experts.PATHS[impl](routed, ffn)
    y = computed.output

    aux_loss, loss_metrics = self._aux_loss(route, logits, router_params, controls)
    routed_per_expert = route.mask.sum(axis=0, dtype=jnp.int32)
    unrouted = routing.unrouted(route)
    if valid is not None:
      unrouted = unrouted & valid
    num_tokens = (jnp.asarray(tokens.shape[0], jnp.float32) if valid is None
                  else valid.sum(dtype=jnp.float32))
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
        **loss_metrics,
    }
    record = RoutingRecord(
        tokens_per_expert=routed_per_expert,
        unrouted_count=unrouted.sum(dtype=jnp.int32),
        unrouted_input_sum=jnp.where(unrouted[:, None], routing.upcast(tokens), 0.0).sum(0),
        dropped_pairs=computed.num_dropped.astype(jnp.int32),
        num_tokens=(jnp.asarray(tokens.shape[0], jnp.int32) if valid is None
                    else valid.sum(dtype=jnp.int32)))
    # Per-token expert counts for analysis (harder inputs, more experts?); stored only
    # when the caller makes 'intermediates' mutable, otherwise a no-op.
    self.sow('intermediates', 'active_experts_per_token', route.num_active.reshape(lead_shape),
             init_fn=lambda: None, reduce_fn=lambda _, new: new)
    y = y.reshape(*lead_shape, width).astype(x.dtype)
    return y, MoEAux(loss=aux_loss, metrics=metrics, record=record, num_tokens=num_tokens,
                     total_tokens=jnp.asarray(tokens.shape[0], jnp.float32),
                     rows=jnp.asarray(computed.rows, jnp.float32))


def _token_mean(values: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
  if valid is None:
    return values.mean()
  return jnp.where(valid, values, 0.0).sum() / jnp.maximum(valid.sum(), 1).astype(values.dtype)
