"""Meshes, the one table of logical-axis rules, and shardings derived from it.

Mesh axes: ('data', 'expert', 'model'). Every parameter carries logical axis
names (see layers.py / models/); `LOGICAL_AXIS_RULES` maps them to mesh axes.
The expert axis of expert kernels maps to 'expert'; the batch of activations
outside the MoE is split over ('data', 'expert') so the expert devices also do
data parallel work (GShard / MaxText style); inside the MoE the dispatched
[E, C, D] buffers are constrained to ('expert', ...), which is where XLA puts
the all-to-all.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'expert', 'model')

LOGICAL_AXIS_RULES: Tuple[Tuple[str, Any], ...] = (
    ('batch', ('data', 'expert')),
    ('expert', 'expert'),
    ('expert_capacity', None),
    ('embed', None),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('vocab', 'model'),
    ('classes', None),
)


def mesh_shape(data: int, expert: int, model: int = 1, num_devices: Optional[int] = None):
  """Resolve -1 (at most one) to the remaining devices; check the product."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  dims = {'mesh.data': data, 'mesh.expert': expert, 'mesh.model': model}
  unknown = [k for k, v in dims.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError(f'only one of {list(dims)} may be -1, got {unknown}')
  bad = {k: v for k, v in dims.items() if v != -1 and (not isinstance(v, int) or v < 1)}
  if bad:
    raise ValueError(f'mesh sizes must be positive ints or -1, got {bad}')
  known = int(np.prod([v for v in dims.values() if v != -1]))
  if unknown:
    if num_devices % known:
      raise ValueError(f'{unknown[0]}=-1: {num_devices} devices are not divisible by the other '
                       f'mesh axes ({known})')
    dims[unknown[0]] = num_devices // known
  if int(np.prod(list(dims.values()))) != num_devices:
    raise ValueError(f'mesh {dims} needs {int(np.prod(list(dims.values())))} devices, '
                     f'but {num_devices} are available')
  return tuple(dims.values())


def make_mesh(data: int = -1, expert: int = 1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, expert, model, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(names: Sequence[Optional[str]], rules=LOGICAL_AXIS_RULES) -> P:
  return nn.logical_to_mesh_axes(names, rules)


def axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(shape: Sequence[int], spec: P, mesh) -> P:
  """Replicate any dimension the mesh does not divide (e.g. 6 experts on an expert
  axis of 4, which adaptive training produces): such arrays cannot be split evenly,
  so that dimension is kept whole on every device of the axis."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[a if a is None or dim % axis_size(mesh, a) == 0 else None
             for dim, a in zip(shape, entries)])


def param_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a pytree of (possibly LogicallyPartitioned) leaves,
  e.g. `jax.eval_shape(model.init, ...)`; unannotated leaves are replicated and
  dimensions the mesh does not divide are replicated (see fit_spec)."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def one(leaf):
    if is_box(leaf):
      spec = logical_to_spec(leaf.names, rules) or P()
      return NamedSharding(mesh, fit_spec(leaf.value.shape, spec, mesh))
    return replicated(mesh)
  return jax.tree.map(one, boxed_tree, is_leaf=is_box)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """nn.with_logical_constraint where a mesh is set and divides x; otherwise x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = dict(nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
  for dim, name in zip(x.shape, logical_axes):
    axes = rules.get(name) if name is not None else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ()))
                 if a in mesh.shape)
    if dim % axis_size(mesh, axes or None):
      return x
  return nn.with_logical_constraint(x, logical_axes)


def strip_boxes(tree):
  """LogicallyPartitioned leaves -> their values, without applying sharding
  constraints (nn.meta.unbox would, which fails on ShapeDtypeStructs under a mesh)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'expert'), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
