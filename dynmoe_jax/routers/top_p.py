"""Top-p routing ("Harder Tasks Need More Experts", arXiv 2403.07652): experts in
probability order until their sum reaches p."""
from __future__ import annotations

import dataclasses
from typing import Optional

from dynmoe_jax import losses, routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(base.DynamicChoice, base.LogitChoice):
  """Top-p's settings.

  p: the probability mass a token's experts reach, in (0, 1] (a compute budget adapts it).
  max_k: most experts per token (bounds the pair list); None: E.
  expected_k: experts per token capacity is sized for (a budget's target replaces it).
  priority: which pairs an overflowing expert keeps (routing.PRIORITIES).
  load_balance_weight, z_loss_weight, entropy_weight: the paper's entropy loss keeps the
    router confident.
  """
  name = 'top_p'
  p: float = 0.4
  max_k: Optional[int] = None
  expected_k: float = 2.0
  entropy_weight: float = 1e-4

  def problems(self):
    if not (base.is_number(self.p) and 0.0 < self.p <= 1.0):
      yield 'p', 'must be in (0, 1]'
    yield from self.dynamic_problems()


def route(module, settings: TopP, tokens, training, token_importance, controls):
  del training, token_importance
  router_logits, params = base.logits(module, tokens)
  p = controls.get('p', settings.p)  # a compute budget's adapted p, else the setting
  out = routing.top_p(router_logits, p, settings.max_k, selection_bias=controls.get('bias'))
  return out, router_logits, params


def aux_losses(settings: TopP, route_out, router_logits, params) -> base.LossTerms:
  del params
  return {**base.balance_and_z(settings, route_out, router_logits),
          'entropy': (settings.entropy_weight,
                      lambda: losses.router_entropy(route_out.scores))}


# A budget adapts p itself: the same multiplicative steps, p lowered while the layer takes
# more experts per token than the target and raised while fewer
SPEC = base.RouterSpec('top_p', TopP, route, aux_losses, budget_control='p',
                       budget_control_raises_k=True, selection_bias=True, **base.LOGIT_ROUTER)
