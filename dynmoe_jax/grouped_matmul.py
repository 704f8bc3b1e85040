"""The grouped matmul of `dispatch_impl='ragged'`, by backend (`model.moe.ragged_backend`).

  'xla'           `jax.lax.ragged_dot`: XLA's own lowering on every platform (on GPU
                  XLA 0.10.2 expands it into a dense dot doing G times the work)
  'megablox'      JAX's Pallas megablox gmm / tgmm: Mosaic kernels on TPU
  'pallas_triton' this library's Pallas Triton kernel (`kernels.triton_gmm`) on GPU
  'tokamax'       `tokamax.ragged_dot` (pip install '.[gpu]' / '.[tpu]'), its own choice
  'auto'          megablox on TPU, pallas_triton on GPU, xla elsewhere

A Pallas backend runs its kernel where the step is lowered for the kernel's platform and
in Pallas interpret mode elsewhere (a CPU test runs the kernel's code); 'auto' decides by
the lowering platform too, so a step exported from a CPU host for a TPU holds megablox.
A kernel asked for on another accelerator is refused by `check` (it would interpret).

GSPMD cannot partition a Pallas kernel, so under a mesh of several devices a kernel
backend runs per device (`_per_shard`): the expert-sorted pair list is split by rows over
every mesh axis and each device multiplies its slice with its own group sizes (a slice of
a sorted list is sorted); the expert weights are gathered as the mesh's data parallelism
would, and their gradient summed over the devices by shard_map's transpose.
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dynmoe_jax.kernels import common, megablox, triton_gmm

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

BACKENDS = ('auto', 'xla', 'megablox', 'pallas_triton', 'tokamax')
# The platform (as jax.export names it) each Pallas kernel is compiled for.
KERNEL_PLATFORM = {'megablox': 'tpu', 'pallas_triton': 'cuda'}
AUTO = {'tpu': 'megablox', 'cuda': 'pallas_triton'}
DESCRIPTIONS = {
    'xla': 'jax.lax.ragged_dot (XLA)',
    'megablox': 'megablox gmm/tgmm (Pallas Mosaic TPU kernel)',
    'pallas_triton': 'dynmoe_triton_gmm/tgmm (Pallas Triton GPU kernel)',
    'tokamax': 'tokamax.ragged_dot',
}
# The custom-call target each kernel leaves in a lowered step.
KERNEL_CALL_TARGETS = {'megablox': 'tpu_custom_call', 'pallas_triton': '__gpu$xla.gpu.triton'}


def platform_name(backend: str) -> str:
  """jax.default_backend() / device platform -> jax.export's platform name."""
  return {'gpu': 'cuda'}.get(backend, backend)


def resolve(backend: str, platform: str) -> str:
  """The backend that runs on `platform` ('cpu', 'cuda', 'rocm', 'tpu')."""
  return AUTO.get(platform, 'xla') if backend == 'auto' else backend


def describe(backend: str, platform: str) -> str:
  """One line for the log and the workdir: what `backend` runs on `platform`."""
  chosen = resolve(backend, platform)
  text = DESCRIPTIONS[chosen]
  kernel_platform = KERNEL_PLATFORM.get(chosen)
  if kernel_platform and kernel_platform != platform:
    text += ', interpreted'
  return f'{text} on {platform}' + (" ('auto')" if backend == 'auto' else '')


def check(backend: str, platform: str):
  """Raise ValueError (one line) where `backend` cannot run well on `platform`."""
  if backend not in BACKENDS:
    raise ValueError(f'ragged_backend={backend!r} is not one of {BACKENDS}')
  kernel_platform = KERNEL_PLATFORM.get(backend)
  if kernel_platform and platform not in (kernel_platform, 'cpu'):
    raise ValueError(f'ragged_backend={backend!r} is a {kernel_platform} kernel; on '
                     f'{platform} it would run interpreted (use "auto" or "xla")')
  if backend == 'tokamax' and _tokamax() is None:
    raise ValueError("ragged_backend='tokamax' needs tokamax (pip install -e '.[gpu]' or "
                     "'.[tpu]'); 'auto' needs nothing")


def _tokamax():
  try:
    import tokamax  # optional: pip install .[gpu] / .[tpu]
    return tokamax
  except ImportError:
    return None


def _xla(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _tokamax_ragged_dot(lhs, rhs, group_sizes):
  tokamax = _tokamax()
  if tokamax is None:
    check('tokamax', 'cpu')  # raises the one-line error
  return tokamax.ragged_dot(lhs, rhs, group_sizes=group_sizes)


def _auto(lhs, rhs, group_sizes):
  return jax.lax.platform_dependent(
      lhs, rhs, group_sizes, tpu=megablox.grouped_matmul, cuda=triton_gmm.grouped_matmul,
      default=_xla)


def _per_shard(kernel: GroupedMatmul) -> GroupedMatmul:
  def run(lhs, rhs, group_sizes):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
      return kernel(lhs, rhs, group_sizes)
    axes, rows = tuple(mesh.axis_names), lhs.shape[0]

    def local(lhs, rhs, group_sizes):
      first = jax.lax.axis_index(axes) * lhs.shape[0]
      starts, ends = common.group_bounds(group_sizes)
      clip = lambda x: jnp.clip(x, first, first + lhs.shape[0])
      return kernel(lhs, rhs, (clip(ends) - clip(starts)).astype(jnp.int32))

    padded = common.pad_rows(lhs, common.round_up(rows, mesh.size))
    out = jax.shard_map(local, in_specs=(P(axes), P(), P()), out_specs=P(axes),
                        check_vma=False)(padded, rhs, group_sizes)
    return out[:rows]
  return run


FUNCTIONS: Dict[str, GroupedMatmul] = {
    'auto': _per_shard(_auto),
    'xla': _xla,
    'megablox': _per_shard(megablox.grouped_matmul),
    'pallas_triton': _per_shard(triton_gmm.grouped_matmul),
    'tokamax': _per_shard(_tokamax_ragged_dot),
}


def get(backend: str) -> GroupedMatmul:
  """[N, K] x [G, K, M] -> [N, M] over contiguous row groups, rows sorted by group."""
  if backend not in FUNCTIONS:
    raise ValueError(f'ragged_backend={backend!r} is not one of {BACKENDS}')
  return FUNCTIONS[backend]
