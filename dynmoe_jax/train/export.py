"""A config's train and eval steps lowered for a TPU or a GPU from any host (`jax.export`).

The StableHLO an export holds is what that platform's compiler would be given: a step
that exports for 'tpu' from a CPU host lowers there. What it cannot show, and says so:
whether the platform's compiler then accepts every kernel (a Triton kernel's IR is
checked by Pallas here, compiled to PTX only on a GPU) and how fast it runs.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Sequence, Tuple

import jax
from jax import export as jax_export

from dynmoe_jax import config_lib, flops, grouped_matmul, sharding
from dynmoe_jax.data import pipeline
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import compiled as compiled_lib
from dynmoe_jax.train import trainer

PLATFORMS = ('tpu', 'cuda')
STEPS = ('train', 'eval')
# Custom calls a kernel leaves in the module; they carry no export compatibility promise.
_KERNEL_TARGETS = tuple(grouped_matmul.KERNEL_CALL_TARGETS.values())
# Markers of a custom call that only a CPU host can run (host callbacks, LAPACK, ...).
_HOST_ONLY = ('callback', 'cpu', 'lapack', 'host')
_FLOAT64 = re.compile(r'tensor<(?:[0-9?]+x)*(?:f64|complex<f64>)>')


class ExportError(ValueError):
  """A step does not lower for a platform; the message is one line naming why."""


@dataclasses.dataclass(frozen=True)
class ExportedStep:
  config: str
  platform: str
  step: str
  custom_calls: Tuple[str, ...]   # every custom-call target in the lowered module
  kernels: Tuple[str, ...]        # the Pallas kernels it holds, by name
  module_bytes: int

  @property
  def grouped_matmul(self) -> str:
    """The grouped-matmul kernel the step holds, in words."""
    # megablox gmm/tgmm are this library's only Mosaic TPU kernels
    if any(k.startswith('mosaic_tpu:') for k in self.kernels):
      return 'megablox gmm/tgmm (Mosaic TPU custom call)'
    names = [k for k in self.kernels if 'gmm' in k]
    if names:
      return ', '.join(names) + ' (Triton GPU custom call)'
    return 'none (XLA ops only: capacity-buffer einsums, or ragged_dot without a kernel)'


def _kernel_names(text: str) -> Tuple[str, ...]:
  names = []
  for line in text.splitlines():
    if 'tpu_custom_call' in line:
      found = re.search(r'kernel_name = "(\w+)"', line)
      names.append(f'mosaic_tpu:{found.group(1) if found else "?"}')
    elif '__gpu$xla.gpu.triton' in line:
      found = re.search(r'name = "(\w+)"', line)
      names.append(found.group(1) if found else 'triton')
  return tuple(sorted(set(names)))


def offending_ops(text: str) -> List[str]:
  """What in a lowered module a TPU or GPU could not run: host-only custom calls, float64."""
  problems = [f'custom call {t!r} (host only)'
              for t in sorted(set(re.findall(r'custom_call @([\w$.]+)', text)))
              if any(m in t.lower() for m in _HOST_ONLY)]
  if _FLOAT64.search(text):
    problems.append(f'float64 values ({_FLOAT64.search(text).group(0)})')
  return problems


def export_step(jitted, args: Sequence, platform: str, *, config_name: str,
                step: str) -> ExportedStep:
  """Lower `jitted(*args)` for `platform`; ExportError (one line) if it does not lower or
  holds an op the platform cannot run."""
  where = f'{config_name}: the {step} step for {platform}'
  try:
    exported = jax_export.export(
        jitted, platforms=[platform],
        disabled_checks=[jax_export.DisabledSafetyCheck.custom_call(t) for t in _KERNEL_TARGETS]
    )(*args)
  except Exception as e:  # noqa: BLE001  any lowering failure is the answer
    target = re.search(r'custom_call @([\w$.]+)', str(e))
    callbacks = flops.primitives_named(jitted, args, 'callback')
    if callbacks:
      message = f'host callbacks {callbacks} (the host is not there on {platform})'
    elif target:
      message = f'custom call {target.group(1)!r}, which jax.export cannot promise {platform} runs'
    else:
      message = ' '.join(str(e).split())[:300]
    raise ExportError(f'{where} does not lower: {type(e).__name__}: {message}') from None
  text = exported.mlir_module()
  problems = offending_ops(text)
  if problems:
    raise ExportError(f'{where} holds what {platform} cannot run: {"; ".join(problems)}')
  return ExportedStep(config_name, platform, step,
                      tuple(sorted(set(re.findall(r'custom_call @([\w$.]+)', text)))),
                      _kernel_names(text), len(text))


def steps_for(config, mesh=None) -> compiled_lib.Steps:
  """The config's steps at its start layout on `mesh` (default: its mesh over this
  host's devices), from the config alone: no data is read. Call inside
  `compiled_lib.mesh_context(mesh)`."""
  layout = Layout(config_lib.validate(config))
  mesh = mesh if mesh is not None else config_mesh(config)
  return compiled_lib.build_steps(
      config, layout, mesh=mesh, tx=config_lib.build_optimizer(config),
      example_batch=pipeline.example_batch(config.data),
      eval_rows=trainer.eval_rows(config.eval_batch_size, mesh, jax.process_count()))


def config_mesh(config, devices=None):
  return sharding.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.model,
                            devices=devices)


def export_config(config, config_name: str, platforms: Sequence[str] = PLATFORMS,
                  step_names: Sequence[str] = STEPS, mesh=None
                  ) -> Dict[Tuple[str, str], ExportedStep]:
  """Every (platform, step) of `config`, exported. Raises the first ExportError."""
  mesh = mesh if mesh is not None else config_mesh(config)
  out = {}
  with compiled_lib.mesh_context(mesh):
    built = steps_for(config, mesh)
    for platform in platforms:
      for step in step_names:
        jitted, args = ((built.train, built.train_args) if step == 'train'
                        else (built.eval, built.eval_args))
        out[platform, step] = export_step(jitted, args, platform, config_name=config_name,
                                          step=step)
  return out
