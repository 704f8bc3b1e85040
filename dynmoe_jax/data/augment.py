"""Training-time augmentation, applied inside the jitted train step."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def augment_shift(inputs: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Random translation of signals [B, L] by up to ±max_shift samples (edge padded)."""
  length = inputs.shape[1]
  padded = jnp.pad(inputs, ((0, 0), (max_shift, max_shift)), mode='edge')
  offsets = jax.random.randint(rng, (inputs.shape[0],), 0, 2 * max_shift + 1)
  return jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o,), (length,)))(padded, offsets)
