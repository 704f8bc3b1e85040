"""Stacked expert FFNs and the ways to run them on routed tokens.

Shape letters: T tokens, D width, F expert hidden width, E experts, C capacity.
Each entry of `PATHS` takes the tokens, the router's decision and the experts and
returns the combined output with its routed/dropped pair counts; `layers.MoE`
looks its `dispatch_impl` up here and never branches on it:

  'sort' / 'einsum'       fixed-capacity buffers [E, C, D] (see `dispatch`)
  'ragged'                dropless grouped matmul over expert-sorted pairs
  'shard_map_a2a'         explicit expert parallelism (see `expert_parallel`)
  'all_experts_reference' every expert on every token, weighted by the router:
                          E times the work, never drops; the correctness oracle
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import chex
import jax
import jax.numpy as jnp

from dynmoe_jax import capacity as capacity_lib
from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax import expert_parallel, grouped_matmul, routing, sharding

# Logical names of the dispatched activations, so GSPMD places each expert's
# buffer on the device that owns the expert (the all-to-all).
DISPATCHED_AXES = ('expert', 'expert_capacity', 'embed')


@dataclasses.dataclass(frozen=True)
class ExpertFFN:
  """E stacked FFNs: wi, wi_gate (gated FFN, or None) [E, D, F] and wo [E, F, D].
  `ragged_dot` is the grouped matmul of the ragged path (see `grouped_matmul`)."""
  wi: jax.Array
  wi_gate: Optional[jax.Array]
  wo: jax.Array
  activation: Callable[[jax.Array], jax.Array]
  ragged_dot: grouped_matmul.GroupedMatmul = grouped_matmul.get('auto')

  @property
  def weights(self):
    return tuple(w for w in (self.wi, self.wi_gate, self.wo) if w is not None)

  def with_weights(self, *weights) -> 'ExpertFFN':
    """The same FFN over other (e.g. device-local) weights, in `weights` order."""
    wi, wo = weights[0], weights[-1]
    return dataclasses.replace(self, wi=wi, wo=wo,
                               wi_gate=weights[1] if self.wi_gate is not None else None)

  def on_buffers(self, expert_inputs: jax.Array) -> jax.Array:
    """[E, C, D] -> [E, C, D]."""
    with jax.named_scope('expert_wi'):
      h = self.activation(jnp.einsum('ecd,edf->ecf', expert_inputs, self.wi))
      if self.wi_gate is not None:
        h = h * jnp.einsum('ecd,edf->ecf', expert_inputs, self.wi_gate)
    with jax.named_scope('expert_wo'):
      return jnp.einsum('ecf,efd->ecd', h, self.wo)

  @property
  def flops_per_row(self) -> int:
    """Forward FLOPs of one token through one expert: 2·D·F per matmul."""
    width, hidden = self.wi.shape[-2], self.wi.shape[-1]
    return 2 * width * hidden * len(self.weights)

  def on_sorted(self, sorted_inputs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[N, D] pairs sorted by expert, group_sizes [E] -> [N, D]."""
    with jax.named_scope('expert_wi'):
      h = self.activation(self.ragged_dot(sorted_inputs, self.wi, group_sizes))
      if self.wi_gate is not None:
        h = h * self.ragged_dot(sorted_inputs, self.wi_gate, group_sizes)
    with jax.named_scope('expert_wo'):
      return self.ragged_dot(h, self.wo, group_sizes)


@dataclasses.dataclass(frozen=True)
class Routed:
  """What every path needs besides the experts."""
  tokens: jax.Array                 # [T, D] in the experts' compute dtype
  route: routing.RouterOutput
  priority: Optional[jax.Array]     # [T, E] float or int32, or None (lower token first)
  max_k: Optional[int]              # most experts per token (bounds the pair list)
  capacity: Callable[[int], int]    # tokens (of a routing group) -> slots per expert
  group_size: Optional[int] = None  # tokens per routing group; None: one group


@dataclasses.dataclass(frozen=True)
class Computed:
  output: jax.Array      # [T, D]
  num_routed: jax.Array  # int32, routed (token, expert) pairs
  num_dropped: jax.Array  # int32, pairs that got no slot
  rows: int              # expert-FFN rows computed, padding included (static)
  capacity: int = 0      # slots per expert over the whole batch, all token shards
  #                        together (0: a path without capacity)


def _capacity_path(impl: str):
  def run(routed: Routed, ffn: ExpertFFN) -> Computed:
    num_tokens, width = routed.tokens.shape
    capacity, groups = capacity_lib.group_slots(routed.capacity, num_tokens, routed.group_size)
    expert_inputs, state = dispatch_lib.dispatch_grouped(
        routed.tokens, routed.route.mask, capacity, routed.group_size,
        priority=routed.priority, impl=impl, max_k=routed.max_k)
    expert_inputs = sharding.constrain(expert_inputs, DISPATCHED_AXES)
    chex.assert_shape(expert_inputs, (routed.route.mask.shape[1], groups * capacity, width))
    expert_outputs = sharding.constrain(ffn.on_buffers(expert_inputs), DISPATCHED_AXES)
    return Computed(state.combine(expert_outputs, routed.route.weights), state.num_routed,
                    state.num_dropped, rows=expert_inputs.shape[0] * groups * capacity,
                    capacity=groups * capacity)
  return run


def _ragged(routed: Routed, ffn: ExpertFFN) -> Computed:
  sorted_inputs, state = dispatch_lib.ragged_dispatch(routed.tokens, routed.route.mask,
                                                      max_k=routed.max_k)
  sorted_outputs = ffn.on_sorted(sorted_inputs, state.group_sizes)
  # the pair list is what the grouped matmul multiplies (its unused tail included)
  return Computed(state.combine(sorted_outputs, routed.route.weights), state.num_routed,
                  state.num_dropped, rows=sorted_inputs.shape[0])


def _shard_map_a2a(routed: Routed, ffn: ExpertFFN) -> Computed:
  width = routed.tokens.shape[1]

  def local_experts(inputs, *local_weights):  # [S, E_local, C, D]
    shards, local_e, cap, _ = inputs.shape
    flat = inputs.transpose(1, 0, 2, 3).reshape(local_e, shards * cap, width)
    out = ffn.with_weights(*local_weights).on_buffers(flat)
    return out.reshape(local_e, shards, cap, width).transpose(1, 0, 2, 3)

  y, num_routed, num_dropped, rows, capacity = expert_parallel.expert_parallel_ffn(
      routed.tokens, routed.route.mask, routed.route.weights, routed.priority, local_experts,
      ffn.weights, routed.capacity, routed.group_size)
  return Computed(y.astype(routed.tokens.dtype), num_routed, num_dropped, rows=rows,
                  capacity=capacity)


def _all_experts_reference(routed: Routed, ffn: ExpertFFN) -> Computed:
  num_tokens, width = routed.tokens.shape
  num_experts = routed.route.mask.shape[1]
  expert_inputs = jnp.broadcast_to(routed.tokens[None], (num_experts, num_tokens, width))
  expert_outputs = ffn.on_buffers(expert_inputs)
  y = jnp.einsum('te,etd->td', routed.route.weights, routing.upcast(expert_outputs))
  return Computed(y.astype(routed.tokens.dtype), routed.route.mask.sum(dtype=jnp.int32),
                  jnp.zeros((), jnp.int32), rows=num_experts * num_tokens)


PATHS: Dict[str, Callable[[Routed, ExpertFFN], Computed]] = {
    'sort': _capacity_path('sort'),
    'einsum': _capacity_path('einsum'),
    'ragged': _ragged,
    'all_experts_reference': _all_experts_reference,
    'shard_map_a2a': _shard_map_a2a,
}