"""Expert choice (Zhou et al. 2022): each expert takes its top tokens, so nothing is
dropped and balance holds by construction."""
from __future__ import annotations

import dataclasses

from dynmoe_jax import capacity, losses, routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertChoice(base.RouterSettings):
  """Expert choice's settings.

  k: experts per token on average: each expert takes ceil(T·k/E) tokens of its group.
  z_loss_weight: its only loss.
  """
  name = 'expert_choice'
  k: int = 2
  z_loss_weight: float = 1e-3

  def problems(self):
    yield from base.k_problems('k', self.k)
    yield from base.weight_problems(self)

  def problems_for(self, num_experts):
    yield from base.k_problems('k', self.k, num_experts)

  def capacity_k(self, num_experts):
    del num_experts
    return self.k

  def fixed_slots(self, num_tokens, num_experts):
    return capacity.expert_choice_slots(num_tokens, num_experts, self.k)


def route(module, settings: ExpertChoice, tokens, training, token_importance, controls):
  del training, token_importance, controls
  router_logits, params = base.logits(module, tokens)
  group_size = module.capacity.group_size
  slots = capacity.expert_choice_slots(group_size or tokens.shape[0], module.num_experts,
                                       settings.k)
  choose = lambda group_logits: routing.expert_choice(group_logits, slots)
  return routing.per_group(choose, group_size)(router_logits), router_logits, params


def aux_losses(settings: ExpertChoice, route_out, router_logits, params) -> base.LossTerms:
  del route_out, params
  return {'z_loss': (settings.z_loss_weight, lambda: losses.z_loss(router_logits))}


SPEC = base.RouterSpec('expert_choice', ExpertChoice, route, aux_losses,
                       routes_across_tokens=True, **base.LOGIT_ROUTER)
