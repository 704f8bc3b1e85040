"""The train state and how a fresh one is built."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # data/dropout rng of the run; step s uses fold_in(rng, s)
  # Budget controllers' loss weights per MoE block ({} without a budget; train/budget.py)
  moe_controls: Any = flax.struct.field(default_factory=dict)


def make_init(model, tx: optax.GradientTransformation, sample_inputs,
              moe_controls: Optional[Dict[str, jax.Array]] = None) -> Callable:
  """rng -> TrainState with boxed (logically partitioned) params, for
  `jax.eval_shape` (shapes and shardings) and, unboxed, for the real init."""
  sample = jnp.asarray(sample_inputs)

  def init(rng):
    params_rng, data_rng = jax.random.split(rng)
    variables = model.init({'params': params_rng, 'dropout': params_rng}, sample,
                           training=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=data_rng,
                      moe_controls=dict(moe_controls or {}))
  return init
