"""Everything that depends on the expert layout, compiled ahead of time.

`compile_layout` is a function of explicit arguments: the trainer calls it at
start, on restore and at layout boundaries, also from the compile-ahead thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import optax

from dynmoe_jax import adaptive, config_lib, grouped_matmul, sharding
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import controls as controls_lib
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
  # a compute budget's and loss-free balancing's controllers, if any
  controllers: Optional[controls_lib.Controllers] = None
  grouped_matmul: str = ''       # what runs dispatch_impl='ragged' here ('' for other paths)

  def layer_controls(self, state) -> Optional[Dict[str, Dict[str, Any]]]:
    """What the model's MoE blocks read from `state`'s controllers (None: none)."""
    return self.controllers.layer_controls(state.moe_controls) if self.controllers else None

  def cost(self) -> Dict[str, float]:
    """XLA's cost analysis of the compiled train step (one step, whole batch)."""
    analysis = self.train_step.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
      analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {'flops': float(analysis.get('flops', float('nan'))),
            'bytes_accessed': float(analysis.get('bytes accessed', float('nan'))),
            'compile_seconds': self.seconds,
            **({'grouped_matmul': self.grouped_matmul} if self.grouped_matmul else {}),
            **parameter_counts(self.abstract_state.params, self.expert_axes)}


def parameter_counts(params, expert_axes: Mapping[Tuple[str, ...], int]) -> Dict[str, int]:
  """All parameters, and those of leaves with an expert axis (expert kernels and
  per-expert router parameters: what grows with the expert count)."""
  leaves = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  size = lambda leaf: int(np.prod(leaf.shape))
  return {'parameters': sum(size(v) for v in leaves.values()),
          'expert_parameters': sum(size(v) for p, v in leaves.items() if p in expert_axes)}


def check_grouped_matmul(config, platform: Optional[str] = None) -> str:
  """What runs the ragged path's grouped matmul on `platform` (default: this process's
  backend), as one line; a backend that cannot run there is a ConfigError."""
  platform = platform or grouped_matmul.platform_name(jax.default_backend())
  try:
    grouped_matmul.check(config.model.moe.ragged_backend, platform)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.model.moe.{e}') from None
  return grouped_matmul.describe(config.model.moe.ragged_backend, platform)


def abstract_batch(mesh, rows: int, example: Mapping[str, np.ndarray]):
  return {k: jax.ShapeDtypeStruct((rows,) + np.shape(v)[1:], np.asarray(v).dtype,
                                  sharding=sharding.batch_sharding(mesh, np.ndim(v)))
          for k, v in example.items()}


@dataclasses.dataclass
class Steps:
  """The jitted train and eval steps of one layout and the abstract arguments (shapes,
  dtypes, shardings) they are lowered for: compiled by the trainer, exported for another
  platform by `train.export`, analysed by the dry run. Build, lower and export inside
  `mesh_context(mesh)`."""
  model: Any
  init: Callable
  shardings: Any
  abstract_state: Any
  expert_axes: Dict[Tuple[str, ...], int]
  controllers: Optional[controls_lib.Controllers]
  train: Any                     # jax.jit-wrapped train step
  train_args: Tuple[Any, ...]
  eval: Any                      # jax.jit-wrapped eval step
  eval_args: Tuple[Any, ...]


def mesh_context(mesh):
  """The mesh and the logical axis rules (both thread-local) a step is traced under."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
  return stack


def build_steps(config, layout: Layout, *, mesh, tx: optax.GradientTransformation,
                example_batch: Mapping[str, np.ndarray], eval_rows: int) -> Steps:
  """The model of `layout` and its jitted steps for `mesh`; nothing is compiled."""
  task = config.model.task
  model = config_lib.build_model(config, layout)
  sample = steps.model_inputs({k: v[:1] for k, v in example_batch.items()}, task)
  controllers = controls_lib.from_config(config, layout.experts)
  init = state_lib.make_init(model, tx, sample,
                             controllers.initial_controls() if controllers else None)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.param_shardings(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      sharding.strip_boxes(boxed), shardings)
  train_batch = abstract_batch(mesh, config.batch_size, example_batch)
  eval_batch = abstract_batch(mesh, eval_rows, {**example_batch, 'mask': np.zeros(1, np.float32)})
  augment_shift = config.data.augment_shift if config.data.kind == 'signal' else 0
  train_step = jax.jit(
      steps.make_train_step(model, tx, task=task,
                            learning_rate_fn=config_lib.learning_rate_schedule(config),
                            augment_shift=augment_shift,
                            skip_nonfinite=config.skip_nonfinite_updates,
                            controllers=controllers),
      in_shardings=(shardings, jax.tree.map(lambda a: a.sharding, train_batch)),
      out_shardings=(shardings, None, None), donate_argnums=(0,))
  eval_step = jax.jit(steps.make_eval_step(model, task=task, controllers=controllers))
  return Steps(model, init, shardings, abstract_state, adaptive.expert_axes(boxed.params),
               controllers, train_step, (abstract_state, train_batch), eval_step,
               (abstract_state.params, abstract_state.moe_controls, eval_batch))


def compile_layout(config, layout: Layout, *, mesh, tx: optax.GradientTransformation,
                   example_batch: Mapping[str, np.ndarray], eval_rows: int) -> Compiled:
  """Build the model of `layout` and compile its train and eval steps for `mesh`.

  Enters the mesh and axis rules itself (both are thread-local), so it also runs on
  the compile-ahead thread. Both steps are compiled here, so a new layout's whole
  cost is paid (and timed) here rather than at its first step or evaluation.
  """
  start = time.perf_counter()
  with mesh_context(mesh):
    built = build_steps(config, layout, mesh=mesh, tx=tx, example_batch=example_batch,
                        eval_rows=eval_rows)
    train_step = built.train.lower(*built.train_args).compile()
    eval_step = built.eval.lower(*built.eval_args).compile()
  return Compiled(layout, built.model, built.init, built.shardings, built.abstract_state,
                  built.expert_axes, train_step, eval_step,
                  seconds=time.perf_counter() - start, controllers=built.controllers,
                  grouped_matmul=(check_grouped_matmul(config)
                                  if config.model.moe.dispatch_impl == 'ragged' else ''))


def init_state(compiled: Compiled, mesh, seed: int) -> state_lib.TrainState:
  """A fresh, sharded train state for the compiled layout."""
  with mesh_context(mesh):
    return jax.jit(lambda r: nn.meta.unbox(compiled.init(r)),
                   out_shardings=compiled.shardings)(jax.random.PRNGKey(seed))
