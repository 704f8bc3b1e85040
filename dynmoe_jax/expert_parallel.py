"""Explicit expert parallelism: shard_map + all_to_all over the mesh's 'expert' axis.

Tokens are split over ('data', 'expert'); each shard routes its own tokens into
fixed-capacity buffers [E, C, D] (C from its local token count), sends each
expert group's slice to the device that owns those experts (`all_to_all` over
'expert'), runs its local experts, and sends the results back for the local
combine. This is the CPU-testable path: `ragged_all_to_all` has no CPU lowering.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dynmoe_jax import capacity as capacity_lib
from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax import sharding

TOKEN_AXES = ('data', 'expert')


def expert_parallel_ffn(tokens: jax.Array, mask: jax.Array, weights: jax.Array,
                        priority: Optional[jax.Array], expert_fn: Callable,
                        expert_params: Sequence[jax.Array], capacity_fn: Callable[[int], int],
                        group_size: Optional[int] = None
                        ) -> Tuple[jax.Array, jax.Array, jax.Array, int, int]:
  """Experts are zero-padded up to a multiple of the expert axis; padded experts get
  no tokens (their mask columns are False).

  Args:
    tokens [T, D], mask bool[T, E], weights [T, E], priority [T, E] or None.
    expert_fn(expert_inputs [S, E_local, C, D], *expert_params) -> same shape.
    expert_params: arrays with the expert axis first, e.g. (wi, wo).
    capacity_fn(tokens of a routing group) -> C (Python int).
    group_size: tokens per routing group within each shard (None: the shard's tokens are
      one group); each group has its C slots per expert, sent in one all-to-all.
  Returns: y [T, D], num_routed, num_dropped (global counts), and the expert-FFN rows
  computed over all shards and the slots per expert over all shards, each of the token
  shards holding capacity_fn(local_tokens) of them (Python ints; the global figure is
  what the other paths report for the same batch).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.shape:
    raise ValueError("dispatch_impl='shard_map_a2a' needs a mesh with an 'expert' axis set by "
                     'jax.set_mesh (the trainer does this; see sharding.make_mesh)')
  token_axes = tuple(a for a in TOKEN_AXES if a in mesh.shape)
  shards = sharding.axis_size(mesh, token_axes)
  experts_per_device = -(-mask.shape[1] // mesh.shape['expert'])
  padded_experts = experts_per_device * mesh.shape['expert']
  num_tokens, width = tokens.shape
  if num_tokens % shards:
    raise ValueError(f'shard_map_a2a: {num_tokens} tokens do not split over {shards} shards '
                     f'of mesh axes {token_axes}')
  pad = padded_experts - mask.shape[1]
  if pad:
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
    priority = None if priority is None else jnp.pad(priority, ((0, 0), (0, pad)))
    expert_params = [jnp.pad(p, [(0, pad)] + [(0, 0)] * (p.ndim - 1)) for p in expert_params]
  local_tokens = num_tokens // shards
  if group_size is not None and local_tokens % group_size:
    raise ValueError(f'shard_map_a2a: the {local_tokens} tokens of each of {shards} shards do '
                     f'not split into routing groups of group_size={group_size}')
  capacity, groups_per_shard = capacity_lib.group_slots(capacity_fn, local_tokens, group_size)
  slots = capacity * groups_per_shard  # a shard's, per expert
  has_priority = priority is not None

  def local(x, m, w, pr, *params):
    expert_inputs, state = dispatch_lib.dispatch_grouped(
        x, m, capacity, group_size, priority=pr if has_priority else None)
    groups = mesh.shape['expert']
    send = expert_inputs.reshape(groups, experts_per_device, slots, width)
    received = jax.lax.all_to_all(send, 'expert', 0, 0)  # [source shard, E_local, C, D]
    outputs = expert_fn(received, *params)
    returned = jax.lax.all_to_all(outputs, 'expert', 0, 0)  # [expert group, E_local, C, D]
    y = state.combine(returned.reshape(padded_experts, slots, width), w)
    counts = jnp.stack([state.num_routed, state.num_dropped])
    return y, jax.lax.psum(counts, token_axes)

  token_spec = P(token_axes, None)
  expert_spec = lambda p: P('expert', *([None] * (p.ndim - 1)))
  y, counts = jax.shard_map(
      local, mesh=mesh,
      in_specs=(token_spec, token_spec, token_spec, token_spec if has_priority else P(),
                *[expert_spec(p) for p in expert_params]),
      out_specs=(token_spec, P()))(tokens, mask, weights,
                                   priority if has_priority else jnp.zeros(()), *expert_params)
  return y, counts[0], counts[1], shards * padded_experts * slots, shards * slots
