"""ReMoE (Wang, Zhu, Chen, ICLR 2025, arXiv 2412.14711): ReLU routing.

A token's gate for expert e is relu(x·W_e): the experts with a positive gate are its
experts, any number, zero included, and the gate itself is the combine weight (no softmax,
no renormalisation), so routing is continuous and the router is trained by the task loss
everywhere but at zero. Sparsity is steered by an L1 penalty on the gates whose weight a
controller adapts toward a target: here the compute budget (`budget.target_experts_per_token`)
acting on `l1_weight` (ReMoE's rule, lambda multiplied by alpha while the layer takes more
experts than the target and divided while fewer, is `budget.rate=1.2 budget.error_unit=0
budget.horizon=0`). The penalty is ReMoE's load-balanced L1: the mean gate of each expert
weighted by its share of routed pairs, so busy experts are pushed down first.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dynmoe_jax import losses, routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReMoE(base.DynamicChoice):
  """ReMoE's settings.

  max_k: most experts per token (bounds the pair list); None: E.
  expected_k: experts per token capacity is sized for and the L1 term's k (ReMoE's target
    k; a compute budget's target replaces it).
  priority: which pairs an overflowing expert keeps (routing.PRIORITIES); 'score': the
    largest gates.
  l1_weight: weight of the load-balanced L1 penalty (the controlled value under a budget,
    its starting point).
  z_loss_weight: ST-MoE's z-loss on the router logits (0: off, as in ReMoE).
  """
  name = 'remoe'
  max_k: Optional[int] = None
  expected_k: float = 2.0
  priority: str = 'score'
  l1_weight: float = 0.01
  z_loss_weight: float = 0.0

  def problems(self):
    yield from self.dynamic_problems()


def relu_route(logits: jax.Array) -> routing.RouterOutput:
  """[T, E] logits -> ReMoE routing: gates relu(logits), routed where positive, combine
  weights the gates themselves."""
  logits = routing.upcast(logits)
  gates = jax.nn.relu(logits)
  mask = gates > 0
  return routing.RouterOutput(mask=mask, weights=gates, scores=gates,
                              num_active=mask.sum(axis=-1, dtype=jnp.int32))


def l1_balance(gates: jax.Array, mask: jax.Array, k: float) -> jax.Array:
  """ReMoE's load-balanced L1 penalty: E · Σ_e (Σ_t gate_te / T) · (Σ_t 1[routed_te] / (T·k)),
  the Switch load-balance formula with the ReLU gates for probabilities; without the
  counts' weighting (uniform load at k experts per token) it is Σ_te gate_te / T."""
  num_tokens, num_experts = gates.shape
  gates = routing.upcast(gates)
  share = mask.astype(gates.dtype).sum(axis=0) / (num_tokens * k)
  return num_experts * jnp.sum(gates.mean(axis=0) * share)


def route(module, settings: ReMoE, tokens, training, token_importance, controls):
  del training, token_importance, controls
  router_logits, params = base.logits(module, tokens)
  # max_k (pairs_per_token) bounds the pair list at dispatch: pairs past it are dropped
  # and counted, as for top-any.
  return relu_route(router_logits), router_logits, params


def aux_losses(settings: ReMoE, route_out, router_logits, params) -> base.LossTerms:
  del params
  return {'l1': (settings.l1_weight,
                 lambda: l1_balance(route_out.weights, route_out.mask, settings.expected_k)),
          'z_loss': (settings.z_loss_weight, lambda: losses.z_loss(router_logits))}


# A budget prices experts through the L1 weight, as ReMoE adapts its lambda.
SPEC = base.RouterSpec('remoe', ReMoE, route, aux_losses, budget_control='l1',
                       **base.LOGIT_ROUTER)
