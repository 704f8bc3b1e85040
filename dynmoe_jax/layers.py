"""The MoE linen module: router + fixed-capacity dispatch + stacked expert FFNs.

Shape letters: T tokens, D width, F expert hidden width, E experts, C capacity.
Every parameter carries logical axis names ('expert', 'embed', 'mlp'); the
rules mapping them to mesh axes live in `dynmoe_jax.sharding`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax import losses
from dynmoe_jax import routing
from dynmoe_jax import sharding

ROUTERS = ('top_any', 'top_k', 'top_p', 'adaptive_k', 'expert_choice')
DISPATCH_IMPLS = ('sort', 'einsum', 'ragged', 'all_experts', 'shard_map_a2a')
ACTIVATIONS: Dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': nn.gelu, 'relu': nn.relu, 'silu': nn.silu, 'swish': nn.swish}

# Logical names of the dispatched activations, so GSPMD places each expert's
# buffer on the device that owns the expert (the all-to-all).
DISPATCHED_AXES = ('expert', 'expert_capacity', 'embed')


@flax.struct.dataclass
class RoutingRecord:
  """What adaptive training needs from one forward pass of one layer."""
  tokens_per_expert: jax.Array   # int32[E], routed pairs per expert (before capacity)
  unrouted_count: jax.Array      # int32[], tokens that activated no expert
  unrouted_input_sum: jax.Array  # float32[D], sum of router inputs of those tokens


@flax.struct.dataclass
class MoEAux:
  loss: jax.Array                # weighted sum of this layer's auxiliary losses
  metrics: Dict[str, jax.Array]  # 'active_experts', 'dropped_fraction', 'expert_load', ...
  record: RoutingRecord


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
    router: one of ROUTERS.
    k: experts per token for 'top_k'; also the default `expected_k` that sizes
      capacity for the dynamic routers, and the average experts per token in
      'expert_choice' (each expert takes ceil(T·k/E) tokens).
    p: top-p threshold in (0, 1].
    max_k: cap on experts per token for 'top_p' (None = E) and the largest K for
      'adaptive_k' (None = k).
    expected_k: experts per token assumed when sizing capacity (None = k).
    capacity_factor / eval_capacity_factor: slots per expert relative to the
      expected load, in training / evaluation.
    capacity_multiple_of: capacity is rounded up to a multiple of this.
    dispatch_impl: one of DISPATCH_IMPLS. 'ragged' is dropless; 'all_experts'
      runs every expert on every token (the naive reference, no drops).
    priority: 'score' keeps the most confident pairs when an expert overflows;
      'index' keeps earlier tokens.
    activation: key of ACTIVATIONS. glu: gated FFN act(x·wi) * (x·wi_gate).
    dtype: compute dtype of the expert FFNs (routing is at least float32).
    param_dtype: parameter dtype.
    normalize_top_k: renormalise top-k weights to sum to 1.
    top_any_scale: temperature of top-any's cosine scores.
    *_weight: auxiliary loss weights; a loss whose weight is 0 is not computed.
  """
  num_experts: int
  hidden_dim: int
  router: str = 'top_any'
  k: int = 2
  p: float = 0.4
  max_k: Optional[int] = None
  expected_k: Optional[float] = None
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  capacity_multiple_of: int = 8
  dispatch_impl: str = 'sort'
  priority: str = 'score'
  activation: str = 'gelu'
  glu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  normalize_top_k: bool = True
  top_any_scale: float = 1.0
  diversity_weight: float = 0.01
  simplicity_weight: float = 0.01
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3
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
    if self.router in ('top_k', 'expert_choice') and not 1 <= self.k <= E:
      raise ValueError(f'MoE.k={self.k} must be in [1, num_experts={E}] for router={self.router!r}')
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f'MoE.p={self.p} must be in (0, 1]')
    if self.max_k is not None and not 1 <= self.max_k <= E:
      raise ValueError(f'MoE.max_k={self.max_k} must be in [1, num_experts={E}]')
    if self.router == 'adaptive_k' and self.max_k is None and not 1 <= self.k <= E:
      raise ValueError(f'MoE.k={self.k} (the default max_k of adaptive_k) must be in [1, {E}]')
    for name in ('capacity_factor', 'eval_capacity_factor'):
      if getattr(self, name) <= 0:
        raise ValueError(f'MoE.{name} must be > 0, got {getattr(self, name)}')
    if self.expected_k is not None and self.expected_k <= 0:
      raise ValueError(f'MoE.expected_k must be > 0, got {self.expected_k}')
    if self.priority not in ('score', 'index'):
      raise ValueError(f"MoE.priority must be 'score' or 'index', got {self.priority!r}")
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

  def _route(self, tokens, training, token_importance):
    E = self.num_experts
    num_tokens, width = tokens.shape
    if self.router == 'top_any':
      gate_embeddings = self._param('gate_embeddings', nn.initializers.orthogonal(),
                                    (E, width), ('expert', 'embed'))
      thresholds = self._param('thresholds', nn.initializers.zeros, (E,), ('expert',))
      out = routing.top_any(tokens, gate_embeddings, thresholds, scale=self.top_any_scale,
                            training=training)
      return out, None, gate_embeddings
    kernel = self._param('router_kernel', self.router_init, (width, E), ('embed', 'expert'))
    logits = routing.upcast(tokens) @ routing.upcast(kernel)
    if self.router == 'top_k':
      out = routing.top_k(logits, self.k, normalize=self.normalize_top_k)
    elif self.router == 'top_p':
      out = routing.top_p(logits, self.p, self.max_k)
    elif self.router == 'adaptive_k':
      if token_importance is None:
        raise ValueError("MoE(router='adaptive_k') needs token_importance (from attention)")
      k_per_token = routing.importance_to_k(token_importance, self._adaptive_max_k)
      out = routing.adaptive_k(logits, k_per_token.reshape(num_tokens), self._adaptive_max_k)
    else:
      capacity = routing.expert_choice_capacity(num_tokens, E, self.k)
      out = routing.expert_choice(logits, capacity)
    return out, logits, None

  @property
  def _adaptive_max_k(self) -> int:
    return self.max_k if self.max_k is not None else self.k

  def _pairs_per_token(self) -> Optional[int]:
    """Most experts a token can be routed to: bounds the sorted pair list."""
    if self.router == 'top_k':
      return self.k
    if self.router == 'adaptive_k':
      return self._adaptive_max_k
    if self.router == 'top_p':
      return self.max_k
    return None

  def _capacity(self, num_tokens: int, training: bool) -> int:
    factor = self.capacity_factor if training else self.eval_capacity_factor
    if self.router == 'expert_choice':
      # Each expert already picked exactly this many tokens: nothing to drop.
      return routing.expert_choice_capacity(num_tokens, self.num_experts, self.k)
    expected = self.expected_k if self.expected_k is not None else self.k
    if self.router == 'adaptive_k' and self.expected_k is None:
      expected = self._adaptive_max_k
    return dispatch_lib.expert_capacity(num_tokens, self.num_experts, factor, expected,
                                        self.capacity_multiple_of)

  def _expert_params(self, width):
    E, F = self.num_experts, self.hidden_dim
    wi = self._param('wi', self.kernel_init, (E, width, F), ('expert', 'embed', 'mlp'))
    wi_gate = (self._param('wi_gate', self.kernel_init, (E, width, F), ('expert', 'embed', 'mlp'))
               if self.glu else None)
    wo = self._param('wo', self.kernel_init, (E, F, width), ('expert', 'mlp', 'embed'))
    cast = lambda w: None if w is None else w.astype(self.dtype)
    return cast(wi), cast(wi_gate), cast(wo)

  def _ffn_capacity(self, expert_inputs, wi, wi_gate, wo):
    act = ACTIVATIONS[self.activation]
    with jax.named_scope('expert_wi'):
      h = act(jnp.einsum('ecd,edf->ecf', expert_inputs, wi))
      if wi_gate is not None:
        h = h * jnp.einsum('ecd,edf->ecf', expert_inputs, wi_gate)
    with jax.named_scope('expert_wo'):
      return jnp.einsum('ecf,efd->ecd', h, wo)

  def _ffn_ragged(self, sorted_inputs, group_sizes, wi, wi_gate, wo):
    act = ACTIVATIONS[self.activation]
    h = act(jax.lax.ragged_dot(sorted_inputs, wi, group_sizes))
    if wi_gate is not None:
      h = h * jax.lax.ragged_dot(sorted_inputs, wi_gate, group_sizes)
    return jax.lax.ragged_dot(h, wo, group_sizes)

  @nn.compact
  def __call__(self, x: jax.Array, training: bool = False,
               token_importance: Optional[jax.Array] = None):
    """x [..., D] -> (y [..., D], MoEAux). `token_importance` [...] for 'adaptive_k'."""
    self._validate()
    self._check_width(x.shape[-1])
    lead_shape, width = x.shape[:-1], x.shape[-1]
    if token_importance is not None:
      chex.assert_shape(token_importance, lead_shape)
    tokens = x.reshape(-1, width)
    num_tokens, E = tokens.shape[0], self.num_experts

    with jax.named_scope('router'):
      route, logits, gate_embeddings = self._route(tokens, training, token_importance)
    wi, wi_gate, wo = self._expert_params(width)
    expert_tokens = tokens.astype(self.dtype)

    impl = self.dispatch_impl
    if (impl == 'shard_map_a2a' and self.is_initializing()
        and jax.sharding.get_abstract_mesh().empty):
      impl = 'sort'  # same parameters; init needs no mesh, apply does
    if impl in ('sort', 'einsum'):
      capacity = self._capacity(num_tokens, training)
      priority = route.scores if self.priority == 'score' else None
      expert_inputs, state = dispatch_lib.dispatch(
          expert_tokens, route.mask, capacity, priority=priority, impl=impl,
          max_k=self._pairs_per_token())
      expert_inputs = sharding.constrain(expert_inputs, DISPATCHED_AXES)
      chex.assert_shape(expert_inputs, (E, capacity, width))
      expert_outputs = self._ffn_capacity(expert_inputs, wi, wi_gate, wo)
      expert_outputs = sharding.constrain(expert_outputs, DISPATCHED_AXES)
      y = dispatch_lib.combine(expert_outputs, route.weights, state)
      num_routed, num_dropped = state.num_routed, state.num_dropped
    elif impl == 'shard_map_a2a':
      params = [w for w in (wi, wi_gate, wo) if w is not None]

      def local_experts(inputs, *local_params):  # [S, E_local, C, D]
        lwi, lwo = local_params[0], local_params[-1]
        lwg = local_params[1] if wi_gate is not None else None
        shards, local_e, cap, _ = inputs.shape
        flat = inputs.transpose(1, 0, 2, 3).reshape(local_e, shards * cap, width)
        out = self._ffn_capacity(flat, lwi, lwg, lwo)
        return out.reshape(local_e, shards, cap, width).transpose(1, 0, 2, 3)

      y, num_routed, num_dropped = sharding.expert_parallel_ffn(
          expert_tokens, route.mask, route.weights,
          route.scores if self.priority == 'score' else None, local_experts, params,
          lambda local_tokens: self._capacity(local_tokens, training))
      y = y.astype(self.dtype)
    elif impl == 'ragged':
      sorted_inputs, state = dispatch_lib.ragged_dispatch(
          expert_tokens, route.mask, max_k=self._pairs_per_token())
      sorted_outputs = self._ffn_ragged(sorted_inputs, state.group_sizes, wi, wi_gate, wo)
      y = dispatch_lib.ragged_combine(sorted_outputs, route.weights, state)
      num_routed, num_dropped = state.num_routed, state.num_dropped
    else:  # all_experts: every expert on every token, weighted by the (masked) router weights
      expert_inputs = jnp.broadcast_to(expert_tokens[None], (E, num_tokens, width))
      expert_outputs = self._ffn_capacity(expert_inputs, wi, wi_gate, wo)
      y = jnp.einsum('te,etd->td', route.weights,
                     routing.upcast(expert_outputs)).astype(self.dtype)
      num_routed, num_dropped = route.mask.sum(dtype=jnp.int32), jnp.zeros((), jnp.int32)

    aux_loss, loss_metrics = self._aux_losses(route, logits, gate_embeddings)
    routed_per_expert = route.mask.sum(axis=0, dtype=jnp.int32)
    unrouted = route.num_active == 0
    metrics = {
        'active_experts': route.num_active.astype(jnp.float32).mean(),
        'dropped_fraction': num_dropped / jnp.maximum(num_routed, 1).astype(jnp.float32),
        'expert_load': routed_per_expert / jnp.maximum(routed_per_expert.sum(), 1).astype(
            jnp.float32),
        'unrouted_fraction': unrouted.astype(jnp.float32).mean(),
        # 1.0 / 0.0 flags: lets the trainer name the layer where NaN/Inf first appears.
        'input_finite': jnp.all(jnp.isfinite(x)).astype(jnp.float32),
        'router_finite': jnp.all(jnp.isfinite(route.weights)).astype(jnp.float32),
        'output_finite': jnp.all(jnp.isfinite(y)).astype(jnp.float32),
        **loss_metrics,
    }
    record = RoutingRecord(
        tokens_per_expert=routed_per_expert,
        unrouted_count=unrouted.sum(dtype=jnp.int32),
        unrouted_input_sum=jnp.where(unrouted[:, None], routing.upcast(tokens), 0.0).sum(0))
    # Per-token expert counts for analysis (harder inputs, more experts?); stored only
    # when the caller makes 'intermediates' mutable, otherwise a no-op.
    self.sow('intermediates', 'active_experts_per_token', route.num_active.reshape(lead_shape))
    y = y.reshape(*lead_shape, width).astype(x.dtype)
    return y, MoEAux(loss=aux_loss, metrics=metrics, record=record)

  def _aux_losses(self, route: routing.RouterOutput, logits, gate_embeddings):
    terms = {}
    if self.router == 'top_any':
      terms['diversity'] = (self.diversity_weight, lambda: losses.diversity(gate_embeddings))
      terms['simplicity'] = (self.simplicity_weight, lambda: losses.simplicity(gate_embeddings))
    else:
      if self.router != 'expert_choice':
        terms['load_balance'] = (self.load_balance_weight,
                                 lambda: losses.load_balance(route.scores, route.mask))
      terms['z_loss'] = (self.z_loss_weight, lambda: losses.z_loss(logits))
      if self.router == 'top_p':
        terms['entropy'] = (self.entropy_weight, lambda: losses.router_entropy(route.scores))
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, (weight, fn) in terms.items():
      if weight:
        value = fn()
        metrics[name] = value
        total = total + weight * value
    return total, metrics
