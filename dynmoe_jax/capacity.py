"""Capacity: how many slots each expert gets, every rule in one place.

A call routes its tokens in groups (`Capacity.group_size` tokens each, or one group per
call); each expert gets the same number of slots C in every group. C is, in order:
  1. the router's own (expert choice: each expert takes ceil(T·k/E) tokens);
  2. `slots`, exactly as given;
  3. a re-planned capacity (`planned`, from recorded routing: `plan_from_records`),
     scaled to the call's tokens;
  4. the factor rule: ceil(factor · T · k / E) rounded up to `multiple_of`, with k the
     experts per token the router sizes for (its settings' `capacity_k(E)`).
The layer, the layout (its per-block plans) and the boundary (its re-plans) all call
`slots_per_expert`; docs/guide.md, "Capacity", compares the rules with the peers'.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from dynmoe_jax.settings import Settings, is_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Capacity(Settings):
  """Slots per expert.

  factor / eval_factor: slots relative to the expected load (T·k/E), in training / in
    evaluation (more, so evaluation drops nothing a trained router routes).
  multiple_of: the factor rule's and a plan's slots are rounded up to a multiple of this.
  slots: slots per expert per group, exactly as given (no factor, no rounding), in training
    and evaluation. None: the factor rule.
  group_size: tokens per routing group (GShard, flaxformer, V-MoE): capacity, drops,
    priority, expert choice and the auxiliary losses (averaged over groups) are per group
    of this many consecutive tokens; a call's token count (a shard's, under
    shard_map_a2a) must divide into groups. None: one group per call.
  planned: (slots, tokens): re-planned from recorded routing (the trainer's
    adaptive.capacity), `slots` for a training call of `tokens` tokens; a call of n tokens
    gets ceil(slots·n/tokens), times eval_factor/factor in evaluation, rounded up to
    multiple_of. None: the factor rule.
  """
  factor: float = 2.0
  eval_factor: float = 4.0
  multiple_of: int = 8
  slots: Optional[int] = None
  group_size: Optional[int] = None
  planned: Optional[Tuple[int, int]] = None

  def __post_init__(self):
    if self.planned is not None:  # a config's list, or JSON's
      object.__setattr__(self, 'planned', tuple(self.planned))
    super().__post_init__()

  def problems(self):
    for name in ('factor', 'eval_factor'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or value <= 0:
        yield name, 'must be a number > 0'
    if not is_int(self.multiple_of) or self.multiple_of < 1:
      yield 'multiple_of', 'must be an int >= 1'
    if self.slots is not None and (not is_int(self.slots) or self.slots < 1):
      yield 'slots', 'must be an int >= 1 (slots per expert)'
    if self.group_size is not None and (not is_int(self.group_size) or self.group_size < 1):
      yield 'group_size', 'must be an int >= 1 (tokens per routing group)'
    if self.planned is not None:
      if len(self.planned) != 2 or min(self.planned) < 1:
        yield 'planned', 'must be (slots >= 1, tokens >= 1)'
      elif self.slots is not None:
        yield 'planned', f're-plans the slots per expert that slots={self.slots} fixes: set one'


def factor_rule(num_tokens: int, num_experts: int, factor: float, experts_per_token: float,
                multiple_of: int = 8) -> int:
  """Slots per expert: ceil(factor · T · k / E), rounded up to `multiple_of` and never more
  than T rounded up (an expert cannot get more tokens)."""
  if factor <= 0:
    raise ValueError(f'capacity factor must be > 0, got {factor}')
  if experts_per_token <= 0:
    raise ValueError(f'experts per token must be > 0, got {experts_per_token}')
  if num_tokens < 1 or num_experts < 1 or multiple_of < 1:
    raise ValueError(f'factor_rule: num_tokens={num_tokens}, num_experts={num_experts}, '
                     f'multiple_of={multiple_of} must all be >= 1')
  round_up = lambda n: multiple_of * math.ceil(n / multiple_of)
  slots = round_up(math.ceil(factor * num_tokens * experts_per_token / num_experts))
  return max(multiple_of, min(slots, round_up(num_tokens)))


def scaled_plan(planned: Tuple[int, int], num_tokens: int, multiple_of: int = 8,
                factor: float = 1.0) -> int:
  """Slots per expert for `num_tokens` tokens from a plan of `slots` for `tokens` tokens:
  ceil(slots·num_tokens/tokens) (exact integer arithmetic, so the planned call gets exactly
  `slots`), times `factor` (> 1 for evaluation), rounded up to `multiple_of`, never more
  than num_tokens rounded up."""
  slots, tokens = planned
  round_up = lambda n: multiple_of * -(-n // multiple_of)
  scaled = -(-slots * num_tokens // tokens)
  if factor != 1.0:
    scaled = math.ceil(scaled * factor)
  return max(multiple_of, min(round_up(scaled), round_up(num_tokens)))


def expert_choice_slots(num_tokens: int, num_experts: int, experts_per_token: float) -> int:
  """Tokens each expert takes in expert choice: ceil(k · T / E), at most T."""
  return max(1, min(num_tokens, math.ceil(experts_per_token * num_tokens / num_experts)))


def slots_per_expert(capacity: Capacity, router_settings, num_tokens: int, num_experts: int,
                     training: bool) -> int:
  """Slots per expert for a group of `num_tokens` tokens (a Python int): the rules of the
  module docstring, in order. `router_settings` is a router's settings object."""
  fixed = router_settings.fixed_slots(num_tokens, num_experts)
  if fixed is not None:
    return fixed
  if capacity.slots is not None:
    return int(capacity.slots)
  if capacity.planned is not None:
    return scaled_plan(capacity.planned, num_tokens, capacity.multiple_of,
                       1.0 if training else capacity.eval_factor / capacity.factor)
  factor = capacity.factor if training else capacity.eval_factor
  return factor_rule(num_tokens, num_experts, factor, router_settings.capacity_k(num_experts),
                     capacity.multiple_of)


@dataclasses.dataclass(frozen=True)
class PlanRule:
  """How capacity follows recorded routing (config.adaptive.capacity_*).

  slots = the `quantile` over the window's steps of the busiest expert's routed pairs,
  times `headroom`, raised until the window's pairs would have lost at most
  `max_dropped` of themselves to capacity; a smaller plan replaces the current capacity
  only when it saves more than `tolerance` of it (each change is a recompile).
  """
  quantile: float = 0.9
  headroom: float = 1.1
  max_dropped: float = 0.01
  tolerance: float = 0.1
  multiple_of: int = 8


def plan_from_loads(step_loads: np.ndarray, step_tokens: np.ndarray, keep: Sequence[int],
                    rule: PlanRule, current: int) -> Tuple[int, int]:
  """(slots per expert, tokens per step) for the next layout, planned from a window's
  per-step loads [steps, E] of the experts that stay. `current`: the slots the window ran
  with (at the same tokens per step)."""
  if step_loads is None or not len(step_loads):
    raise ValueError('plan_from_loads: the record holds no per-step loads')
  tokens = set(np.asarray(step_tokens).tolist())
  if len(tokens) != 1:
    raise ValueError(f'plan_from_loads: the window\'s steps routed different token counts '
                     f'{sorted(tokens)}; capacity is planned for one training batch shape')
  (tokens,) = tokens
  multiple = rule.multiple_of
  round_up = lambda n: multiple * -(-int(n) // multiple)
  loads = step_loads[:, list(keep)] if keep else step_loads
  most = round_up(tokens)  # an expert never gets a token twice
  slots = min(most, max(multiple, round_up(math.ceil(
      np.quantile(loads.max(axis=1), rule.quantile) * rule.headroom))))
  pairs = max(int(loads.sum()), 1)
  while slots < most and np.maximum(loads - slots, 0).sum() / pairs > rule.max_dropped:
    slots += multiple
  if current and (1.0 - rule.tolerance) * current <= slots <= current:
    slots = current  # too small a saving to pay a recompile for
  return int(slots), int(tokens)


def group_slots(slots_for, num_tokens: int, group_size: Optional[int]) -> Tuple[int, int]:
  """(slots per expert in each routing group, the number of groups) for `num_tokens`
  tokens routed in groups of `group_size` (None: one group); `slots_for(tokens)` gives a
  group's slots per expert. The caller checks that the groups divide the tokens."""
  tokens_per_group = group_size or num_tokens
  return slots_for(tokens_per_group), num_tokens // tokens_per_group
