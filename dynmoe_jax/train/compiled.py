"""Everything that depends on the expert layout, compiled ahead of time.

`compile_layout` is a function of explicit arguments: the trainer calls it at
start, on restore and at layout boundaries, also from the compile-ahead thread.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import optax

from dynmoe_jax import adaptive, config_lib, sharding
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import budget as budget_lib
from dynmoe_jax.train import state as state_lib
from dynmoe_jax.train import steps


@dataclasses.dataclass
class Compiled:
  """The model, shardings and compiled steps of one layout."""
  layout: Layout
  model: Any
  init: Callable                 # rng -> boxed TrainState (see state.make_init)
  shardings: Any
  abstract_state: Any            # ShapeDtypeStructs with shardings: the restore target
  expert_axes: Dict[Tuple[str, ...], int]
  train_step: Callable
  eval_step: Callable
  seconds: float = 0.0           # wall time the compile took
  budget: Optional[budget_lib.Budget] = None  # the compute budget's controller, if any

  def layer_controls(self, state) -> Optional[Dict[str, Dict[str, Any]]]:
    """What the model's MoE blocks read from `state`'s budget controllers (None: none)."""
    return self.budget.layer_controls(state.moe_controls) if self.budget else None

  def cost(self) -> Dict[str, float]:
    """XLA's cost analysis of the compiled train step (one step, whole batch)."""
    analysis = self.train_step.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
      analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {'flops': float(analysis.get('flops', float('nan'))),
            'bytes_accessed': float(analysis.get('bytes accessed', float('nan'))),
            'compile_seconds': self.seconds,
            **parameter_counts(self.abstract_state.params, self.expert_axes)}


def parameter_counts(params, expert_axes: Mapping[Tuple[str, ...], int]) -> Dict[str, int]:
  """All parameters, and those of leaves with an expert axis (expert kernels and
  per-expert router parameters: what grows with the expert count)."""
  leaves = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  size = lambda leaf: int(np.prod(leaf.shape))
  return {'parameters': sum(size(v) for v in leaves.values()),
          'expert_parameters': sum(size(v) for p, v in leaves.items() if p in expert_axes)}


def abstract_batch(mesh, rows: int, example: Mapping[str, np.ndarray]):
  return {k: jax.ShapeDtypeStruct((rows,) + np.shape(v)[1:], np.asarray(v).dtype,
                                  sharding=sharding.batch_sharding(mesh, np.ndim(v)))
          for k, v in example.items()}


def compile_layout(config, layout: Layout, *, mesh, tx: optax.GradientTransformation,
                   example_batch: Mapping[str, np.ndarray], eval_rows: int) -> Compiled:
  """Build the model of `layout` and compile its train and eval steps for `mesh`.

  Enters the mesh and axis rules itself (both are thread-local), so it also runs on
  the compile-ahead thread. Both steps are compiled here, so a new layout's whole
  cost is paid (and timed) here rather than at its first step or evaluation.
  """
  start = time.perf_counter()
  task = config.model.task
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    model = config_lib.build_model(config, layout)
    sample = steps.model_inputs({k: v[:1] for k, v in example_batch.items()}, task)
    budget = budget_lib.from_config(config, layout.experts)
    init = state_lib.make_init(model, tx, sample,
                               budget.initial_controls() if budget else None)
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.param_shardings(boxed, mesh)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        sharding.strip_boxes(boxed), shardings)
    train_batch = abstract_batch(mesh, config.batch_size, example_batch)
    eval_batch = abstract_batch(mesh, eval_rows,
                                {**example_batch, 'mask': np.zeros(1, np.float32)})
    augment_shift = config.data.augment_shift if config.data.kind == 'signal' else 0
    train_step = jax.jit(
        steps.make_train_step(model, tx, task=task,
                              learning_rate_fn=config_lib.learning_rate_schedule(config),
                              augment_shift=augment_shift,
                              skip_nonfinite=config.skip_nonfinite_updates, budget=budget),
        in_shardings=(shardings, jax.tree.map(lambda a: a.sharding, train_batch)),
        out_shardings=(shardings, None, None), donate_argnums=(0,)
    ).lower(abstract_state, train_batch).compile()
    eval_step = jax.jit(steps.make_eval_step(model, task=task, budget=budget)).lower(
        abstract_state.params, abstract_state.moe_controls, eval_batch).compile()
  return Compiled(layout, model, init, shardings, abstract_state,
                  adaptive.expert_axes(boxed.params), train_step, eval_step,
                  seconds=time.perf_counter() - start, budget=budget)


def init_state(compiled: Compiled, mesh, seed: int) -> state_lib.TrainState:
  """A fresh, sharded train state for the compiled layout."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    return jax.jit(lambda r: nn.meta.unbox(compiled.init(r)),
                   out_shardings=compiled.shardings)(jax.random.PRNGKey(seed))
