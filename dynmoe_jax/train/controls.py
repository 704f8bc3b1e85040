"""The per-step controllers of the MoE layers, together: a compute budget (train.budget, or
DTop-p's train.pi_budget) and loss-free balancing (train.balance). Their values live in the
train state's `moe_controls` (outside the optimizer, checkpointed); each step the model's MoE
blocks read them (`layer_controls`) and they are updated from the step's routing (`update`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax

from dynmoe_jax.train import balance as balance_lib
from dynmoe_jax.train import budget as budget_lib
from dynmoe_jax.train import pi_budget


@dataclasses.dataclass(frozen=True)
class Controllers:
  parts: Tuple[Any, ...]  # each with initial_controls, layer_controls, update, report

  def initial_controls(self) -> Dict[str, jax.Array]:
    out: Dict[str, jax.Array] = {}
    for part in self.parts:
      out.update(part.initial_controls())
    return out

  def layer_controls(self, controls: Mapping[str, jax.Array]
                     ) -> Dict[str, Dict[str, jax.Array]]:
    out: Dict[str, Dict[str, jax.Array]] = {}
    for part in self.parts:
      for layer, values in part.layer_controls(controls).items():
        out.setdefault(layer, {}).update(values)
    return out

  def update(self, controls: Mapping[str, jax.Array], metrics: Mapping[str, jax.Array]
             ) -> Dict[str, jax.Array]:
    out = dict(controls)
    for part in self.parts:
      out.update(part.update(controls, metrics))
    return out

  def report(self, controls: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
    """Train-row metrics of the controlled values (moe/<layer>/...)."""
    out: Dict[str, jax.Array] = {}
    for part in self.parts:
      out.update(part.report(controls))
    return out


def from_config(config, layout: Sequence[int]) -> Optional[Controllers]:
  parts = tuple(p for p in (budget_lib.from_config(config, layout),
                            pi_budget.from_config(config, layout),
                            balance_lib.from_config(config, layout)) if p is not None)
  return Controllers(parts) if parts else None
