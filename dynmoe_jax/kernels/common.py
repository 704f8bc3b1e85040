"""What the Pallas grouped matmuls share: row padding, group bounds and the platform switch."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
  return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def group_bounds(group_sizes: jax.Array):
  """int32 [G] start and end row of each group in the expert-sorted pair list."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return ends - group_sizes.astype(jnp.int32), ends


def mask_rows_past(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Zero the rows at and past sum(group_sizes): the pair list's unused tail, which a
  kernel may leave uninitialised (megablox does)."""
  valid = jnp.arange(x.shape[0]) < group_sizes.sum()
  return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def native_on(platform: str, kernel: Callable, *args):
  """`kernel(*args, interpret=...)`: compiled where the step is lowered for `platform`,
  interpreted anywhere else. The choice is made by the lowering platform, not by this
  host's backend, so an export from a CPU host for `platform` holds the kernel."""
  return jax.lax.platform_dependent(
      *args, **{platform: functools.partial(kernel, interpret=False)},
      default=functools.partial(kernel, interpret=True))


def grouped_matmul_with_vjp(forward: Callable, backward: Callable) -> Callable:
  """`forward(lhs, rhs, group_sizes)` as a custom_vjp whose gradient is
  `backward(lhs, rhs, group_sizes, grad) -> (d_lhs, d_rhs)`; group sizes get none."""

  @jax.custom_vjp
  def grouped_matmul(lhs, rhs, group_sizes):
    return forward(lhs, rhs, group_sizes)

  def fwd(lhs, rhs, group_sizes):
    return forward(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def bwd(residuals, grad):
    return (*backward(*residuals, grad), None)

  grouped_matmul.defvjp(fwd, bwd)
  return grouped_matmul
