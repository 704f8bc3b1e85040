"""DTop-p (Jin et al., arXiv 2512.13996): top-p routing whose threshold p a
proportional-integral controller sets so that the experts per token meet a compute target,
one p shared by every MoE layer, with a "dynamic routing normalisation" of each layer's
logits so that layers can still differ under the shared p.

The controller is the budget's `controller='pi'` (train.pi_budget). The normalisation is
this library's reading of the paper's abstract (its full text was not at hand): each
token's router logits standardised over the experts (zero mean, unit variance) and
multiplied by a learned per-layer temperature `logit_scale`. Standardising makes the
temperature the only thing that sets how peaked a layer's distribution is, so a layer
learns how many experts the shared p gives its tokens. docs/routers.md says so.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynmoe_jax import routing
from dynmoe_jax.routers import base, top_p

_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class DTopP(top_p.TopP):
  """DTop-p's settings: top-p's (p is the controller's start under a budget) and

  normalize: route over standardised logits times the learned `logit_scale`; False: top-p.
  initial_scale: `logit_scale`'s start.
  """
  name = 'dtop_p'
  normalize: bool = True
  initial_scale: float = 1.0

  def problems(self):
    yield from super().problems()
    yield from base.positive_problems('initial_scale', self.initial_scale)


def normalized_logits(logits: jax.Array, scale) -> jax.Array:
  """[T, E] logits standardised over the experts, times `scale`."""
  logits = routing.upcast(logits)
  centred = logits - logits.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(centred ** 2, axis=-1, keepdims=True) + _EPS)
  return centred / std * jnp.asarray(scale, jnp.float32)


def route(module, settings: DTopP, tokens, training, token_importance, controls):
  del training, token_importance
  router_logits, params = base.logits(module, tokens)
  if settings.normalize:
    scale = base.param(module, 'logit_scale', nn.initializers.constant(settings.initial_scale),
                       (), ())
    router_logits = normalized_logits(router_logits, scale)
    params = {**params, 'logit_scale': scale}
  p = controls.get('p', settings.p)  # the controller's shared p, else the setting
  out = routing.top_p(router_logits, p, settings.max_k, selection_bias=controls.get('bias'))
  return out, router_logits, params


SPEC = base.RouterSpec('dtop_p', DTopP, route, top_p.aux_losses, budget_control='p',
                       budget_control_raises_k=True, selection_bias=True,
                       router_params=('router_kernel', 'logit_scale'),
                       new_expert_params=base.new_logit_router)
