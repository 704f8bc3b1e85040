"""The TPU grouped matmul: JAX's Pallas megablox `gmm` / `tgmm` (Mosaic TPU kernels).

megablox needs the row count to be a multiple of its row tile and leaves the rows past
sum(group_sizes) uninitialised, so rows are padded to the tile and that tail is zeroed
in the output and in the lhs gradient (megablox's own VJP would pass the garbage on to
the tokens' gradient through the combine). K and N use 128-wide tiles where they divide,
else one tile of the whole dimension (both are valid Mosaic block shapes).
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from dynmoe_jax.kernels import common

# The module, not the package's custom_vjp `gmm` of the same name.
megablox_gmm = importlib.import_module('jax.experimental.pallas.ops.tpu.megablox.gmm')
TILE = 128


def _tiling(depth: int, cols: int):
  pick = lambda size: TILE if size % TILE == 0 else size
  return (TILE, pick(depth), pick(cols))


def _gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, interpret: bool):
  cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  return megablox_gmm.gmm(lhs, rhs, group_sizes, lhs.dtype, _tiling(lhs.shape[1], cols),
                          transpose_rhs=transpose_rhs, interpret=interpret)


def _tgmm(lhs_t, grad, group_sizes, *, out_dtype, interpret: bool):
  return megablox_gmm.tgmm(lhs_t, grad, group_sizes, out_dtype,
                           _tiling(lhs_t.shape[0], grad.shape[1]),
                           num_actual_groups=group_sizes.shape[0], interpret=interpret)


def _padded(x):
  return common.pad_rows(x, common.round_up(max(x.shape[0], 1), TILE))


def _forward(lhs, rhs, group_sizes, transpose_rhs: bool):
  call = functools.partial(_gmm, transpose_rhs=transpose_rhs)
  out = common.native_on('tpu', call, _padded(lhs), rhs, group_sizes)
  return common.mask_rows_past(out[:lhs.shape[0]], group_sizes)


def _backward(lhs, rhs, group_sizes, grad):
  grad = common.mask_rows_past(grad, group_sizes).astype(lhs.dtype)
  call = functools.partial(_tgmm, out_dtype=rhs.dtype)
  d_rhs = common.native_on('tpu', call, _padded(lhs).swapaxes(0, 1), _padded(grad),
                           group_sizes)
  return _forward(grad, rhs, group_sizes, transpose_rhs=True), d_rhs


# Like `jax.lax.ragged_dot(lhs, rhs, group_sizes)`; rows past sum(group_sizes) are 0.
grouped_matmul = common.grouped_matmul_with_vjp(
    functools.partial(_forward, transpose_rhs=False), _backward)
