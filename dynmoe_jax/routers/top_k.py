"""Top-k token choice (Switch, GShard): each token's k most probable experts."""
from __future__ import annotations

import dataclasses
from typing import Optional

from dynmoe_jax import routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(base.BoundedChoice, base.LogitChoice):
  """Top-k's settings.

  k: experts per token, exactly.
  normalize: renormalise the kept probabilities to sum to 1; None: only for k >= 2 (at
    k = 1 the raw probability, as Switch, so the task loss trains the router).
  expected_k: experts per token capacity is sized for (None: k).
  priority: which pairs an overflowing expert keeps; 'gshard' (every first choice before
    any second choice, by token index) is flaxformer's and V-MoE's default, so no
    token's second choice takes a slot from another token's first.
  load_balance_weight, z_loss_weight: Switch's losses.
  """
  name = 'top_k'
  k: int = 2
  normalize: Optional[bool] = None
  priority: str = 'gshard'


def route(module, settings: TopK, tokens, training, token_importance, controls):
  del training, token_importance
  router_logits, params = base.logits(module, tokens)
  # controls['bias']: loss-free balancing's per-expert selection bias (train.balance)
  return (routing.top_k(router_logits, settings.k, normalize=settings.normalize,
                        selection_bias=controls.get('bias')), router_logits, params)


def aux_losses(settings: TopK, route_out, router_logits, params) -> base.LossTerms:
  del params
  return base.balance_and_z(settings, route_out, router_logits)


SPEC = base.RouterSpec('top_k', TopK, route, aux_losses, selection_bias=True,
                       **base.LOGIT_ROUTER)
