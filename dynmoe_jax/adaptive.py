"""DynMoE adaptive experts: routing records, add/remove plans, and reallocation of
the parameter pytree and optimizer state to the new expert counts.

Unlike the reference (max_expert_num preallocated slots, a mask, stale Adam
moments on reused slots), experts really are added and removed: every array
with an expert axis is rebuilt at the new size. Expert axes are found from the
parameters' logical axis names ('expert'), so this works for any router and any
optax chain whose per-parameter state mirrors the params tree.

Flow, per MoE layer, at a boundary:
  records (summed over a window) -> plan_layer -> ResizePlan -> resize(params, opt_state, plan)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import capacity as capacity_lib
from dynmoe_jax import layers as layers_lib
from dynmoe_jax import names, routers
from dynmoe_jax.layout import Layout

Path = Tuple[str, ...]


@dataclasses.dataclass
class RecordAccumulator:
  """Host-side sum of one layer's RoutingRecords over the recording window, and each
  step's routed pairs per expert and tokens (what capacity is planned from)."""
  tokens_per_expert: np.ndarray
  unrouted_count: int = 0
  unrouted_input_sum: Optional[np.ndarray] = None
  steps: int = 0
  step_loads: Optional[np.ndarray] = None   # int64[steps, E]
  step_tokens: Optional[np.ndarray] = None  # int64[steps]

  @classmethod
  def empty(cls, num_experts: int, width: int) -> 'RecordAccumulator':
    return cls(np.zeros(num_experts, np.int64), 0, np.zeros(width, np.float64), 0,
               np.zeros((0, num_experts), np.int64), np.zeros(0, np.int64))

  def add(self, record: layers_lib.RoutingRecord):
    loads = np.asarray(record.tokens_per_expert, np.int64)
    self.tokens_per_expert = self.tokens_per_expert + loads
    self.unrouted_count += int(record.unrouted_count)
    self.unrouted_input_sum = self.unrouted_input_sum + np.asarray(record.unrouted_input_sum,
                                                                   np.float64)
    self.steps += 1
    if self.step_loads is not None:
      self.step_loads = np.concatenate([self.step_loads, loads[None]])
      self.step_tokens = np.append(self.step_tokens, int(record.num_tokens))

  def to_json(self) -> Dict[str, Any]:
    out = {'tokens_per_expert': self.tokens_per_expert.tolist(),
           'unrouted_count': self.unrouted_count,
           'unrouted_input_sum': self.unrouted_input_sum.tolist(), 'steps': self.steps}
    if self.step_loads is not None:
      out.update(step_loads=self.step_loads.tolist(), step_tokens=self.step_tokens.tolist())
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'RecordAccumulator':
    counts = np.asarray(d['tokens_per_expert'], np.int64)
    loads = d.get('step_loads')
    return cls(counts, int(d['unrouted_count']), np.asarray(d['unrouted_input_sum'], np.float64),
               int(d['steps']),
               None if loads is None else np.asarray(loads, np.int64).reshape(-1, counts.size),
               None if loads is None else np.asarray(d['step_tokens'], np.int64))


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """keep: old expert indices that stay, in order. new_params: for each param name
  of the layer's MoE module that has an expert axis, the values of the added
  experts stacked on that axis (absent when nothing is added)."""
  keep: Tuple[int, ...]
  num_new: int = 0
  new_params: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  old_count: int = 0

  @property
  def new_count(self) -> int:
    return len(self.keep) + self.num_new

  @property
  def removed(self) -> Tuple[int, ...]:
    return tuple(i for i in range(self.old_count) if i not in self.keep)

  @property
  def is_noop(self) -> bool:
    return self.num_new == 0 and self.keep == tuple(range(self.old_count))


@dataclasses.dataclass(frozen=True)
class ResizePlan:
  """layers: MoE module path (e.g. ('layer_1', 'moe')) -> LayerPlan.
  expert_axes: param path -> index of its 'expert' axis (from logical names)."""
  layers: Mapping[Path, LayerPlan]
  expert_axes: Mapping[Path, int]

  @property
  def is_noop(self) -> bool:
    return all(p.is_noop for p in self.layers.values())


def expert_axes(boxed_params) -> Dict[Path, int]:
  """Param path -> axis named 'expert', for every LogicallyPartitioned leaf that has one."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]:
    if is_box(leaf) and 'expert' in leaf.names:
      out[tuple(k.key for k in path)] = leaf.names.index('expert')
  return out


def _normalize(v: np.ndarray) -> np.ndarray:
  return v / max(float(np.linalg.norm(v)), 1e-12)


def planned_experts(record: RecordAccumulator, *, min_experts: int, max_experts: int
                    ) -> Tuple[Tuple[int, ...], bool]:
  """Which experts stay and whether one is added: the part of the plan that fixes the
  new shapes. It depends on the record alone, so the next layout can be compiled
  before the parameters it will be applied to exist."""
  old = int(record.tokens_per_expert.shape[0])
  unused = [e for e in range(old) if record.tokens_per_expert[e] == 0]
  add = record.unrouted_count > 0
  # Never fall below min_experts: unused experts with the lowest index are kept first.
  floor = max(min_experts - int(add), 1)
  removable = max(0, old - floor)
  removed = set(unused[len(unused) - min(len(unused), removable):]) if unused else set()
  keep = tuple(e for e in range(old) if e not in removed)
  return keep, add and len(keep) < max_experts


def planned_layout(layout: Layout, records: Mapping[str, RecordAccumulator], *,
                   expert_bounds: Optional[Tuple[int, int]] = None,
                   capacity_rule: Optional[capacity_lib.PlanRule] = None,
                   current_slots: Optional[Callable[[int, int], int]] = None) -> Layout:
  """The layout after the boundary that `records` (MoE layer name, e.g. 'layer_1', -> its
  window) will be planned from. expert_bounds: (min_experts, max_experts) to add and
  remove experts, None to keep them; capacity_rule: re-plan capacity, None to keep it;
  current_slots(block, tokens): the slots per expert that block's window ran with."""
  experts, capacity = list(layout.experts), list(layout.capacity)
  tokens = layout.capacity_tokens
  planned = set()
  for name, record in records.items():
    if not record.steps:
      continue
    block = names.layer_index(name)
    keep = tuple(range(experts[block]))
    if expert_bounds is not None:
      keep, add = planned_experts(record, min_experts=expert_bounds[0],
                                  max_experts=expert_bounds[1])
      experts[block] = len(keep) + int(add)
    if capacity_rule is not None:
      window_tokens = int(record.step_tokens[0]) if record.step_tokens is not None and len(
          record.step_tokens) else 0
      current = current_slots(block, window_tokens) if current_slots and window_tokens else 0
      capacity[block], tokens = capacity_lib.plan_from_loads(
          record.step_loads, record.step_tokens, keep, capacity_rule, current)
      planned.add(block)
  stale = [i for i, c in enumerate(capacity) if c and i not in planned]
  if stale and tokens != layout.capacity_tokens:
    raise ValueError(f'planned_layout: blocks {stale} keep capacities planned for '
                     f'{layout.capacity_tokens} tokens per step, the others are planned for '
                     f'{tokens}; plan every MoE layer from the same steps')
  return Layout(tuple(experts), tuple(capacity), tokens)


def plan_layer(record: RecordAccumulator, moe_params: Mapping[str, np.ndarray],
               moe_axes: Mapping[str, int], *, router: str, kernel_init: Callable,
               min_experts: int, max_experts: int, new_expert_init: str,
               rng: jax.Array) -> LayerPlan:
  """DynMoE's rule for one layer: drop experts that got no token in the window;
  add one when some tokens activated none, its router parameters pointing at the
  normalised sum of their inputs (the router's spec says how: a top-any gate
  embedding with threshold 0, or a router-kernel column); stay within
  [min_experts, max_experts].

  moe_params: the layer's MoE params (unboxed); moe_axes: their expert axes.
  router: the layer's router name; kernel_init: the MoE's expert kernel init
  (`layers.MoE.kernel_init`), used for a 'fresh' new expert.
  """
  old = int(record.tokens_per_expert.shape[0])
  keep, add = planned_experts(record, min_experts=min_experts, max_experts=max_experts)
  if not add:
    return LayerPlan(keep=keep, old_count=old)

  direction = _normalize(record.unrouted_input_sum)
  router_params = {k: np.asarray(v) for k, v in moe_params.items()
                   if routers.is_router_param(k)}
  new_params: Dict[str, np.ndarray] = dict(
      routers.new_expert_router_params(router, router_params, direction, keep))

  # The kept expert whose router parameters (the [E, D] gate embeddings or the [D, E]
  # router kernel, expert axis first) point closest to the new direction.
  nearest = None
  if keep:
    (matrix,) = [k for k, v in router_params.items() if v.ndim == 2 and k in moe_axes]
    kept_gates = np.moveaxis(router_params[matrix], moe_axes[matrix], 0)[list(keep)]
    cosine = (kept_gates / np.maximum(np.linalg.norm(kept_gates, axis=-1, keepdims=True),
                                      1e-12)) @ direction
    nearest = keep[int(np.argmax(cosine))]
  keys = jax.random.split(rng, len(moe_params))
  for key, (name, value) in zip(keys, sorted(moe_params.items())):
    if routers.is_router_param(name) or name not in moe_axes:
      continue
    axis = moe_axes[name]
    value = np.asarray(value)
    if new_expert_init == 'copy_nearest' and nearest is not None:
      new_params[name] = np.take(value, [nearest], axis=axis)
    else:
      shape = list(value.shape)
      shape[axis] = 1
      new_params[name] = np.asarray(kernel_init(key, tuple(shape), value.dtype))
  return LayerPlan(keep=keep, num_new=1, new_params=new_params, old_count=old)


def _resize_leaf(value, axis: int, layer: LayerPlan, new_values: Optional[np.ndarray]):
  kept = jnp.take(value, jnp.asarray(layer.keep, jnp.int32), axis=axis)
  if not layer.num_new:
    return kept
  if new_values is None:
    shape = list(value.shape)
    shape[axis] = layer.num_new
    new_values = jnp.zeros(shape, value.dtype)
  return jnp.concatenate([kept, jnp.asarray(new_values, value.dtype)], axis=axis)


def _resize_tree(tree, plan: ResizePlan, fill_new: bool):
  """Resize every leaf of a params-shaped tree. fill_new: take new experts' values
  from the plan (params); otherwise zeros (fresh optimizer moments)."""
  def visit(path, leaf):
    key = tuple(k.key for k in path)
    axis = plan.expert_axes.get(key)
    if axis is None:
      return leaf
    module, name = key[:-1], key[-1]
    layer = plan.layers.get(module)
    if layer is None:
      return leaf
    new_values = None
    if fill_new and layer.num_new:
      if name not in layer.new_params:
        raise ValueError(f'resize: the plan adds experts to {"/".join(module)} but gives no '
                         f'values for its parameter {name!r}')
      new_values = layer.new_params[name]
    return _resize_leaf(leaf, axis, layer, new_values)
  return jax.tree_util.tree_map_with_path(visit, tree)


def resize(params, opt_state, plan: ResizePlan):
  """Rebuild params and optimizer state at the plan's expert counts.

  Kept experts keep their values and optimizer moments exactly; new experts get
  the plan's values and zero moments; removed experts disappear. Any subtree of
  `opt_state` with the same structure as `params` (Adam's mu and nu, momentum,
  ...) is treated as per-parameter state; everything else (step counts,
  EmptyState) is kept as is.
  """
  if plan.is_noop:
    return params, opt_state
  params_def = jax.tree.structure(params)
  new_params = _resize_tree(params, plan, fill_new=True)

  def is_param_shaped(x):
    try:
      return jax.tree.structure(x) == params_def
    except Exception:  # noqa: BLE001  non-pytree leaves
      return False

  new_opt_state = jax.tree.map(
      lambda x: _resize_tree(x, plan, fill_new=False) if is_param_shaped(x) else x,
      opt_state, is_leaf=is_param_shaped)
  return new_params, new_opt_state
