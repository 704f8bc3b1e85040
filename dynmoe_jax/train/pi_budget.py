"""DTop-p's compute budget (arXiv 2512.13996; `budget.controller='pi'`): one routing
threshold shared by every MoE layer, set each step by a proportional-integral controller
on the relative error of the layers' mean experts per token,

    e = (target - K) / target,   I += e,   p = clip(p0 + kp·e + ki·I, MIN_P, 1),

with the integral frozen while p is held at a bound that the error pushes it past (no
wind-up: p leaves the bound as soon as the error turns). Against train.budget's controller
(a multiplicative step per layer): one value for all layers, where the layers differ through
the router's learned normalisation (routers.dtop_p), and an additive law with a memory.

The value and the integral live in the train state's `moe_controls` (VALUE_KEY,
INTEGRAL_KEY): checkpointed, exact on resume, replicated on a mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dynmoe_jax import config_lib, names, routers
from dynmoe_jax.train.budget import MIN_P, counted_experts

VALUE_KEY, INTEGRAL_KEY = 'pi/p', 'pi/integral'


@dataclasses.dataclass(frozen=True)
class PIBudget:
  target: float              # experts per token, the mean over the MoE layers
  initial: float             # p0: the router's p
  layers: Tuple[str, ...]    # MoE block names
  kp: float
  ki: float
  # training's active_experts lacks evaluation's top-1 fallback for unrouted tokens
  add_unrouted: bool = False
  control: str = 'p'
  metric: str = 'p'          # train rows: moe/<layer>/p (the one value, per layer)

  def initial_controls(self) -> Dict[str, jax.Array]:
    return {VALUE_KEY: jnp.asarray(self.initial, jnp.float32),
            INTEGRAL_KEY: jnp.zeros((), jnp.float32)}

  def layer_controls(self, controls: Mapping[str, jax.Array]
                     ) -> Dict[str, Dict[str, jax.Array]]:
    return {layer: {self.control: controls[VALUE_KEY]} for layer in self.layers}

  def report(self, controls: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    return {names.metric_key(layer, self.metric): controls[VALUE_KEY] for layer in self.layers}

  def update(self, controls: Mapping[str, jax.Array], metrics: Mapping[str, jax.Array]
             ) -> Dict[str, jax.Array]:
    counts = [counted_experts(metrics, layer, self.add_unrouted) for layer in self.layers]
    error = (self.target - jnp.mean(jnp.stack(counts))) / self.target
    integral = controls[INTEGRAL_KEY] + error
    raw = self.initial + self.kp * error + self.ki * integral
    value = jnp.clip(raw, MIN_P, 1.0)
    winds_up = (raw != value) & (jnp.sign(error) == jnp.sign(raw - value))
    integral = jnp.where(winds_up, controls[INTEGRAL_KEY], integral)
    return {VALUE_KEY: value.astype(jnp.float32), INTEGRAL_KEY: integral.astype(jnp.float32)}


def from_config(config, layout: Sequence[int]) -> Optional[PIBudget]:
  """DTop-p's controller (`budget.controller='pi'`), or None."""
  settings = config_lib.budget_settings(config)
  if not settings.enabled or settings.controller != 'pi':
    return None
  router = config_lib.router_settings(config)
  spec = routers.get(router.name)
  return PIBudget(float(settings.target_experts_per_token), spec.budget_initial(router),
                  tuple(names.moe_layer_names(layout)), kp=float(settings.kp),
                  ki=float(settings.ki), add_unrouted=router.falls_back_in_eval_only(),
                  control=spec.budget_control)
