"""DA-MoE (arXiv 2409.06669): a token's expert count follows its importance, taken from
the attention it receives."""
from __future__ import annotations

import dataclasses

from dynmoe_jax import routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptiveK(base.BoundedChoice, base.LogitChoice):
  """DA-MoE's settings.

  max_k: the largest K a token can take (the most important tokens).
  expected_k: experts per token capacity is sized for (None: max_k).
  priority: which pairs an overflowing expert keeps (routing.PRIORITIES).
  load_balance_weight, z_loss_weight: as top-k.
  """
  name = 'adaptive_k'
  bound = 'max_k'
  max_k: int = 2


def route(module, settings: AdaptiveK, tokens, training, token_importance, controls):
  del training, controls
  if token_importance is None:
    raise ValueError("MoE(router='adaptive_k') needs token_importance (from attention)")
  router_logits, params = base.logits(module, tokens)
  k_per_token = routing.importance_to_k(token_importance, settings.max_k)
  out = routing.adaptive_k(router_logits, k_per_token.reshape(tokens.shape[0]), settings.max_k)
  return out, router_logits, params


def aux_losses(settings: AdaptiveK, route_out, router_logits, params) -> base.LossTerms:
  del params
  return base.balance_and_z(settings, route_out, router_logits)


SPEC = base.RouterSpec('adaptive_k', AdaptiveK, route, aux_losses, needs_token_importance=True,
                       **base.LOGIT_ROUTER)
