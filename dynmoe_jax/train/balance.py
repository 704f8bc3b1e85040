"""Loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

Each MoE layer has a bias per expert, added to the scores its router selects by and never
to its combine weights, so it moves which experts tokens take without a gradient: after each
step b_e += rate · sign(mean load - load_e), with load_e the share of the step's routed pairs
that went to expert e. The biases live in the train state's `moe_controls` (`<layer>/bias`),
outside the optimizer, checkpointed with the state and so resumed exactly; they are
replicated on a mesh (E floats per layer), and resized with the experts at an adaptive
boundary (`resized`). Train rows show each layer's max/min load ratio
(`moe/<layer>/load_ratio`) and the bias's spread (`moe/<layer>/bias_range`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import config_lib, names


def bias_key(layer: str) -> str:
  """The controls' key of a layer's selection bias."""
  return f'{layer}/bias'


@dataclasses.dataclass(frozen=True)
class Balancer:
  rate: float
  layers: Tuple[str, ...]            # MoE block names
  num_experts: Tuple[int, ...]       # per block in `layers`

  def initial_controls(self) -> Dict[str, jax.Array]:
    return {bias_key(layer): jnp.zeros((n,), jnp.float32)
            for layer, n in zip(self.layers, self.num_experts)}

  def layer_controls(self, controls: Mapping[str, jax.Array]
                     ) -> Dict[str, Dict[str, jax.Array]]:
    return {layer: {'bias': controls[bias_key(layer)]} for layer in self.layers}

  def update(self, controls: Mapping[str, jax.Array], metrics: Mapping[str, jax.Array]
             ) -> Dict[str, jax.Array]:
    out = {}
    for layer in self.layers:
      load = metrics[names.metric_key(layer, 'expert_load')]
      error = jnp.mean(load) - load  # > 0: the expert got less than the mean
      out[bias_key(layer)] = (controls[bias_key(layer)] +
                              self.rate * jnp.sign(error)).astype(jnp.float32)
    return out

  def report(self, controls: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    return {names.metric_key(layer, 'bias_range'):
            jnp.max(controls[bias_key(layer)]) - jnp.min(controls[bias_key(layer)])
            for layer in self.layers}


def resized(controls: Mapping[str, jax.Array], plans: Mapping[Tuple[str, str], Any]
            ) -> Dict[str, jax.Array]:
  """`controls` with each resized layer's bias following its adaptive.LayerPlan: kept
  experts keep theirs, removed ones lose it, and a new expert starts at the kept biases'
  mean (neither favoured nor held back before its load is seen)."""
  out = dict(controls)
  for (layer, _), plan in plans.items():
    key = bias_key(layer)
    if key not in controls or plan.is_noop:
      continue
    bias = np.asarray(controls[key])
    kept = bias[list(plan.keep)]
    start = float(kept.mean()) if kept.size else 0.0
    out[key] = np.concatenate([kept, np.full((plan.num_new,), start, bias.dtype)])
  return out


def from_config(config, layout: Sequence[int]) -> Optional[Balancer]:
  settings = config_lib.balance_settings(config)
  if not settings.loss_free:
    return None
  blocks = [(names.layer_name(i), n) for i, n in enumerate(layout) if n]
  return Balancer(float(settings.rate), tuple(b for b, _ in blocks), tuple(n for _, n in blocks))
