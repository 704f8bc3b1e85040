"""FLOPs of a traced step, counted from its jaxpr and split into attention, dense and expert.

Every dot (dot_general, ragged_dot) counts 2 · output size · contracted size; its
category is the named scope it was traced under: the attention scores and their
weighted sum ('attention_scores'), the expert FFNs ('expert_wi', 'expert_wo', their
backward passes keep the scope in their name), everything else dense (projections,
dense FFNs, routers, embeddings, the output layer). A scan body counts its length times,
a shard_map body once per device, a cond its costliest branch, a while body once.
Pallas kernels are opaque here: count a step traced with ragged_backend='xla'.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, List

import jax
import numpy as np

CATEGORIES = ('attention', 'dense', 'expert')
ATTENTION_SCOPE = 'attention_scores'
EXPERT_SCOPES = ('expert_wi', 'expert_wo')


def _jaxprs(value) -> List[Any]:
  values = value if isinstance(value, (tuple, list)) else [value]
  out = []
  for v in values:
    if hasattr(v, 'jaxpr') and hasattr(v, 'consts'):  # ClosedJaxpr
      out.append(v.jaxpr)
    elif hasattr(v, 'eqns'):  # Jaxpr
      out.append(v)
  return out


def _category(eqn) -> str:
  scope = str(eqn.source_info.name_stack)
  if ATTENTION_SCOPE in scope:
    return 'attention'
  return 'expert' if any(s in scope for s in EXPERT_SCOPES) else 'dense'


def _dot_flops(eqn) -> float:
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == 'dot_general':
    (contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])
  # ragged_dot_general, forward [M, K] x [G, K, N] -> [M, N] or the weight gradient
  # [M, K] x [M, N] -> [G, K, N]: each lhs element meets every free rhs column once.
  numbers = eqn.params['ragged_dot_dimension_numbers']
  (_, rhs_contract), _ = numbers.dot_dimension_numbers
  rhs = eqn.invars[1].aval.shape
  skip = set(rhs_contract) | set(numbers.rhs_group_dimensions) | set(
      numbers.dot_dimension_numbers[1][1])
  free = [rhs[d] for d in range(len(rhs)) if d not in skip]
  return 2.0 * np.prod(eqn.invars[0].aval.shape) * np.prod(free)


def count(jaxpr) -> Dict[str, float]:
  """FLOPs by category of a jaxpr (a ClosedJaxpr or Jaxpr)."""
  jaxpr = _jaxprs(jaxpr)[0]
  total = collections.Counter({c: 0.0 for c in CATEGORIES})
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('dot_general', 'ragged_dot_general'):
      total[_category(eqn)] += _dot_flops(eqn)
      continue
    subs = [j for v in eqn.params.values() for j in _jaxprs(v)]
    if not subs:
      continue
    counts = [count(j) for j in subs]
    if name == 'cond':
      counts = [max(counts, key=lambda c: sum(c.values()))]
    times = eqn.params.get('length', 1) if name == 'scan' else 1
    if name == 'shard_map':
      times = eqn.params['mesh'].size
    for c in counts:
      for key, value in c.items():
        total[key] += times * value
  return dict(total)


def step_flops(jitted, args) -> Dict[str, float]:
  """FLOPs by category of one call of `jitted(*args)` (global, all devices together)."""
  return count(jax.make_jaxpr(jitted)(*args))


def primitives_named(jitted, args, part: str) -> List[str]:
  """Primitives whose name holds `part` in the traced step (e.g. host callbacks)."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if part in eqn.primitive.name:
        found.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in _jaxprs(value):
          walk(sub)
  try:
    walk(jax.make_jaxpr(jitted)(*args).jaxpr)
  except Exception:  # noqa: BLE001  only an explanation of another failure
    return []
  return sorted(found)
