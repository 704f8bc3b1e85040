"""What every router file builds on: its spec, its settings' common part, and the
helpers the logit routers share.

A router is a settings class (frozen, its own fields and loss weights, defaults and
validation written once) and a `RouterSpec` saying what the rest of the library needs:
the parameters it creates, how it routes, its auxiliary losses, which parameters are
router parameters (non-finite report, adaptive resize), how a new expert's router
parameters are initialised, and what a compute budget controls.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from dynmoe_jax import losses, routing
from dynmoe_jax.settings import Settings, is_int, is_number

# name -> (weight, thunk computing the unweighted loss)
LossTerms = Dict[str, Tuple[float, Callable[[], jax.Array]]]


class RouterSettings(Settings):
  """The part every router's settings shares; each router overrides what applies."""
  name = ''  # the registry's name of the router (a class attribute, not a field)

  def capacity_k(self, num_experts: int) -> float:
    """Experts per token the capacity-factor rule sizes for, in a layer of `num_experts`."""
    del num_experts
    return 2.0

  def fixed_slots(self, num_tokens: int, num_experts: int) -> Optional[int]:
    """Slots per expert the router fixes itself (None: the capacity rules)."""
    del num_tokens, num_experts
    return None

  def pairs_per_token(self) -> Optional[int]:
    """The most experts a token can be routed to (None: any number, up to E)."""
    return None

  def problems_for(self, num_experts: int) -> Iterator[Tuple[str, str]]:
    """(field, reason) for each setting that does not fit a layer of `num_experts`."""
    del num_experts
    return iter(())

  def with_budget(self, target: float) -> 'RouterSettings':
    """These settings under a compute budget of `target` experts per token."""
    del target
    return self

  def falls_back_in_eval_only(self) -> bool:
    """True where evaluation gives a token the training router left without an expert its
    top-1 expert (top-any): a budget then counts those tokens as one expert each."""
    return False


class TokenChoice(RouterSettings):
  """The part the token-choice routers share: `expected_k` (None: the router's own k),
  `priority` and `*_weight` fields, checked alike."""

  def choice_problems(self, expected_k_optional: bool = True) -> Iterator[Tuple[str, str]]:
    yield from positive_problems('expected_k', self.expected_k, optional=expected_k_optional)
    yield from priority_problems(self.priority)
    yield from weight_problems(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitChoice(TokenChoice):
  """The fields the softmax token-choice routers share, with their defaults (a router may
  redeclare one with its own default)."""
  expected_k: Optional[float] = None
  priority: str = 'score'
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3


class BoundedChoice(TokenChoice):
  """A token-choice router whose tokens take at most the int field `bound` names (top-k's
  `k`, DA-MoE's `max_k`) experts; capacity is sized for that many unless `expected_k`."""
  bound = 'k'

  def problems(self):
    yield from k_problems(self.bound, getattr(self, self.bound))
    yield from self.choice_problems()

  def problems_for(self, num_experts):
    yield from k_problems(self.bound, getattr(self, self.bound), num_experts)

  def capacity_k(self, num_experts):
    del num_experts
    return getattr(self, self.bound) if self.expected_k is None else self.expected_k

  def pairs_per_token(self):
    return getattr(self, self.bound)


class DynamicChoice(TokenChoice):
  """A token-choice router whose experts per token vary up to `max_k` (None: E), with
  capacity sized for `expected_k`, which a compute budget's target replaces."""

  def problems_for(self, num_experts):
    yield from optional_k_problems('max_k', self.max_k, num_experts)

  def dynamic_problems(self) -> Iterator[Tuple[str, str]]:
    yield from optional_k_problems('max_k', self.max_k)
    yield from self.choice_problems(expected_k_optional=False)

  def capacity_k(self, num_experts):
    del num_experts
    return self.expected_k

  def pairs_per_token(self):
    return self.max_k

  def with_budget(self, target):
    return dataclasses.replace(self, expected_k=float(target))


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  name: str
  settings: type
  # (module, settings, tokens [T, D], training, token_importance [T] or None, controls
  #   {name: traced value} from a compute budget, or {}) -> (RouterOutput, logits [T, E]
  #   or None, router params dict)
  route: Callable[..., Tuple[routing.RouterOutput, Optional[jax.Array], Dict[str, jax.Array]]]
  # (settings, route, logits, router params) -> LossTerms
  aux_losses: Callable[..., LossTerms]
  # names of the parameters this router creates in the MoE module (with every option on)
  router_params: Tuple[str, ...]
  needs_token_importance: bool = False
  # (kept router params {name: array}, direction [D] unit vector, kept expert ids)
  #   -> router params of one new expert, stacked on the expert axis
  new_expert_params: Optional[Callable[..., Dict[str, np.ndarray]]] = None
  # What a compute budget (budget.target_experts_per_token) controls, a traced value per
  # layer: an aux-loss term's name (its weight `<name>_weight`, a price: raising it lowers
  # K) or a routing setting read from `controls` (top-p's 'p': raising it raises K). None:
  # the router takes no budget.
  budget_control: Optional[str] = None
  budget_control_raises_k: bool = False
  # Upcycling from a dense model: (fresh router params, the dense FFN inputs [N, D], the
  # target experts per token, kmeans(inputs, num_clusters) -> unit centroids) -> router
  # params set from data. None: the fresh (small random) init is kept.
  upcycle_router: Optional[Callable[..., Dict[str, np.ndarray]]] = None
  # True where a token's experts depend on the other tokens of its routing group (expert
  # choice: each expert takes its top tokens): in a causal LM, on later tokens.
  routes_across_tokens: bool = False
  # True where the router reads controls['bias'] [E], a per-expert offset of the scores it
  # selects by and not of its combine weights (loss-free balancing, train.balance).
  selection_bias: bool = False

  def budget_initial(self, settings) -> float:
    """The controlled value's start: the setting (p) or the loss weight it replaces."""
    if self.budget_control_raises_k:
      return float(getattr(settings, self.budget_control))
    return float(getattr(settings, f'{self.budget_control}_weight') or 0.01)


# ----------------------------------------------------------------------------- checks


def priority_problems(priority) -> Iterator[Tuple[str, str]]:
  if priority not in routing.PRIORITIES:
    yield 'priority', f'must be one of {routing.PRIORITIES}'


def weight_problems(settings) -> Iterator[Tuple[str, str]]:
  for f in dataclasses.fields(settings):
    if f.name.endswith('_weight'):
      value = getattr(settings, f.name)
      if not is_number(value) or value < 0:
        yield f.name, 'must be a number >= 0'


def k_problems(field: str, k, num_experts: Optional[int] = None) -> Iterator[Tuple[str, str]]:
  if not is_int(k) or k < 1:
    yield field, 'must be an int >= 1'
  elif num_experts is not None and k > num_experts:
    yield field, f'must be <= the {num_experts} experts'


def optional_k_problems(field: str, k, num_experts: Optional[int] = None):
  return () if k is None else k_problems(field, k, num_experts)


def positive_problems(field: str, value, optional: bool = False):
  if optional and value is None:
    return
  if not is_number(value) or value <= 0:
    yield field, 'must be a number > 0'


# ----------------------------------------------------------------------------- helpers


def param(module: nn.Module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


def logits(module, tokens):
  """[T, E] float32 router logits from a [D, E] kernel."""
  kernel = param(module, 'router_kernel', module.router_init,
                 (tokens.shape[-1], module.num_experts), ('embed', 'expert'))
  return routing.upcast(tokens) @ routing.upcast(kernel), {'router_kernel': kernel}


def new_logit_router(kept, direction, keep):
  kernel = kept['router_kernel']  # [D, E]
  scale = float(np.mean(np.linalg.norm(kernel[:, list(keep)], axis=0))) if keep else 1.0
  return {'router_kernel': (direction * scale)[:, None].astype(kernel.dtype)}


def balance_and_z(settings, route, router_logits) -> LossTerms:
  return {'load_balance': (settings.load_balance_weight,
                           lambda: losses.load_balance(route.scores, route.mask)),
          'z_loss': (settings.z_loss_weight, lambda: losses.z_loss(router_logits))}


LOGIT_ROUTER = dict(router_params=('router_kernel',), new_expert_params=new_logit_router)
