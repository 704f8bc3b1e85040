"""A compute budget's settings (config section `budget`; the controller is train.budget)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from dynmoe_jax.settings import Settings, is_number

CONTROLLERS = ('rate', 'pi')


@dataclasses.dataclass(frozen=True)
class BudgetSettings(Settings):
  """Experts per token held at a target by adapting the router's control every step.

  target_experts_per_token: the target (None: no budget). Capacity is sized for it, and
    the router's control (top-any's efficiency-loss weight, top-p's p) becomes a per-layer
    controller (train.budget), multiplied or divided by `rate`.
  two_sided: below the target top-any's weight turns negative (a subsidy).
  error_unit: u: each update is rate to the power of the relative error |K - target| /
    target over u (at most 5 steps); 0 or None: one rate step whatever the error
    (ReMoE's rule).
  horizon: H: act on the count H steps ahead at its smoothed trend (a proportional term
    that stops the price winding up while the count already falls); 0 or None: on this
    step's count. error_unit and horizon both 0: the first controller, as the earlier
    budget figures of docs/results.md were measured.
  controller: 'rate' (the above, per layer) or 'pi': DTop-p's (arXiv 2512.13996) one
    threshold for every layer, p = p0 + kp·e + ki·Σe on the relative error e of the layers'
    mean count (train.pi_budget), for routers whose control is a threshold (top-p, DTop-p);
    rate, two_sided, error_unit and horizon are then unused.
  kp, ki: the PI controller's proportional and integral gains (per unit relative error).
  """
  target_experts_per_token: Optional[float] = None
  rate: float = 1.05
  two_sided: bool = False
  error_unit: Optional[float] = 0.1
  horizon: Optional[float] = 20.0
  controller: str = 'rate'
  kp: float = 0.1
  ki: float = 0.02

  def problems(self):
    target = self.target_experts_per_token
    if target is not None and not (is_number(target) and target > 0):
      yield 'target_experts_per_token', 'must be a number > 0'
    if not (is_number(self.rate) and self.rate > 1.0):
      yield 'rate', 'must be a number > 1'
    for name in ('error_unit', 'horizon'):
      value = getattr(self, name)
      if value is not None and not (is_number(value) and value >= 0):
        yield name, 'must be a number >= 0 (0 or None: off)'
    if self.controller not in CONTROLLERS:
      yield 'controller', f'must be one of {CONTROLLERS}'
    for name in ('kp', 'ki'):
      if not (is_number(getattr(self, name)) and getattr(self, name) >= 0):
        yield name, 'must be a number >= 0'

  @property
  def enabled(self) -> bool:
    return self.target_experts_per_token is not None


@dataclasses.dataclass(frozen=True)
class BalanceSettings(Settings):
  """Loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3): a bias per
  expert added to the scores a router selects by (not to its combine weights), kept out of
  the optimizer and moved every step by `rate` toward balance: raised for an expert that got
  less than the mean load, lowered for one that got more (train.balance).

  loss_free: on (routers whose spec has `selection_bias`: top-k, top-p).
  rate: the bias's step per training step (DeepSeek-V3: 0.001).
  """
  loss_free: bool = False
  rate: float = 1e-3

  def problems(self):
    if not (is_number(self.rate) and self.rate > 0):
      yield 'rate', 'must be a number > 0'
