"""Fixed-capacity token dispatch and combine, with static shapes under jit.

Shape letters: T tokens, D width, E experts, C capacity (slots per expert),
K routed experts a token may have (the pair list is T*K long).

Three implementations:
  * 'sort' (default): routed (token, expert) pairs are sorted by expert and
    priority, slot positions come from group offsets, tokens are gathered into
    [E, C, D] and scattered back. Memory O(T*K + E*C*D); no [T, E, C] tensor.
  * 'einsum': the GShard one-hot dispatch tensor [T, E, C]. O(T*E*C) memory;
    kept as the reference and because it maps onto TPU matmul units.
  * 'ragged': dropless. Pairs sorted by expert feed `jax.lax.ragged_dot`
    (see `ragged_dispatch`); no capacity, nothing dropped.

Pairs beyond an expert's capacity are dropped and always counted: every state
carries `dropped` bool[T, E] and `num_dropped`, never a silent loss.
Priority: by default lower token index first; pass `priority` [T, E] (router scores to
keep the most confident pairs, or routing.choice_priority's int32 orders). Ties go to the lower
token index in every implementation, so 'sort' and 'einsum' drop the same pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp

from dynmoe_jax.routing import per_group, upcast


def _accumulator(weights: jax.Array, outputs: jax.Array):
  """The combine sum runs in at least float32."""
  return jnp.promote_types(jnp.promote_types(weights.dtype, outputs.dtype), jnp.float32)


@flax.struct.dataclass
class SortDispatchState:
  """slot_token: int32[E, C], the token in each slot (T marks an empty slot)."""
  slot_token: jax.Array
  dropped: jax.Array      # bool[T, E], routed pairs that got no slot
  num_routed: jax.Array   # int32 scalar
  num_dropped: jax.Array  # int32 scalar

  def combine(self, expert_outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """[E, C, D] -> [T, D]: scatter-add each slot's weighted output to its token."""
    acc = _accumulator(weights, expert_outputs)
    num_tokens, num_experts = weights.shape
    dim = expert_outputs.shape[-1]
    chex.assert_shape(expert_outputs, (num_experts, self.slot_token.shape[1], dim))
    padded_weights = jnp.concatenate([weights.astype(acc), jnp.zeros((1, num_experts), acc)],
                                     axis=0)
    slot_weight = padded_weights[self.slot_token, jnp.arange(num_experts)[:, None]]
    contributions = expert_outputs.astype(acc) * slot_weight[..., None]
    out = jnp.zeros((num_tokens + 1, dim), acc).at[self.slot_token.reshape(-1)].add(
        contributions.reshape(-1, dim))
    return out[:num_tokens].astype(expert_outputs.dtype)


@flax.struct.dataclass
class EinsumDispatchState:
  """dispatch_tensor: bool[T, E, C], one-hot slot of each kept pair."""
  dispatch_tensor: jax.Array
  dropped: jax.Array
  num_routed: jax.Array
  num_dropped: jax.Array

  def combine(self, expert_outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """[E, C, D] -> [T, D] through the weighted one-hot combine tensor."""
    acc = _accumulator(weights, expert_outputs)
    combine_tensor = self.dispatch_tensor.astype(acc) * weights.astype(acc)[..., None]
    out = jnp.einsum('tec,ecd->td', combine_tensor, expert_outputs.astype(acc))
    return out.astype(expert_outputs.dtype)


@flax.struct.dataclass
class RaggedState:
  """Routed pairs sorted by expert (invalid pairs last, expert id E)."""
  sorted_token: jax.Array   # int32[N]
  sorted_expert: jax.Array  # int32[N]
  group_sizes: jax.Array    # int32[E]
  dropped: jax.Array        # bool[T, E]; only pairs beyond max_k
  num_routed: jax.Array
  num_dropped: jax.Array

  def combine(self, sorted_outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """[T*K, D] per-pair expert outputs -> [T, D] weighted sum per token."""
    num_tokens, num_experts = weights.shape
    valid = self.sorted_expert < num_experts
    acc = _accumulator(weights, sorted_outputs)
    pair_weight = weights.astype(acc)[
        self.sorted_token, jnp.minimum(self.sorted_expert, num_experts - 1)]
    pair_weight = jnp.where(valid, pair_weight, 0.0)
    contributions = sorted_outputs.astype(acc) * pair_weight[:, None]
    out = jnp.zeros((num_tokens, sorted_outputs.shape[-1]), acc).at[
        self.sorted_token].add(contributions)
    return out.astype(sorted_outputs.dtype)


DispatchState = Union[SortDispatchState, EinsumDispatchState]


def _check(tokens: jax.Array, mask: jax.Array, priority: Optional[jax.Array]):
  if tokens.ndim != 2 or mask.ndim != 2:
    raise ValueError(f'dispatch: tokens [T, D] and mask [T, E] expected, got {tokens.shape}, '
                     f'{mask.shape}')
  if tokens.shape[0] != mask.shape[0]:
    raise ValueError(f'dispatch: {tokens.shape[0]} tokens but mask has {mask.shape[0]} rows')
  if priority is not None:
    chex.assert_equal_shape([priority, mask])


def _routed_pairs(mask: jax.Array, max_k: Optional[int]):
  """The routed experts of each token as a [T, K] list, ascending expert id.

  Returns expert_ids int32[T, K] (E where the slot is unused) and K.
  """
  num_tokens, num_experts = mask.shape
  k = num_experts if max_k is None else max_k
  if not 1 <= k <= num_experts:
    raise ValueError(f'dispatch: max_k={max_k} must be in [1, num_experts={num_experts}]')
  expert_iota = jnp.arange(num_experts, dtype=jnp.int32)
  if k == num_experts:
    ids = jnp.where(mask, expert_iota[None, :], num_experts)
  else:
    # Routed experts first, lowest id first; a token with more than K routed
    # experts loses the extras, and they are reported as dropped. Each routed expert's
    # rank among its token's routed experts picks its column: O(T·E·K) compares, where a
    # top_k over [T, E] sorts every row, a cost that grew with E
    # (experiments/bench_scaling.py times the pair list at E=8 and E=64).
    rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    column = (rank[:, :, None] == jnp.arange(k, dtype=jnp.int32)) & mask[:, :, None]
    ids = jnp.where(column.any(axis=1),
                    jnp.sum(jnp.where(column, expert_iota[None, :, None], 0), axis=1),
                    num_experts)
  return ids.astype(jnp.int32), k


def _priority_values(priority: jax.Array) -> jax.Array:
  # integer priorities (routing.choice_priority) stay integers: exact past 2**24 pairs
  return priority if jnp.issubdtype(priority.dtype, jnp.integer) else upcast(priority)


def _sort_pairs(mask: jax.Array, priority: Optional[jax.Array], max_k: Optional[int]):
  """Sort routed pairs by (expert, priority desc, token) -> sorted expert/token ids,
  each pair's position within its expert, and per-expert group sizes."""
  num_tokens, num_experts = mask.shape
  ids, k = _routed_pairs(mask, max_k)
  flat_expert = ids.reshape(-1)
  flat_token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
  if priority is None:
    secondary = flat_token
  else:
    gathered = jnp.take_along_axis(_priority_values(priority),
                                   jnp.minimum(ids, num_experts - 1), axis=1)
    secondary = -gathered.reshape(-1)
  sorted_expert, _, sorted_token = jax.lax.sort(
      (flat_expert, secondary, flat_token), num_keys=2, is_stable=True)
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat_expert].add(1)
  starts = jnp.cumsum(counts) - counts
  position = jnp.arange(flat_expert.shape[0], dtype=jnp.int32) - starts[sorted_expert]
  return sorted_expert, sorted_token, position, counts[:num_experts]


def _drop_stats(mask: jax.Array, kept: jax.Array):
  dropped = mask & ~kept
  return dropped, mask.sum(dtype=jnp.int32), dropped.sum(dtype=jnp.int32)


def dispatch(tokens: jax.Array, mask: jax.Array, capacity: int, *,
             priority: Optional[jax.Array] = None, impl: str = 'sort',
             max_k: Optional[int] = None):
  """Gather routed tokens into fixed-capacity expert buffers.

  Args:
    tokens: [T, D].
    mask: bool[T, E] routing mask (RouterOutput.mask).
    capacity: C, slots per expert (Python int).
    priority: optional [T, E], float or int32; higher keeps a pair first when an expert
      overflows.
    impl: 'sort' or 'einsum'.
    max_k: most experts a token can be routed to (sort impl; default E). Pairs
      beyond it are dropped and counted.
  Returns:
    expert_inputs [E, C, D] (empty slots are zeros) and a state for `combine`.
  """
  _check(tokens, mask, priority)
  if not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f'dispatch: capacity must be a Python int >= 1, got {capacity!r}')
  mask = mask.astype(jnp.bool_)
  if impl == 'sort':
    return _dispatch_sort(tokens, mask, capacity, priority, max_k)
  if impl == 'einsum':
    return _dispatch_einsum(tokens, mask, capacity, priority)
  raise ValueError(f"dispatch: impl must be 'sort' or 'einsum', got {impl!r}")


def _dispatch_sort(tokens, mask, capacity, priority, max_k):
  num_tokens, num_experts = mask.shape
  sorted_expert, sorted_token, position, _ = _sort_pairs(mask, priority, max_k)
  kept = (sorted_expert < num_experts) & (position < capacity)
  empty_slot = num_experts * capacity
  slot = jnp.where(kept, sorted_expert * capacity + position, empty_slot)
  slot_token = jnp.full((empty_slot + 1,), num_tokens, jnp.int32).at[slot].set(sorted_token)
  slot_token = slot_token[:empty_slot].reshape(num_experts, capacity)
  kept_mask = jnp.zeros(mask.shape, jnp.bool_).at[sorted_token, sorted_expert].set(
      kept, mode='drop')
  padded = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]), tokens.dtype)], axis=0)
  expert_inputs = padded[slot_token]
  dropped, num_routed, num_dropped = _drop_stats(mask, kept_mask)
  return expert_inputs, SortDispatchState(slot_token=slot_token, dropped=dropped,
                                          num_routed=num_routed, num_dropped=num_dropped)


def dispatch_grouped(tokens: jax.Array, mask: jax.Array, capacity: int,
                     group_size: Optional[int], *, priority: Optional[jax.Array] = None,
                     impl: str = 'sort', max_k: Optional[int] = None):
  """`dispatch` per routing group of `group_size` consecutive tokens, each with its own
  `capacity` slots per expert: ([E, groups * C, D] buffers, each group's slots side by
  side, and a state whose combine takes buffers of that shape). group_size None: one
  group, `dispatch` itself."""
  if group_size is None:
    return dispatch(tokens, mask, capacity, priority=priority, impl=impl, max_k=max_k)
  send = lambda t, m, p: dispatch(t, m, capacity, priority=p, impl=impl, max_k=max_k)
  groups = tokens.shape[0] // group_size
  expert_inputs, states = per_group(send, group_size, stacked=True)(tokens, mask, priority)
  num_experts, width = mask.shape[1], tokens.shape[1]
  buffers = expert_inputs.transpose(1, 0, 2, 3).reshape(num_experts, groups * capacity, width)
  return buffers, GroupedDispatchState(states, group_size, capacity)


@dataclasses.dataclass(frozen=True)
class GroupedDispatchState:
  """The dispatch states of a call's routing groups, stacked on a leading group axis."""
  states: Any
  group_size: int
  capacity: int

  @property
  def num_routed(self):
    return self.states.num_routed.sum()

  @property
  def num_dropped(self):
    return self.states.num_dropped.sum()

  def combine(self, buffers: jax.Array, weights: jax.Array) -> jax.Array:
    num_experts, _, width = buffers.shape
    per_group = buffers.reshape(num_experts, -1, self.capacity, width).transpose(1, 0, 2, 3)
    split = weights.reshape(-1, self.group_size, weights.shape[-1])
    out = jax.vmap(lambda state, b, w: state.combine(b, w))(self.states, per_group, split)
    return out.reshape(-1, width)


def _positions_in_priority_order(mask: jax.Array, priority: Optional[jax.Array]) -> jax.Array:
  """Each routed pair's queue position at its expert, int32[T, E]."""
  counts = jnp.cumsum(mask.astype(jnp.int32), axis=0) - 1
  if priority is None:
    return counts
  order = jnp.argsort(-_priority_values(priority), axis=0, stable=True)
  sorted_mask = jnp.take_along_axis(mask, order, axis=0)
  sorted_pos = jnp.cumsum(sorted_mask.astype(jnp.int32), axis=0) - 1
  inverse = jnp.argsort(order, axis=0)
  return jnp.take_along_axis(sorted_pos, inverse, axis=0)


def _dispatch_einsum(tokens, mask, capacity, priority):
  position = _positions_in_priority_order(mask, priority)
  kept = mask & (position < capacity)
  dispatch_tensor = jax.nn.one_hot(position, capacity, dtype=jnp.bool_) & kept[..., None]
  expert_inputs = jnp.einsum('tec,td->ecd', dispatch_tensor.astype(tokens.dtype), tokens)
  dropped, num_routed, num_dropped = _drop_stats(mask, kept)
  return expert_inputs, EinsumDispatchState(dispatch_tensor=dispatch_tensor, dropped=dropped,
                                            num_routed=num_routed, num_dropped=num_dropped)


def combine(expert_outputs: jax.Array, weights: jax.Array, state: DispatchState) -> jax.Array:
  """Weighted sum of each token's expert outputs: [E, C, D] -> [T, D].

  Dropped pairs contribute nothing (weights are not renormalised). The sum is
  taken in (at least) float32 and returned in `expert_outputs.dtype`. Each state
  carries its own `combine`; this is the same call in functional form.
  """
  return state.combine(expert_outputs, weights)


def ragged_dispatch(tokens: jax.Array, mask: jax.Array, *, max_k: Optional[int] = None):
  """Dropless dispatch: routed pairs sorted by expert for `jax.lax.ragged_dot`.

  Returns sorted_inputs [T*K, D] (rows of unused pairs at the end are zeros) and
  a RaggedState whose `group_sizes` [E] feed ragged_dot.
  """
  _check(tokens, mask, None)
  mask = mask.astype(jnp.bool_)
  num_tokens, num_experts = mask.shape
  sorted_expert, sorted_token, _, group_sizes = _sort_pairs(mask, None, max_k)
  valid = sorted_expert < num_experts
  sorted_inputs = jnp.where(valid[:, None], tokens[sorted_token], 0).astype(tokens.dtype)
  kept_mask = jnp.zeros(mask.shape, jnp.bool_).at[sorted_token, sorted_expert].set(
      valid, mode='drop')
  dropped, num_routed, num_dropped = _drop_stats(mask, kept_mask)
  return sorted_inputs, RaggedState(sorted_token=sorted_token, sorted_expert=sorted_expert,
                                    group_sizes=group_sizes, dropped=dropped,
                                    num_routed=num_routed, num_dropped=num_dropped)


def ragged_combine(sorted_outputs: jax.Array, weights: jax.Array, state: RaggedState) -> jax.Array:
  """[T*K, D] per-pair expert outputs -> [T, D] weighted sum per token."""
  return state.combine(sorted_outputs, weights)
