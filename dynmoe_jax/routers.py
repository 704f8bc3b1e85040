"""The router registry: one `RouterSpec` per router name.

A spec says everything the rest of the library needs to know about a router:
the parameters it creates, how it routes, the most experts a token can take
(bounds the sorted pair list), how many experts per token capacity is sized for,
its auxiliary losses, which of its parameters are router parameters (non-finite
report, adaptive resize), how a new expert's router parameters are initialised,
and how its settings are validated. `layers.MoE`, `config_lib.validate`,
`adaptive` and the trainer read the spec; none of them switches on a router name.
Adding a router = a spec here, its routing function in `routing.py`, its tests.

Spec functions take `settings`: the `layers.MoE` instance (or any object with the
same attribute names, e.g. a config's `model.moe`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import dispatch, losses, routing

# name -> (weight, thunk computing the unweighted loss)
LossTerms = Dict[str, Tuple[float, Callable[[], jax.Array]]]


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  name: str
  # (module, tokens [T, D], training, token_importance [T] or None, controls {name: traced
  #   value} from a compute budget, or {}) -> (RouterOutput, logits [T, E] or None,
  #   router params dict)
  route: Callable[..., Tuple[routing.RouterOutput, Optional[jax.Array], Dict[str, jax.Array]]]
  # (settings, route, logits, router params) -> LossTerms
  aux_losses: Callable[..., LossTerms]
  # names of the parameters this router creates in the MoE module (with every option on)
  router_params: Tuple[str, ...]
  # settings -> most experts a token can be routed to (None = any number, up to E)
  pairs_per_token: Callable[[Any], Optional[int]] = lambda s: None
  # settings -> experts per token that capacity is sized for
  expected_k: Callable[[Any], float] = lambda s: s.k if s.expected_k is None else s.expected_k
  # (settings, num_tokens, num_experts) -> capacity; None = the capacity-factor rule
  fixed_capacity: Optional[Callable[[Any, int, int], int]] = None
  # (settings, num_experts) -> [(field, message)] for invalid settings
  check: Callable[[Any, int], List[Tuple[str, str]]] = lambda s, e: []
  needs_token_importance: bool = False
  # (kept router params {name: array}, direction [D] unit vector, kept expert ids)
  #   -> router params of one new expert, stacked on the expert axis
  new_expert_params: Optional[Callable[..., Dict[str, np.ndarray]]] = None
  # What a compute budget (target_experts_per_token) controls, a traced value per layer:
  # an aux-loss term's name (its weight, a price: raising it lowers K) or a routing setting
  # read from `controls` (top-p's 'p': raising it raises K). None: the router takes no budget.
  budget_control: Optional[str] = None
  budget_control_raises_k: bool = False
  # Upcycling from a dense model: (fresh router params, the dense FFN inputs [N, D], the
  # target experts per token, kmeans(inputs, num_clusters) -> unit centroids) -> router
  # params set from data. None: the fresh (small random) init is kept.
  upcycle_router: Optional[Callable[..., Dict[str, np.ndarray]]] = None
  # The overflow order when MoE.priority is None: 'score' (most confident pairs first),
  # 'index', or a token-choice order of routing.choice_priority ('gshard', 'batch').
  default_priority: str = 'score'
  # True where a token's experts depend on the other tokens of its routing group (expert
  # choice: each expert takes its top tokens): in a causal LM, on later tokens.
  routes_across_tokens: bool = False


def _param(module: nn.Module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


# ----------------------------------------------------------------------------- top-any


def _route_top_any(module, tokens, training, token_importance, controls):
  del token_importance, controls
  num_experts, width = module.num_experts, tokens.shape[-1]
  gate_embeddings = _param(module, 'gate_embeddings', nn.initializers.orthogonal(),
                           (num_experts, width), ('expert', 'embed'))
  thresholds = _param(module, 'thresholds', nn.initializers.zeros, (num_experts,), ('expert',))
  params = {'gate_embeddings': gate_embeddings, 'thresholds': thresholds}
  scale = module.top_any_scale
  if module.top_any_learned_scale:
    # The reference's learned temperature (gated_multi_gate_t): exp of a parameter,
    # capped; the cap stops its gradient too, as torch.clamp does there.
    params['log_scale'] = _param(module, 'log_scale', nn.initializers.constant(
        np.log(module.top_any_scale)), (), ())
    scale = jnp.exp(jnp.minimum(routing.upcast(params['log_scale']),
                                np.log(module.top_any_max_scale)))
  out = routing.top_any(tokens, gate_embeddings, thresholds, scale=scale, training=training,
                        differentiable_normalization=module.top_any_differentiable_normalization,
                        train_fallback=module.top_any_train_fallback)
  return out, None, params


def _losses_top_any(settings, route, logits, params) -> LossTerms:
  """The reference's four terms (DeepSpeed variant, 2025); at equal weights c the sum is
  c × its l_aux."""
  del logits
  embeddings = params['gate_embeddings']
  return {'diversity': (settings.diversity_weight, lambda: losses.diversity(embeddings)),
          'simplicity': (settings.simplicity_weight, lambda: losses.simplicity(embeddings)),
          'load_balance': (settings.load_balance_weight,
                           lambda: losses.top_any_load_balance(route.gates, route.mask)),
          'efficiency': (settings.efficiency_weight, lambda: losses.efficiency(route.gates)),
          'gshard_balance': (settings.gshard_balance_weight, lambda: losses.top_any_gshard_balance(
              route.gates, route.scores))}


def _new_top_any(kept, direction, keep):
  del keep
  return {'gate_embeddings': direction[None, :].astype(kept['gate_embeddings'].dtype),
          'thresholds': np.zeros((1,), kept['thresholds'].dtype)}


def _upcycle_top_any(fresh, inputs, target_k, kmeans):
  """Gate embeddings at the k-means centroids of the directions in which the inputs
  differ from their mean direction; one threshold for all experts, the cosine above
  which the (token, expert) pairs of the inputs are a target_k / E fraction, so that
  tokens activate target_k experts on average.

  Why centred: a block's normalised inputs share a large common direction, so their
  cosines with centroids of the raw directions crowd into a narrow band around the
  threshold, and the first few updates (Adam moves every gate coordinate by about the
  learning rate) tip most tokens below it. Centroids of the deviations are nearly
  orthogonal to the common direction and to each other (what the diversity loss asks
  for), and the cosines spread out."""
  num_experts = fresh['gate_embeddings'].shape[0]
  unit = inputs / np.maximum(np.linalg.norm(inputs, axis=-1, keepdims=True), 1e-12)
  centroids = kmeans(unit - unit.mean(0), num_experts)
  cosine = unit @ centroids.T
  # Active iff cosine > threshold (top-any compares sigmoid(scale·cos) with
  # sigmoid(scale·threshold)); -1.01 keeps every expert active at target_k = E.
  threshold = (np.quantile(cosine, 1.0 - target_k / num_experts) if target_k < num_experts
               else -1.01)
  return {'gate_embeddings': centroids.astype(fresh['gate_embeddings'].dtype),
          'thresholds': np.full((num_experts,), threshold, fresh['thresholds'].dtype)}


# ----------------------------------------------------------------------------- logit routers


def _logits(module, tokens):
  kernel = _param(module, 'router_kernel', module.router_init, (tokens.shape[-1],
                                                                module.num_experts),
                  ('embed', 'expert'))
  return routing.upcast(tokens) @ routing.upcast(kernel), {'router_kernel': kernel}


def _new_logit_router(kept, direction, keep):
  kernel = kept['router_kernel']  # [D, E]
  scale = float(np.mean(np.linalg.norm(kernel[:, list(keep)], axis=0))) if keep else 1.0
  return {'router_kernel': (direction * scale)[:, None].astype(kernel.dtype)}


def _balance_and_z(settings, route, logits) -> LossTerms:
  return {'load_balance': (settings.load_balance_weight,
                           lambda: losses.load_balance(route.scores, route.mask)),
          'z_loss': (settings.z_loss_weight, lambda: losses.z_loss(logits))}


def _route_top_k(module, tokens, training, token_importance, controls):
  del training, token_importance, controls
  logits, params = _logits(module, tokens)
  return routing.top_k(logits, module.k, normalize=module.normalize_top_k), logits, params


def _route_top_p(module, tokens, training, token_importance, controls):
  del training, token_importance
  logits, params = _logits(module, tokens)
  p = controls.get('p', module.p)  # a compute budget's adapted p, else the setting
  return routing.top_p(logits, p, module.max_k), logits, params


def _losses_top_p(settings, route, logits, params) -> LossTerms:
  del params
  return {**_balance_and_z(settings, route, logits),
          'entropy': (settings.entropy_weight, lambda: losses.router_entropy(route.scores))}


def _adaptive_max_k(settings) -> int:
  return settings.max_k if settings.max_k is not None else settings.k


def _route_adaptive_k(module, tokens, training, token_importance, controls):
  del training, controls
  if token_importance is None:
    raise ValueError("MoE(router='adaptive_k') needs token_importance (from attention)")
  logits, params = _logits(module, tokens)
  max_k = _adaptive_max_k(module)
  k_per_token = routing.importance_to_k(token_importance, max_k)
  return routing.adaptive_k(logits, k_per_token.reshape(tokens.shape[0]), max_k), logits, params


def _route_expert_choice(module, tokens, training, token_importance, controls):
  del training, token_importance, controls
  logits, params = _logits(module, tokens)
  group = module.group_size or tokens.shape[0]  # each expert picks within its group
  capacity = routing.expert_choice_capacity(group, module.num_experts, module.k)
  choose = lambda group_logits: routing.expert_choice(group_logits, capacity)
  return routing.per_group(choose, module.group_size)(logits), logits, params


def _k_within(k, num_experts, what=''):
  if k < 1:
    return [('k', f'{what}must be >= 1')]
  if k > num_experts:
    return [('k', f'{what}must be <= the {num_experts} experts')]
  return []


def _check_k_within(settings, num_experts):
  return _k_within(settings.k, num_experts)


def _check_adaptive_k(settings, num_experts):
  if settings.max_k is not None:
    return []
  return _k_within(settings.k, num_experts, '(the max_k of adaptive_k while max_k is unset) ')


def _budget_or_expected_k(settings) -> float:
  """Capacity is sized for a compute budget's target where one is set."""
  if settings.target_experts_per_token:
    return settings.target_experts_per_token
  return settings.k if settings.expected_k is None else settings.expected_k


_LOGIT_ROUTER = dict(router_params=('router_kernel',), new_expert_params=_new_logit_router)

REGISTRY: Dict[str, RouterSpec] = {spec.name: spec for spec in (
    RouterSpec('top_any', _route_top_any, _losses_top_any,
               router_params=('gate_embeddings', 'thresholds', 'log_scale'),
               expected_k=_budget_or_expected_k,
               new_expert_params=_new_top_any, budget_control='efficiency',
               upcycle_router=_upcycle_top_any,
               # max_k bounds the pair list (T·max_k, not T·E); pairs past it are dropped
               # and counted, like capacity drops
               pairs_per_token=lambda s: s.max_k),
    # GShard's order, the default of flaxformer and V-MoE (their batch priority is opt-in):
    # no token's second choice takes a slot from another token's first
    RouterSpec('top_k', _route_top_k,
               lambda s, r, logits, p: _balance_and_z(s, r, logits),
               pairs_per_token=lambda s: s.k, check=_check_k_within,
               default_priority='gshard', **_LOGIT_ROUTER),
    # A budget adapts p itself: the same multiplicative steps, p lowered while the layer
    # takes more experts per token than the target and raised while fewer
    RouterSpec('top_p', _route_top_p, _losses_top_p, pairs_per_token=lambda s: s.max_k,
               expected_k=_budget_or_expected_k, budget_control='p',
               budget_control_raises_k=True, **_LOGIT_ROUTER),
    RouterSpec('adaptive_k', _route_adaptive_k,
               lambda s, r, logits, p: _balance_and_z(s, r, logits),
               pairs_per_token=_adaptive_max_k,
               expected_k=lambda s: (_adaptive_max_k(s) if s.expected_k is None
                                     else s.expected_k),
               check=_check_adaptive_k, needs_token_importance=True, **_LOGIT_ROUTER),
    # Each expert picks exactly its capacity of tokens: nothing is ever dropped, and the
    # only loss is the z-loss (balance holds by construction).
    RouterSpec('expert_choice', _route_expert_choice,
               lambda s, r, logits, p: {'z_loss': (s.z_loss_weight,
                                                   lambda: losses.z_loss(logits))},
               fixed_capacity=lambda s, t, e: routing.expert_choice_capacity(t, e, s.k),
               routes_across_tokens=True,
               check=_check_k_within, **_LOGIT_ROUTER),
)}
NAMES = tuple(REGISTRY)
# Every parameter name any router creates: the rest of an MoE module is its experts.
ALL_ROUTER_PARAMS = tuple(sorted({p for spec in REGISTRY.values() for p in spec.router_params}))


def get(name: str) -> RouterSpec:
  if name not in REGISTRY:
    raise ValueError(f'router={name!r} is not one of {NAMES}')
  return REGISTRY[name]


def capacity(settings, num_tokens: int, num_experts: int, training: bool) -> int:
  """Slots per expert for `num_tokens` tokens: the router's fixed capacity, else the
  explicit one (`settings.capacity`, as given), else a re-planned one
  (`settings.planned_capacity`), else the capacity-factor rule."""
  spec = get(settings.router)
  if spec.fixed_capacity is not None:
    return spec.fixed_capacity(settings, num_tokens, num_experts)
  explicit = getattr(settings, 'capacity', None)
  if explicit is not None:
    return int(explicit)
  planned = getattr(settings, 'planned_capacity', None)
  if planned is not None:
    return dispatch.scaled_capacity(planned, num_tokens, settings.capacity_multiple_of,
                                    1.0 if training else
                                    settings.eval_capacity_factor / settings.capacity_factor)
  factor = settings.capacity_factor if training else settings.eval_capacity_factor
  return dispatch.expert_capacity(num_tokens, num_experts, factor, spec.expected_k(settings),
                                  settings.capacity_multiple_of)


def check(settings, num_experts: int) -> List[Tuple[str, str]]:
  """(field, message) for each setting that does not fit a layer of `num_experts`."""
  spec = get(settings.router)
  problems = list(spec.check(settings, num_experts))
  if getattr(settings, 'capacity', None) is not None and spec.fixed_capacity is not None:
    problems.append(('capacity', f'router {settings.router!r} fixes its own capacity'))
  if settings.max_k is not None and not 1 <= settings.max_k <= num_experts:
    problems.append(('max_k', f'must be in [1, {num_experts}]'))
  target = settings.target_experts_per_token
  if target is not None:
    if spec.budget_control is None:
      problems.append(('target_experts_per_token',
                       f'is for routers with a compute budget '
                       f'({[n for n, s in REGISTRY.items() if s.budget_control]}), not '
                       f'{settings.router!r}'))
    elif not 0 < target <= num_experts:
      problems.append(('target_experts_per_token', f'must be in (0, {num_experts}]'))
    if settings.budget_two_sided and spec.budget_control_raises_k:
      problems.append(('budget_two_sided', f'is for a budget that prices experts (a loss '
                       f'weight); router {settings.router!r} adapts '
                       f'{spec.budget_control!r}, which moves both ways'))
  return problems


def aux_loss(settings, route, logits, params, weights: Optional[Mapping[str, jax.Array]] = None
             ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Weighted sum of the router's auxiliary losses and each unweighted term; a term
  whose weight is 0 is not computed. `weights` replaces the settings' weights of the
  terms it names (traced values, e.g. a budget controller's)."""
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for name, (weight, loss_fn) in get(settings.router).aux_losses(
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

