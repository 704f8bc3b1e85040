"""The MoE layer for Flax NNX users.

`MoE` is `layers.MoE` (the linen module: the same routing, dispatch, losses and
parameters, with their logical axis names) behind NNX's API through `flax.nnx.bridge`:
parameters are created eagerly from the input width, live on the object, and train with
`nnx.grad` / `nnx.Optimizer`. One implementation, two APIs, so the NNX layer can never
route differently from the linen one (tests/test_nnx_layers.py checks that they agree).

  from flax import nnx
  from dynmoe_jax import nnx_layers
  moe = nnx_layers.MoE(64, num_experts=8, hidden_dim=128, router='top_any', rngs=nnx.Rngs(0))
  y, aux = moe(x, training=True)          # add aux.loss to your loss; keep the residual
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from dynmoe_jax import layers


class MoE(nnx.Module):
  """An MoE block of `width`-wide tokens; `settings` are `layers.MoE`'s fields.

  Call: `moe(x [..., width], training=..., token_mask=..., token_importance=...,
  controls=...)` -> (y [..., width], MoEAux), as `layers.MoE.__call__`.
  """

  def __init__(self, width: int, *, rngs: nnx.Rngs, **settings: Any):
    self.settings = layers.MoE(**settings)
    example = jnp.zeros((1, width), self.settings.dtype)
    importance = jnp.ones((1,)) if self._needs_importance() else None
    # The logical axis names stay as metadata (map them with sharding.LOGICAL_AXIS_RULES,
    # e.g. nnx.get_partition_spec); placing the values is the caller's jit's, so no mesh
    # is needed to build the layer.
    with nnx.use_eager_sharding(False):
      self.layer = bridge.ToNNX(self.settings, rngs=rngs).lazy_init(
          example, training=False, token_importance=importance)

  def _needs_importance(self) -> bool:
    return self.settings.spec.needs_token_importance

  def __call__(self, x: jax.Array, *, training: bool = False,
               token_mask: Optional[jax.Array] = None,
               token_importance: Optional[jax.Array] = None,
               controls: Optional[Mapping[str, jax.Array]] = None):
    return self.layer(x, training=training, token_mask=token_mask,
                      token_importance=token_importance, controls=controls)
