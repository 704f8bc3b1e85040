"""One command for a lent GPU (H100 / H200), under 8 minutes: what the CPU cannot measure.

  python experiments/device_check.py --out results/device_check        # on the GPU
  python experiments/device_check.py --smoke --out /tmp/device_check   # tiny, any CPU

1. The expert FFN (MoE layer, top-2 of 16 SwiGLU experts, bf16, forward + backward) at
   T=16,384 tokens, D=1,024, F=2,048 for dispatch 'sort', 'einsum' and 'ragged' with every
   grouped-matmul backend this machine can run: median time, TFLOP/s (FLOPs counted from
   the jaxpr, capacity padding included) and the fraction of the chip's bf16 peak.
2. `lm_base` train steps on synthetic bytes (speed needs no corpus) with top-2 and with
   top-any at a budget of 1.5 experts per token: tokens/s, MFU, the step-time ratio.
   `--lm_batch` contexts of 1,024 bytes (16 by default: the dry run estimates lm_base's
   64 with XLA attention at ~180 GB) and `--attention` ('cudnn' on a GPU by default).
Writes results.json, results.md (the table) and results.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dynmoe_jax import config_lib, dryrun, flops, grouped_matmul, layers, routers  # noqa: E402
from dynmoe_jax.train import compiled as compiled_lib  # noqa: E402
from dynmoe_jax.train import export  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
FULL = dict(tokens=16384, width=1024, hidden=2048, experts=16, reps=10, lm_steps=200)
SMOKE = dict(tokens=256, width=64, hidden=64, experts=4, reps=2, lm_steps=3)
LM_ROUTERS = {
    'top2': {},
    'top_any_b1.5': {'model.moe.router': 'top_any', 'budget.target_experts_per_token': 1.5,
                     'model.moe.top_any.train_fallback': True},
}


def chip_peak() -> tuple[str, float]:
  """The device's name and bf16 peak (TFLOP/s) where the dry run's table knows it."""
  kind = jax.devices()[0].device_kind
  for key, chip in dryrun.CHIPS.items():
    if key in kind.lower().replace(' ', ''):
      return kind, chip.bf16_tflops
  return kind, float('nan')


def timed(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def ffn_rows(sizes, backends, dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (sizes['tokens'], sizes['width']), dtype)
  rows = []
  for impl, backend in [('sort', None), ('einsum', None)] + [('ragged', b) for b in backends]:
    moe = layers.MoE(num_experts=sizes['experts'], hidden_dim=sizes['hidden'],
                     router=routers.TopK(k=2), glu=True, activation='silu', dispatch_impl=impl,
                     ragged_backend=backend or 'auto', dtype=dtype)
    params = moe.init(jax.random.PRNGKey(1), x[:8])['params']

    def step(params, x, moe=moe):
      def loss(params, x):
        y, aux = moe.apply({'params': params}, x, training=True)
        return (y.astype(jnp.float32) ** 2).mean() + aux.loss
      return jax.grad(loss, argnums=(0, 1))(params, x)

    jitted = jax.jit(step)
    counting = moe.clone(ragged_backend='xla') if impl == 'ragged' else moe
    counted = sum(flops.step_flops(jax.jit(lambda p, x: jax.grad(
        lambda p, x: (counting.apply({'params': p}, x, training=True)[0].astype(
            jnp.float32) ** 2).mean(), argnums=(0, 1))(p, x)), (params, x)).values())
    seconds = timed(jitted, (params, x), sizes['reps'])
    rows.append({'name': f'{impl}' + (f'/{backend}' if backend else ''), 'seconds': seconds,
                 'tflops': counted / seconds / 1e12, 'flops': counted})
  return rows


def lm_rows(sizes, batch: int, attention: str, smoke: bool):
  rows = []
  for name, overrides in LM_ROUTERS.items():
    config = config_lib.load_config_file(os.path.join(CONFIGS, 'lm_base.py'))
    config.batch_size = batch
    config.model.attention_impl = attention
    if smoke:
      config.data.seq_len, config.model.num_layers, config.model.dim = 32, 2, 64
      config.model.num_heads, config.model.mlp_dim, config.model.moe.hidden_dim = 4, 64, 32
    for key, value in overrides.items():
      config_lib.set_field(config, key, value)
    mesh = export.config_mesh(config)
    with compiled_lib.mesh_context(mesh):
      built = export.steps_for(config, mesh)
      train = built.train.lower(*built.train_args).compile()
      counted = sum(flops.step_flops(built.train, built.train_args).values())
      state = jax.jit(lambda r: nn.meta.unbox(built.init(r)),
                      out_shardings=built.shardings)(jax.random.PRNGKey(0))
    spec = built.train_args[1]['inputs']
    batch_bytes = jax.device_put(np.random.default_rng(0).integers(
        1, 257, spec.shape, dtype=np.int32), spec.sharding)
    state, _, _ = train(state, {'inputs': batch_bytes})  # warm up
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(sizes['lm_steps']):
      state, metrics, _ = train(state, {'inputs': batch_bytes})
    jax.block_until_ready(state)
    step_seconds = (time.perf_counter() - start) / sizes['lm_steps']
    # What the dry run estimated from the CPU compiler, from this chip's own: its compiler's
    # temporaries and the allocator's peak so far (None where the backend keeps no stats).
    memory = train.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    rows.append({'name': f'lm_base/{name}', 'seconds': step_seconds, 'flops': counted,
                 'tflops': counted / step_seconds / 1e12,
                 'tokens_per_second': batch * config.data.seq_len / step_seconds,
                 'compiled_temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
                 'device_peak_bytes': stats.get('peak_bytes_in_use')})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--smoke', action='store_true', help='tiny shapes (any CPU, seconds)')
  parser.add_argument('--lm_batch', type=int, default=None)
  parser.add_argument('--attention', default=None, help="'cudnn' or 'xla' (default: cudnn "
                      'on a GPU, else xla)')
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else FULL
  platform = grouped_matmul.platform_name(jax.default_backend())
  backends = ['xla'] + [b for b in ('megablox', 'pallas_triton', 'tokamax')
                        if (args.smoke and b != 'tokamax') or _runs(b, platform)]
  dtype = jnp.bfloat16
  device, peak = chip_peak()
  attention = args.attention or ('cudnn' if platform == 'cuda' else 'xla')
  rows = ffn_rows(sizes, backends, dtype)
  lm = lm_rows(sizes, args.lm_batch or (4 if args.smoke else 16), attention, args.smoke)
  for row in rows + lm:
    row['fraction_of_peak'] = row['tflops'] / peak if peak == peak else None
  top2 = lm[0]['seconds']
  for row in lm:
    row['step_time_vs_top2'] = row['seconds'] / top2
  result = {'device': device, 'platform': platform, 'peak_bf16_tflops': peak, 'sizes': sizes,
            'attention': attention, 'expert_ffn': rows, 'lm': lm,
            'note': 'FLOPs counted from the jaxpr (capacity padding included); median times'}
  write(args.out, result)


def _runs(backend: str, platform: str) -> bool:
  try:
    grouped_matmul.check(backend, platform)
  except ValueError:
    return False
  return grouped_matmul.KERNEL_PLATFORM.get(backend, platform) == platform


def _cell(row, key: str, scale: float, form: str) -> str:
  value = row.get(key)
  return '-' if value is None or value != value else form.format(scale * value)


def write(out: str, result):
  os.makedirs(out, exist_ok=True)
  peak = result['peak_bf16_tflops']
  lines = [f"device: {result['device']} ({result['platform']}), bf16 peak "
           f"{'unknown' if peak != peak else f'{peak:g} TFLOP/s'}; {result['note']}", '',
           '| run | time (ms) | TFLOP/s | of peak | tokens/s | vs top-2 |', '|---|---|---|---|---|---|']
  for row in result['expert_ffn'] + result['lm']:
    lines.append(f"| {row['name']} | {1e3 * row['seconds']:.2f} | {row['tflops']:.3g} | "
                 f"{_cell(row, 'fraction_of_peak', 100, '{:.0f}%')} | "
                 f"{_cell(row, 'tokens_per_second', 1, '{:.3g}')} | "
                 f"{_cell(row, 'step_time_vs_top2', 1, '{:.2f}')} |")
  table = '\n'.join(lines)
  print(table)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = result['expert_ffn'] + result['lm']
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.barh([r['name'] for r in rows], [r['tflops'] for r in rows])
  ax.set_xlabel('TFLOP/s (counted FLOPs / median time)')
  ax.set_title(f"{result['device']}: expert FFN and lm_base steps (bf16)")
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'results.png'), dpi=120)


if __name__ == '__main__':
  main()
