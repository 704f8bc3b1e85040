"""The router registry: one file per router (its settings class and `RouterSpec`), listed
here. `layers.MoE`, the config, `adaptive` and the trainer read the spec and the settings;
none of them switches on a router name. Adding a router = its file, a line here, its tests.

A layer's `router` is a name (that router's default settings) or a settings object
(`TopAny(scale=10.0)`); `resolve` gives both the spec and the settings.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax.routers import (adaptive_k, dtop_p, expert_choice, null_experts, remoe, top_any,
                                top_k, top_p)
from dynmoe_jax.routers.adaptive_k import AdaptiveK
from dynmoe_jax.routers.base import LossTerms, RouterSettings, RouterSpec
from dynmoe_jax.routers.dtop_p import DTopP
from dynmoe_jax.routers.expert_choice import ExpertChoice
from dynmoe_jax.routers.null_experts import NullExperts
from dynmoe_jax.routers.remoe import ReMoE
from dynmoe_jax.routers.top_any import TopAny
from dynmoe_jax.routers.top_k import TopK
from dynmoe_jax.routers.top_p import TopP

REGISTRY: Dict[str, RouterSpec] = {module.SPEC.name: module.SPEC for module in (
    top_any, top_k, top_p, adaptive_k, expert_choice, remoe, null_experts, dtop_p)}
NAMES = tuple(REGISTRY)
# Every parameter name any router creates: the rest of an MoE module is its experts.
ALL_ROUTER_PARAMS = tuple(sorted({p for spec in REGISTRY.values() for p in spec.router_params}))

__all__ = ['AdaptiveK', 'DTopP', 'ExpertChoice', 'LossTerms', 'NullExperts', 'ReMoE',
           'RouterSettings', 'RouterSpec', 'TopAny', 'TopK', 'TopP', 'REGISTRY', 'NAMES', 'get',
           'resolve']


def get(name: str) -> RouterSpec:
  if name not in REGISTRY:
    raise ValueError(f'router={name!r} is not one of {NAMES}')
  return REGISTRY[name]


def resolve(router: Union[str, RouterSettings]) -> Tuple[RouterSpec, RouterSettings]:
  """(spec, settings) of a router name (its default settings) or settings object."""
  if isinstance(router, str):
    spec = get(router)
    return spec, spec.settings()
  spec = REGISTRY.get(getattr(router, 'name', None))
  if spec is None or not isinstance(router, spec.settings):
    raise ValueError(f'router={router!r} is neither a router name {NAMES} nor the '
                     f'settings of one ({[s.settings.__name__ for s in REGISTRY.values()]})')
  return spec, router


def check(router: Union[str, RouterSettings], capacity, num_experts: int
          ) -> List[Tuple[str, str]]:
  """(field, reason) for each setting that does not fit a layer of `num_experts`; fields
  of the router's settings by name, the capacity's as 'capacity.<field>'."""
  spec, settings = resolve(router)
  problems = list(settings.problems_for(num_experts))
  if settings.fixed_slots(1, 1) is not None:
    for field in ('slots', 'planned'):
      if getattr(capacity, field) is not None:
        problems.append((f'capacity.{field}', f'is unused: router {spec.name!r} fixes its '
                         'own capacity'))
  return problems


def aux_loss(settings: RouterSettings, route, logits, params,
             weights: Optional[Mapping[str, jax.Array]] = None
             ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Weighted sum of the router's auxiliary losses and each unweighted term; a term
  whose weight is 0 is not computed. `weights` replaces the settings' weights of the
  terms it names (traced values, e.g. a budget controller's)."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, (weight, loss_fn) in get(settings.name).aux_losses(
      settings, route, logits, params).items():
    weight = (weights or {}).get(name, weight)
    if isinstance(weight, (int, float)) and not weight:
      continue  # a static 0 (a traced weight is always applied)
    value = loss_fn()
    metrics[name] = value
    total = total + weight * value
  return total, metrics


def is_router_param(name: str) -> bool:
  return name in ALL_ROUTER_PARAMS


def new_expert_router_params(router: str, kept: Mapping[str, np.ndarray],
                             direction: np.ndarray, keep) -> Dict[str, np.ndarray]:
  spec = get(router)
  if spec.new_expert_params is None:
    raise ValueError(f'router {router!r} cannot add experts')
  return spec.new_expert_params(kept, direction, keep)
