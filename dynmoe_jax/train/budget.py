"""A compute budget for dynamic routers: the mean experts per token held at a target.

Neither the DynMoE paper nor other MoE libraries offer one for threshold routing. Each
MoE layer's weight of the router's budget loss (top-any: the efficiency loss, mean
K / E) is controller state, adapted every step in the manner of ReMoE's adaptive L1
coefficient (arXiv 2412.14711): multiplied by `rate` while the layer activates more
experts per token than the target, divided by it while fewer. Tokens still choose
their own K; the controller only moves the price of an expert. The weights live in
the train state: checkpointed, exact on resume, replicated on a mesh.

The count controlled is the one evaluation reports: training's experts per token plus
the tokens that activated none (in evaluation those fall back to their top-1 expert),
unless training falls back too (`top_any_train_fallback`): then training's count already
holds that expert.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dynmoe_jax import names, routers

MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e2


@dataclasses.dataclass(frozen=True)
class Budget:
  target: float              # experts per token
  rate: float                # multiplicative step of the weight, > 1
  loss: str                  # the aux-loss term whose weight is controlled
  initial_weight: float
  layers: Tuple[str, ...]    # MoE block names
  # training's active_experts lacks evaluation's top-1 fallback for unrouted tokens
  add_unrouted: bool = True

  def initial_controls(self) -> Dict[str, jax.Array]:
    return {layer: jnp.asarray(self.initial_weight, jnp.float32) for layer in self.layers}

  def loss_weights(self, controls: Mapping[str, jax.Array]) -> Dict[str, Dict[str, jax.Array]]:
    return {layer: {self.loss: controls[layer]} for layer in self.layers}

  def update(self, controls: Mapping[str, jax.Array], metrics: Mapping[str, jax.Array]
             ) -> Dict[str, jax.Array]:
    out = {}
    for layer in self.layers:
      experts = metrics[names.metric_key(layer, 'active_experts')]
      if self.add_unrouted:
        experts = experts + metrics[names.metric_key(layer, 'unrouted_fraction')]
      factor = jnp.where(experts > self.target, self.rate, 1.0 / self.rate)
      out[layer] = jnp.clip(controls[layer] * factor, MIN_WEIGHT, MAX_WEIGHT).astype(jnp.float32)
    return out


def from_config(config, layout: Sequence[int]) -> Optional[Budget]:
  moe = config.model.moe
  if moe.target_experts_per_token is None:
    return None
  loss = routers.get(moe.router).budget_loss
  initial = moe[f'{loss}_weight'] or 0.01
  return Budget(float(moe.target_experts_per_token), float(moe.budget_rate), loss,
                float(initial), tuple(names.moe_layer_names(layout)),
                add_unrouted=not moe.top_any_train_fallback)
