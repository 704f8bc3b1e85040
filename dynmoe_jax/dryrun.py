"""Will a config run on a chip? Answered on a CPU host before any machine is booked.

`python -m dynmoe_jax.main --config=configs/lm_tpu.py --dry_run --target=v5e-8` builds the
config's train step for its mesh over fake CPU devices (no data, no training, nothing
written), compiles it with XLA's CPU compiler and prints per device the parameter,
optimizer-state and temporary bytes, the step's FLOPs split into attention, dense and
expert, and a roofline step time and MFU on the target chip. It also lowers the step for
the target's platform with `jax.export` and names the grouped-matmul kernel it holds.

Every figure is an estimate and says so: parameter and optimizer bytes are exact (shapes
and shardings); temporaries are the CPU compiler's, which approximate the target's (its
fusion and rematerialisation differ); FLOPs are counted from the step's jaxpr; bytes
moved are XLA's CPU cost analysis; the roofline assumes perfect overlap and no
communication cost. Only a run on the chip measures.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from dynmoe_jax import flops
from dynmoe_jax.train import compiled as compiled_lib
from dynmoe_jax.train import export


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  platform: str          # as jax.export names it
  bf16_tflops: float     # dense peak per chip
  hbm_gb_per_s: float
  hbm_gb: float          # capacity per chip, 1 GB = 1e9 bytes (as the sources state it)
  source: str


CHIPS = {
    'v5e': Chip('TPU v5e', 'tpu', 197, 819, 16, 'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('TPU v5p', 'tpu', 459, 2765, 95, 'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('TPU v6e (Trillium)', 'tpu', 918, 1638, 32,
                'https://cloud.google.com/tpu/docs/v6e'),
    'h100': Chip('NVIDIA H100 SXM', 'cuda', 989, 3350, 80,
                 'https://www.nvidia.com/en-us/data-center/h100/ (datasheet, dense bf16)'),
    'h200': Chip('NVIDIA H200 SXM', 'cuda', 989, 4800, 141,
                 'https://www.nvidia.com/en-us/data-center/h200/ (datasheet, dense bf16)'),
}


class DryRunError(ValueError):
  """The config does not fit or does not lower on the target; one line says what."""


def parse_target(target: str) -> Tuple[Chip, Optional[int]]:
  """'v5e' or 'v5e-8' (chip, and optionally how many) -> (Chip, count or None)."""
  name, _, count = target.lower().partition('-')
  if name not in CHIPS or (count and not count.isdigit()):
    raise DryRunError(f'--target={target!r}: expected one of {sorted(CHIPS)}, optionally '
                      f'with a chip count (v5e-8)')
  return CHIPS[name], int(count) if count else None


def devices_needed(config, count: Optional[int]) -> int:
  """The chips to plan for: the target's count, else what the config's mesh fixes."""
  fixed = [n for n in (config.mesh.data, config.mesh.expert, config.mesh.model) if n > 0]
  return count or max(1, math.prod(fixed))


def _bytes_per_device(tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def state_bytes(abstract_state) -> Dict[str, int]:
  """Per device, from shapes and shardings: parameters, optimizer state, the rest."""
  params = _bytes_per_device(abstract_state.params)
  opt = _bytes_per_device(abstract_state.opt_state)
  return {'params': params, 'opt_state': opt,
          'other_state': _bytes_per_device(abstract_state) - params - opt}


def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  return {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
          'aliased': int(m.alias_size_in_bytes), 'temporaries': int(m.temp_size_in_bytes)}


def _refuse_if_over(what: str, needed: float, chip: Chip, config_name: str, detail: str):
  if needed > chip.hbm_gb * 1e9:
    raise DryRunError(f'{config_name} does not fit a {chip.name}: {what} needs '
                      f'{needed / 1e9:.1f} GB per chip of its {chip.hbm_gb:g} GB ({detail})')


def analyse(config, config_name: str, chip: Chip, num_devices: int) -> Dict[str, Any]:
  """The dry run's figures; DryRunError where the config does not fit or lower."""
  mesh = export.config_mesh(config, devices=jax.devices()[:num_devices])
  with compiled_lib.mesh_context(mesh):
    built = export.steps_for(config, mesh)
    state = state_bytes(built.abstract_state)
    _refuse_if_over('the train state alone', sum(state.values()), chip, config_name,
                    f"parameters {state['params'] / 1e9:.1f} GB, optimizer state "
                    f"{state['opt_state'] / 1e9:.1f} GB")
    try:
      exported = export.export_step(built.train, built.train_args, chip.platform,
                                    config_name=config_name, step='train')
    except export.ExportError as e:
      raise DryRunError(str(e)) from None
    compiled = built.train.lower(*built.train_args).compile()
    counted = _counted_flops(config, mesh, built)
  memory = _memory(compiled)
  peak = memory['arguments'] + memory['outputs'] - memory['aliased'] + memory['temporaries']
  _refuse_if_over('the train step', peak, chip, config_name,
                  f"state {sum(state.values()) / 1e9:.1f} GB + batch and temporaries "
                  f"{(peak - sum(state.values())) / 1e9:.1f} GB (XLA CPU estimate)")
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  bytes_moved = float(cost.get('bytes accessed', 0.0))
  flops_per_device = sum(counted.values()) / num_devices
  compute_s = flops_per_device / (chip.bf16_tflops * 1e12)
  memory_s = bytes_moved / (chip.hbm_gb_per_s * 1e9)
  step_s = max(compute_s, memory_s)
  return {
      'config': config_name, 'target': chip.name, 'platform': chip.platform,
      'devices': num_devices, 'mesh': dict(mesh.shape), 'state_bytes': state,
      'xla_memory': memory, 'peak_bytes': peak, 'hbm_bytes': chip.hbm_gb * 1e9,
      'flops': counted, 'flops_per_device': flops_per_device,
      'bytes_accessed_per_device': bytes_moved,
      'roofline_step_seconds': step_s, 'bound': 'compute' if compute_s >= memory_s else 'memory',
      'mfu': compute_s / step_s if step_s else 0.0,
      'tokens_per_second': _tokens(config) / step_s if step_s else 0.0,
      'grouped_matmul': exported.grouped_matmul, 'kernels': list(exported.kernels),
      'source': chip.source,
  }


def _tokens(config) -> int:
  return config.batch_size * (config.data.seq_len if config.data.kind in ('lm', 'text') else 1)


def _counted_flops(config, mesh, built) -> Dict[str, float]:
  """FLOPs of the same step with the ragged path on XLA's ragged_dot (same math; a
  Pallas kernel is opaque to the count)."""
  if config.model.moe.dispatch_impl != 'ragged' or config.model.moe.ragged_backend == 'xla':
    return flops.step_flops(built.train, built.train_args)
  xla = config.copy_and_resolve_references()
  xla.model.moe.ragged_backend = 'xla'
  again = export.steps_for(xla, mesh)
  return flops.step_flops(again.train, again.train_args)


def report(r: Dict[str, Any]) -> str:
  gb = lambda b: f'{b / 1e9:8.3f} GB'
  s, m, f = r['state_bytes'], r['xla_memory'], r['flops']
  total_flops = sum(f.values())
  lines = [
      f"dry run: {r['config']} on {r['devices']} x {r['target']} (mesh {r['mesh']}), "
      f"lowered for '{r['platform']}' and compiled for fake CPU devices; estimates, not "
      f"measurements",
      'per device:',
      f"  parameters            {gb(s['params'])}   (exact: shapes and shardings)",
      f"  optimizer state       {gb(s['opt_state'])}   (exact)",
      f"  other state           {gb(s['other_state'])}",
      f"  temporaries           {gb(m['temporaries'])}   (XLA's CPU compiler; the target's "
      f"differ)",
      f"  step peak             {gb(r['peak_bytes'])}   of {gb(r['hbm_bytes'])} HBM: "
      f"{'fits' if r['peak_bytes'] <= r['hbm_bytes'] else 'DOES NOT FIT'}",
      f"FLOPs per step (counted from the jaxpr, all devices): {total_flops:.3e}",
      *[f"  {k:<10} {v:.3e}  ({100 * v / max(total_flops, 1):.1f}%)" for k, v in f.items()],
      f"roofline on {r['target']}: {r['roofline_step_seconds'] * 1e3:.1f} ms per step "
      f"({r['bound']}-bound; {r['bytes_accessed_per_device']:.3e} bytes moved per device, "
      f"XLA CPU cost analysis), MFU {100 * r['mfu']:.0f}% at best (capacity padding "
      f"counted as work), "
      f"{r['tokens_per_second']:.3g} tokens/s",
      f"grouped-matmul kernel in the lowered step: {r['grouped_matmul']}",
      f"chip figures: {r['source']}",
  ]
  return '\n'.join(lines)
