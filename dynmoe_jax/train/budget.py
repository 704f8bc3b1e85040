"""A compute budget for dynamic routers: the mean experts per token held at a target.

Neither the DynMoE paper nor other MoE libraries offer one for threshold routing. Each
MoE layer's weight of the router's budget loss (top-any: the efficiency loss, mean
K / E) is controller state, adapted every step in the manner of ReMoE's adaptive L1
coefficient (arXiv 2412.14711): multiplied by `rate` while the layer activates more
experts per token than the target, divided by it while fewer. Tokens still choose
their own K; the controller only moves the price of an expert. A price cannot raise K: a
layer whose own choice is below the target stays below it. `two_sided=True` lets the
weight pass through zero into a subsidy (a negative weight: the efficiency gradient then
lowers the thresholds of the experts in use). `horizon=H` acts on the count predicted H
steps ahead from its smoothed trend instead of the count now (in log space that is a
proportional-integral controller, ReMoE's rule being the integral alone): under Adam a
price above the router's break-even point lowers the thresholds at the same speed however
high it is, so a price that keeps rising until the count reaches the target has already
overshot by then, and a layer pushed below the target may stay there (experiments/results/top_any_budget.md, "The
budget's controller": ReMoE's rule ends the byte LM 17% under the target, this one within
10%). The weights (and the smoothed counts) live in the train state: checkpointed, exact
on resume, replicated on a mesh.

Top-p's control is p itself (`raises_k`), moved the other way: divided while above the
target, multiplied while below, in [MIN_P, 1]. Pricing its entropy loss instead collapsed
its router onto one or two experts. p acts on K at once, with no optimizer in between, so
the horizon only adds jitter there: top-p runs want `horizon=None` (experiments/results/top_any_budget.md, "Top-p at a
budget of 1.5").

The count controlled is the one evaluation reports: training's experts per token plus
the tokens that activated none (in evaluation those fall back to their top-1 expert),
unless training falls back too (`top_any.train_fallback`): then training's count already
holds that expert.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from dynmoe_jax import config_lib, names, routers

MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e2
MIN_P = 1e-3  # an adapted top-p p: its floor (top-1 for nearly every token) and cap 1
MAX_STEPS = 5.0  # most `rate` steps in one update (error_unit set)
TREND_DECAY = 0.9  # of the smoothed count whose step-to-step change is the trend (horizon)


def count_key(layer: str) -> str:
  """The controls' key of a layer's smoothed experts per token (horizon set)."""
  return f'{layer}/smoothed_count'


@dataclasses.dataclass(frozen=True)
class Budget:
  target: float              # experts per token
  rate: float                # multiplicative step of the controlled value, > 1
  # the aux-loss term whose weight is controlled, or the routing setting (top-p's 'p')
  control: str
  initial_weight: float      # the controlled value's start
  layers: Tuple[str, ...]    # MoE block names
  # the value raises K as it grows (top-p's p) instead of pricing experts (a loss weight)
  raises_k: bool = False
  # training's active_experts lacks evaluation's top-1 fallback for unrouted tokens
  add_unrouted: bool = True
  # the weight may change sign: below the target a negative weight subsidises experts
  two_sided: bool = False
  # None: one `rate` step per update whatever the error (ReMoE's rule). A float u: the
  # relative error |K - target| / target counts as one step per u, up to MAX_STEPS, so a
  # far-off layer is corrected in tens of steps and a near one barely moves.
  error_unit: Optional[float] = None
  # None: act on the count now. H: on the count H steps ahead at the smoothed trend.
  horizon: Optional[float] = None

  def initial_controls(self) -> Dict[str, jax.Array]:
    controls = {layer: jnp.asarray(self.initial_weight, jnp.float32) for layer in self.layers}
    if self.horizon is not None:
      # -1: no count seen yet (the first update starts the smoothing at its count)
      controls.update({count_key(layer): jnp.asarray(-1.0, jnp.float32)
                       for layer in self.layers})
    return controls

  @property
  def metric(self) -> str:
    """The train rows' name of the controlled value (moe/<layer>/<metric>)."""
    return self.control if self.raises_k else f'{self.control}_weight'

  def layer_controls(self, controls: Mapping[str, jax.Array]
                     ) -> Dict[str, Dict[str, jax.Array]]:
    """{layer: {control: traced value}}: what the model's MoE blocks read."""
    return {layer: {self.control: controls[layer]} for layer in self.layers}

  def report(self, controls: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """The controlled value of each layer, as its train rows show it."""
    return {names.metric_key(layer, self.metric): controls[layer] for layer in self.layers}

  def update(self, controls: Mapping[str, jax.Array], metrics: Mapping[str, jax.Array]
             ) -> Dict[str, jax.Array]:
    out = {}
    for layer in self.layers:
      experts = counted_experts(metrics, layer, self.add_unrouted)
      if self.horizon is not None:
        previous = controls[count_key(layer)]
        first = previous < 0  # no count seen yet: no trend
        smoothed = jnp.where(first, experts,
                             TREND_DECAY * previous + (1 - TREND_DECAY) * experts)
        out[count_key(layer)] = smoothed.astype(jnp.float32)
        trend = jnp.where(first, 0.0, smoothed - previous)
        experts = experts + self.horizon * trend
      above = experts > self.target
      weight = controls[layer]
      # Python floats for the plain rule: its runs stay bit-identical to the rule's first
      # version (1 / rate rounded in float32 instead moves a trajectory by an ulp per step,
      # and training is chaotic enough that the final accuracies move).
      step, inverse = self.rate, 1.0 / self.rate
      if self.error_unit is not None:
        error = jnp.abs(experts - self.target) / self.target
        step = jnp.power(self.rate, jnp.minimum(error / self.error_unit, MAX_STEPS))
        inverse = 1.0 / step
      if self.raises_k:
        factor = jnp.where(above, inverse, step)
        out[layer] = jnp.clip(weight * factor, MIN_P, 1.0).astype(jnp.float32)
        continue
      if not self.two_sided:
        factor = jnp.where(above, step, inverse)
        out[layer] = jnp.clip(weight * factor, MIN_WEIGHT, MAX_WEIGHT).astype(jnp.float32)
        continue
      # The magnitude moves multiplicatively as above; a weight that shrinks past
      # MIN_WEIGHT changes sign, so the controller can raise K as well as lower it.
      away_from_zero = above == (weight > 0)
      magnitude = jnp.abs(weight) * jnp.where(away_from_zero, step, inverse)
      crosses = ~away_from_zero & (magnitude < MIN_WEIGHT)
      sign = jnp.where(crosses, -jnp.sign(weight), jnp.sign(weight))
      magnitude = jnp.where(crosses, MIN_WEIGHT, jnp.clip(magnitude, MIN_WEIGHT, MAX_WEIGHT))
      out[layer] = (sign * magnitude).astype(jnp.float32)
    return out


def counted_experts(metrics: Mapping[str, jax.Array], layer: str, add_unrouted: bool
                    ) -> jax.Array:
  """A layer's experts per token as a budget counts them: the step's mean, plus the
  tokens that activated none where evaluation gives those their top-1 expert."""
  experts = metrics[names.metric_key(layer, 'active_experts')]
  if add_unrouted:
    experts = experts + metrics[names.metric_key(layer, 'unrouted_fraction')]
  return experts


def from_config(config, layout: Sequence[int]) -> Optional[Budget]:
  """The per-layer controller (`budget.controller='rate'`), or None."""
  settings = config_lib.budget_settings(config)
  if not settings.enabled or settings.controller != 'rate':
    return None
  router = config_lib.router_settings(config)
  spec = routers.get(router.name)
  return Budget(float(settings.target_experts_per_token), float(settings.rate),
                spec.budget_control, spec.budget_initial(router),
                tuple(names.moe_layer_names(layout)),
                raises_k=spec.budget_control_raises_k,
                add_unrouted=router.falls_back_in_eval_only(),
                two_sided=bool(settings.two_sided),
                error_unit=config_lib.off_or_float(settings.error_unit),
                horizon=config_lib.off_or_float(settings.horizon))
