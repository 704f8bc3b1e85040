"""A Pallas Triton grouped matmul for GPUs: lhs [M, K] rows sorted by group x rhs [G, K, N].

JAX 0.10.2 names a Pallas Triton lowering of `lax.ragged_dot` behind
`jax_ragged_dot_use_gpu_pallas_triton_lowering`, but the wheel does not ship its module
(`jax._src.lax.pallas_lowerings`), so this library carries its own kernel.

Forward (and the lhs gradient, with rhs transposed): one program per (row tile, column
tile). Row tiles are aligned to `block_m`; a tile that spans several groups loops over
them, each time masking the rows outside the group, so every output tile is written by
one program (no atomics). Tiles wholly past sum(group_sizes) compute nothing and hold
zeros. The rhs gradient: one program per (group, K tile, N tile), looping over the
aligned row tiles that overlap its group.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dynmoe_jax.kernels import common

BLOCK_M = 64
# Triton's dot wants power-of-two blocks of at least 16 on every side.
_BLOCKS = (64, 32, 16)


def _block(size: int) -> int:
  for block in _BLOCKS:
    if size % block == 0:
      return block
  return 16  # the caller pads `size` to a multiple of 16


def _padded(size: int) -> int:
  return size if size % 16 == 0 else common.round_up(size, 16)


def _compiler_params():
  return plt.CompilerParams(num_warps=4, num_stages=2)


def _dot(x, w, trans_a=False, trans_b=False):
  if trans_a:
    x = x.T
  if trans_b:
    w = w.T
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _gmm_call(lhs, rhs, first_group, last_group, starts, ends, *, transpose_rhs: bool,
              out_dtype, interpret: bool):
  rows, depth = lhs.shape
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_k, block_n = _block(depth), _block(cols)

  def kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref):
    tile, col_tile = pl.program_id(0), pl.program_id(1)
    row0 = tile * BLOCK_M
    row_ids = row0 + jnp.arange(BLOCK_M)
    cols_at = pl.ds(col_tile * block_n, block_n)

    def over_group(group, acc):
      in_group = (row_ids >= starts_ref[group]) & (row_ids < ends_ref[group])

      def over_depth(step, acc):
        depth_at = pl.ds(step * block_k, block_k)
        x = plt.load(lhs_ref.at[pl.ds(row0, BLOCK_M), depth_at])
        x = jnp.where(in_group[:, None], x, jnp.zeros((), x.dtype))
        if transpose_rhs:
          w = plt.load(rhs_ref.at[group, cols_at, depth_at])
        else:
          w = plt.load(rhs_ref.at[group, depth_at, cols_at])
        return acc + _dot(x, w, trans_b=transpose_rhs)

      return jax.lax.fori_loop(0, depth // block_k, over_depth, acc)

    acc = jnp.zeros((BLOCK_M, block_n), jnp.float32)
    acc = jax.lax.fori_loop(first_ref[tile], last_ref[tile] + 1, over_group, acc)
    out_ref[...] = acc.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
      grid=(rows // BLOCK_M, cols // block_n),
      out_specs=pl.BlockSpec((BLOCK_M, block_n), lambda i, j: (i, j)),
      compiler_params=_compiler_params(),
      interpret=interpret,
      name='dynmoe_triton_gmm',
  )(first_group, last_group, starts, ends, lhs, rhs)


def _tgmm_call(lhs, grad, starts, ends, num_groups: int, *, out_dtype, interpret: bool):
  """d rhs [G, K, N] = lhs[group rows].T @ grad[group rows], for each group."""
  _, depth = lhs.shape
  cols = grad.shape[1]
  block_k, block_n = _block(depth), _block(cols)

  def kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref):
    group, k_tile, n_tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]

    def over_rows(tile, acc):
      row0 = tile * BLOCK_M
      row_ids = row0 + jnp.arange(BLOCK_M)
      in_group = ((row_ids >= start) & (row_ids < end))[:, None]
      x = plt.load(lhs_ref.at[pl.ds(row0, BLOCK_M), pl.ds(k_tile * block_k, block_k)])
      g = plt.load(grad_ref.at[pl.ds(row0, BLOCK_M), pl.ds(n_tile * block_n, block_n)])
      x = jnp.where(in_group, x, jnp.zeros((), x.dtype))
      g = jnp.where(in_group, g, jnp.zeros((), g.dtype))
      return acc + _dot(x, g, trans_a=True)

    acc = jnp.zeros((block_k, block_n), jnp.float32)
    first_tile = start // BLOCK_M
    last_tile = jnp.where(end > start, (end + BLOCK_M - 1) // BLOCK_M, first_tile)
    acc = jax.lax.fori_loop(first_tile, last_tile, over_rows, acc)
    out_ref[...] = acc.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, depth, cols), out_dtype),
      grid=(num_groups, depth // block_k, cols // block_n),
      out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, i, j: (g, i, j)),
      compiler_params=_compiler_params(),
      interpret=interpret,
      name='dynmoe_triton_tgmm',
  )(starts, ends, lhs, grad)


def _tile_groups(starts, ends, rows: int):
  """Per aligned row tile: the first and last group it overlaps (last < first when the
  tile lies wholly past sum(group_sizes), so it computes nothing)."""
  num_groups = starts.shape[0]
  row0 = jnp.arange(rows // BLOCK_M, dtype=jnp.int32) * BLOCK_M
  first = jnp.searchsorted(ends, row0, side='right').astype(jnp.int32)
  last = jnp.searchsorted(ends, row0 + BLOCK_M - 1, side='right').astype(jnp.int32)
  last = jnp.minimum(last, num_groups - 1)
  return jnp.minimum(first, num_groups - 1), jnp.where(row0 < ends[-1], last, -1)


def _pad_last(x, size: int, axis: int):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _forward(lhs, rhs, group_sizes, transpose_rhs: bool):
  """[M, K] x [G, K, N] (or [G, N, K] transposed) -> [M, N] in lhs's dtype."""
  rows, depth = lhs.shape
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  rows_p, depth_p, cols_p = common.round_up(max(rows, 1), BLOCK_M), _padded(depth), \
      _padded(cols)
  lhs_p = _pad_last(common.pad_rows(lhs, rows_p), depth_p, 1)
  rhs_p = _pad_last(_pad_last(rhs, depth_p, 2 if transpose_rhs else 1), cols_p,
                    1 if transpose_rhs else 2)
  starts, ends = common.group_bounds(group_sizes)
  first, last = _tile_groups(starts, ends, rows_p)
  call = functools.partial(_gmm_call, transpose_rhs=transpose_rhs, out_dtype=lhs.dtype)
  out = common.native_on('cuda', call, lhs_p, rhs_p, first, last, starts, ends)
  return out[:rows, :cols]


def _rhs_grad(lhs, grad, group_sizes, rhs_dtype):
  rows, depth = lhs.shape
  cols = grad.shape[1]
  rows_p, depth_p, cols_p = common.round_up(max(rows, 1), BLOCK_M), _padded(depth), \
      _padded(cols)
  lhs_p = _pad_last(common.pad_rows(lhs, rows_p), depth_p, 1)
  grad_p = _pad_last(common.pad_rows(grad, rows_p), cols_p, 1)
  starts, ends = common.group_bounds(group_sizes)
  call = functools.partial(_tgmm_call, num_groups=group_sizes.shape[0], out_dtype=rhs_dtype)
  out = common.native_on('cuda', call, lhs_p, grad_p, starts, ends)
  return out[:, :depth, :cols]


def _backward(lhs, rhs, group_sizes, grad):
  grad = common.mask_rows_past(grad, group_sizes).astype(lhs.dtype)
  return (_forward(grad, rhs, group_sizes, transpose_rhs=True),
          _rhs_grad(lhs, grad, group_sizes, rhs.dtype))


# Like `jax.lax.ragged_dot(lhs, rhs, group_sizes)`; rows past sum(group_sizes) are 0.
grouped_matmul = common.grouped_matmul_with_vjp(
    functools.partial(_forward, transpose_rhs=False), _backward)
