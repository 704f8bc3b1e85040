"""The layout: what is static per block under jit and may change at a boundary.

Experts per block (0 = a dense FFN) and, where capacity has been re-planned from
routing, the slots per expert of each MoE block. Both are Python ints at trace time;
a new layout is a new compile. The layout is part of every checkpoint's meta, so a
run resumes into exactly the shapes it left.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union


@dataclasses.dataclass(frozen=True)
class Layout:
  """experts: experts per block, 0 = dense.
  capacity: per block, slots per expert planned for a training step of
    `capacity_tokens` tokens (other token counts scale it, see `capacity.Capacity.planned`);
    0 = the router's capacity rule. Empty = 0 everywhere.
  """
  experts: Tuple[int, ...]
  capacity: Tuple[int, ...] = ()
  capacity_tokens: int = 0

  def __post_init__(self):
    experts = tuple(int(n) for n in self.experts)
    capacity = tuple(int(c) for c in self.capacity) or (0,) * len(experts)
    if len(capacity) != len(experts):
      raise ValueError(f'Layout: {len(capacity)} capacities for {len(experts)} blocks')
    if any(c and not n for c, n in zip(capacity, experts)):
      raise ValueError(f'Layout: a dense block has a capacity ({capacity}, experts {experts})')
    if any(capacity) and self.capacity_tokens < 1:
      raise ValueError('Layout: planned capacities need capacity_tokens >= 1')
    object.__setattr__(self, 'experts', experts)
    object.__setattr__(self, 'capacity', capacity)
    object.__setattr__(self, 'capacity_tokens', int(self.capacity_tokens) if any(capacity)
                       else 0)

  @classmethod
  def of(cls, value: Union['Layout', Sequence[int]]) -> 'Layout':
    """A Layout, or experts per block (the router's capacity rule everywhere)."""
    return value if isinstance(value, Layout) else cls(tuple(value))

  def capacity_plan(self, block: int) -> Optional[Tuple[int, int]]:
    """(slots, tokens) of block `block`, or None for the router's rule."""
    return (self.capacity[block], self.capacity_tokens) if self.capacity[block] else None

  def describe(self) -> str:
    text = f'experts per layer {list(self.experts)}'
    if any(self.capacity):
      text += f', capacity per layer {list(self.capacity)} (per {self.capacity_tokens} tokens)'
    return text

  def to_meta(self) -> Dict[str, Any]:
    return {'experts_per_layer': list(self.experts), 'capacity_per_layer': list(self.capacity),
            'capacity_tokens': self.capacity_tokens}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> 'Layout':
    return cls(tuple(meta['experts_per_layer']), tuple(meta.get('capacity_per_layer', ())),
               int(meta.get('capacity_tokens', 0)))
