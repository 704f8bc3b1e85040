"""Null experts (AdaMoE, Zeng et al., EMNLP Findings 2024, arXiv 2406.13233; the
"zero-computation experts" of MoE++ and LongCat-Flash): top-k over the E real experts and
`num_null` null experts that output zero and cost nothing, so a token's real experts vary
from max(0, k - num_null) to k. A load-balance term in which the null experts count as one
group (their loads and probabilities averaged: they are interchangeable) sets how often they
are chosen, and so the mean real experts per token: k·E/(E + num_null) at balanced load.

The budget's control is `null_weight`, a multiplier of the null experts' probabilities
(an offset log(null_weight) on their logits): raised while a layer takes more real experts
per token than the target, lowered while fewer.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dynmoe_jax import losses, routing
from dynmoe_jax.routers import base

_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class NullExperts(base.LogitChoice):
  """Null experts' settings.

  k: experts per token, real and null together (AdaMoE's enlarged top-k).
  num_null: null experts (their router logits are parameters of their own, `null_kernel`).
  normalize: renormalise the kept real experts' probabilities to sum to 1 (the output's
    scale then does not shrink with the null experts taken); False: the raw probabilities.
  null_weight: multiplier of the null experts' probabilities (a budget's control).
  expected_k: real experts per token capacity is sized for; None: k·E/(E + num_null).
  priority: which pairs an overflowing expert keeps (routing.PRIORITIES).
  load_balance_weight: the null-aware load balance; z_loss_weight: over all E + num_null.
  """
  name = 'null_experts'
  k: int = 2
  num_null: int = 2
  normalize: bool = True
  null_weight: float = 1.0

  def problems(self):
    yield from base.k_problems('k', self.k)
    yield from base.k_problems('num_null', self.num_null)
    yield from base.positive_problems('null_weight', self.null_weight)
    yield from self.choice_problems()

  def problems_for(self, num_experts):
    yield from base.k_problems('k', self.k, num_experts + self.num_null)

  def capacity_k(self, num_experts):
    if self.expected_k is not None:
      return self.expected_k
    return self.k * num_experts / (num_experts + self.num_null)

  def pairs_per_token(self):
    return self.k

  def with_budget(self, target):
    return dataclasses.replace(self, expected_k=float(target))


def null_route(logits: jax.Array, null_logits: jax.Array, k: int, *, null_weight=1.0,
               normalize: bool = True) -> routing.RouterOutput:
  """[T, E] real and [T, N] null logits -> routing over the real experts: softmax over all
  E + N, top-k, the real experts among them routed with their probabilities
  (renormalised to sum to 1 with `normalize`); scores are the real experts'
  probabilities. `null_weight` multiplies the null probabilities before the softmax's
  normalisation (a traced value too)."""
  all_logits = with_null(logits, null_logits, null_weight)
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(all_logits, axis=-1)
  chosen = top_k_mask(probs, k)
  mask, real = chosen[:, :num_experts], probs[:, :num_experts]
  weights = real
  if normalize:
    weights = real / (jnp.where(mask, real, 0.0).sum(axis=-1, keepdims=True) + _EPS)
  return routing.RouterOutput(mask=mask, weights=jnp.where(mask, weights, 0.0), scores=real,
                              num_active=mask.sum(axis=-1, dtype=jnp.int32))


def with_null(logits, null_logits, null_weight=1.0) -> jax.Array:
  """[T, E + N] logits of the real and the null experts, the null ones offset by
  log(null_weight)."""
  offset = jnp.log(jnp.asarray(null_weight, jnp.float32))
  return jnp.concatenate([routing.upcast(logits), routing.upcast(null_logits) + offset], -1)


def top_k_mask(probs: jax.Array, k: int) -> jax.Array:
  """bool[T, N]: each row's k largest entries (ties: the lower index)."""
  _, top_idx = jax.lax.top_k(probs, k)
  return jax.nn.one_hot(top_idx, probs.shape[-1], dtype=jnp.bool_).any(axis=-2)


def null_aware_balance(all_logits: jax.Array, k: int, num_experts: int) -> jax.Array:
  """AdaMoE's load balance over E real + N null experts: (E + N) · Σ_i f_i · P̄_i with f
  the share of routed pairs and P̄ the mean probability, the null experts' f and P̄ each
  replaced by their mean over the null experts (one group); 1 under uniform routing."""
  probs = jax.nn.softmax(routing.upcast(all_logits), axis=-1)
  chosen = top_k_mask(probs, k).astype(probs.dtype)
  share = chosen.sum(axis=0) / jnp.maximum(chosen.sum(), 1.0)
  mean_prob = probs.mean(axis=0)
  grouped = lambda v: jnp.concatenate(
      [v[:num_experts], jnp.broadcast_to(v[num_experts:].mean(), v[num_experts:].shape)])
  return probs.shape[-1] * jnp.sum(grouped(share) * grouped(mean_prob))


def route(module, settings: NullExperts, tokens, training, token_importance, controls):
  del training, token_importance
  router_logits, params = base.logits(module, tokens)
  null_kernel = base.param(module, 'null_kernel', module.router_init,
                           (tokens.shape[-1], settings.num_null), ('embed', None))
  null_logits = routing.upcast(tokens) @ routing.upcast(null_kernel)
  null_weight = controls.get('null', settings.null_weight)  # a budget's adapted value
  out = null_route(router_logits, null_logits, settings.k, null_weight=null_weight,
                   normalize=settings.normalize)
  # the losses see every expert's logits, the null ones included
  return out, with_null(router_logits, null_logits, null_weight), {
      **params, 'null_kernel': null_kernel}


def aux_losses(settings: NullExperts, route_out, all_logits, params) -> base.LossTerms:
  del route_out
  num_experts = params['router_kernel'].shape[-1]
  return {'load_balance': (settings.load_balance_weight,
                           lambda: null_aware_balance(all_logits, settings.k, num_experts)),
          'z_loss': (settings.z_loss_weight, lambda: losses.z_loss(all_logits))}


# The budget prices real experts through the null experts' weight (`null_weight`).
SPEC = base.RouterSpec('null_experts', NullExperts, route, aux_losses,
                       router_params=('router_kernel', 'null_kernel'),
                       new_expert_params=base.new_logit_router, budget_control='null')
