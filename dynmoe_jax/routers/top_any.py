"""DynMoE top-any gating (arXiv 2405.14297): every expert whose cosine score beats its
trainable threshold, any number of experts per token (zero included)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import losses, routing
from dynmoe_jax.routers import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopAny(base.DynamicChoice):
  """Top-any's settings.

  scale: temperature of the cosine scores and thresholds (it changes the gradients, not
    which experts are active); with `learned_scale` its initial value, learned in log
    space and capped at `max_scale` (the reference's gated_multi_gate_t: 10, capped at 100).
  train_fallback: tokens with no active expert take their top-1 by score in training
    too, not only in evaluation (`routing.top_any`).
  differentiable_normalization: combine weights 1/K with the gradient of the
    normalisation (the reference's Tutel variant); False: K a constant (its DeepSpeed
    variant). Forward values are the same.
  max_k: bounds the pair list the sort and ragged paths build (T·max_k, not T·E); pairs
    past it are dropped and counted, like capacity drops. None: E.
  expected_k: experts per token capacity is sized for (a compute budget's target
    replaces it).
  priority: which pairs an overflowing expert keeps (routing.PRIORITIES).
  *_weight: the reference's four terms (diversity, simplicity, load_balance over tokens
    with an expert, efficiency: mean K / E) and GShard's loss on the binary scores
    (gshard_balance, off by default). A loss whose weight is 0 is not computed.
  """
  name = 'top_any'
  scale: float = 1.0
  learned_scale: bool = False
  max_scale: float = 100.0
  train_fallback: bool = False
  differentiable_normalization: bool = False
  max_k: Optional[int] = None
  expected_k: float = 2.0
  priority: str = 'score'
  diversity_weight: float = 0.01
  simplicity_weight: float = 0.01
  load_balance_weight: float = 0.01
  efficiency_weight: float = 0.01
  gshard_balance_weight: float = 0.0

  def falls_back_in_eval_only(self):
    return not self.train_fallback

  def problems(self):
    yield from base.positive_problems('scale', self.scale)
    if self.learned_scale and not (base.is_number(self.max_scale) and
                                   self.max_scale >= self.scale):
      yield 'max_scale', f'must be a number >= scale={self.scale} (the learned temperature\'s cap)'
    yield from self.dynamic_problems()


def route(module, settings: TopAny, tokens, training, token_importance, controls):
  del token_importance, controls
  num_experts, width = module.num_experts, tokens.shape[-1]
  gate_embeddings = base.param(module, 'gate_embeddings', nn.initializers.orthogonal(),
                               (num_experts, width), ('expert', 'embed'))
  thresholds = base.param(module, 'thresholds', nn.initializers.zeros, (num_experts,),
                          ('expert',))
  params = {'gate_embeddings': gate_embeddings, 'thresholds': thresholds}
  scale = settings.scale
  if settings.learned_scale:
    # The reference's learned temperature (gated_multi_gate_t): exp of a parameter,
    # capped; the cap stops its gradient too, as torch.clamp does there.
    params['log_scale'] = base.param(module, 'log_scale', nn.initializers.constant(
        np.log(settings.scale)), (), ())
    scale = jnp.exp(jnp.minimum(routing.upcast(params['log_scale']),
                                np.log(settings.max_scale)))
  out = routing.top_any(tokens, gate_embeddings, thresholds, scale=scale, training=training,
                        differentiable_normalization=settings.differentiable_normalization,
                        train_fallback=settings.train_fallback)
  return out, None, params


def aux_losses(settings: TopAny, route_out, router_logits, params) -> base.LossTerms:
  """The reference's four terms (DeepSpeed variant, 2025); at equal weights c the sum is
  c × its l_aux."""
  del router_logits
  embeddings = params['gate_embeddings']
  gates, mask, scores = route_out.gates, route_out.mask, route_out.scores
  return {'diversity': (settings.diversity_weight, lambda: losses.diversity(embeddings)),
          'simplicity': (settings.simplicity_weight, lambda: losses.simplicity(embeddings)),
          'load_balance': (settings.load_balance_weight,
                           lambda: losses.top_any_load_balance(gates, mask)),
          'efficiency': (settings.efficiency_weight, lambda: losses.efficiency(gates)),
          'gshard_balance': (settings.gshard_balance_weight,
                             lambda: losses.top_any_gshard_balance(gates, scores))}


def new_expert(kept, direction, keep):
  del keep
  return {'gate_embeddings': direction[None, :].astype(kept['gate_embeddings'].dtype),
          'thresholds': np.zeros((1,), kept['thresholds'].dtype)}


def upcycle(fresh, inputs, target_k, kmeans):
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


SPEC = base.RouterSpec(
    'top_any', TopAny, route, aux_losses,
    router_params=('gate_embeddings', 'thresholds', 'log_scale'),
    new_expert_params=new_expert, budget_control='efficiency', upcycle_router=upcycle)
