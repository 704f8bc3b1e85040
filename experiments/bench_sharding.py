"""Step time of the MoE layer (fwd+bwd, jit) on one device vs a ('data', 'expert')
mesh with the GSPMD path (dispatch_impl='sort' + sharding constraints) vs the
explicit shard_map all-to-all path.

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and share the machine's cores, so this measures partitioning and collective
overhead, not a speed-up. On a GPU/TPU host the same script uses the real devices.

  python experiments/bench_sharding.py                 # 8 simulated CPU devices
  python experiments/bench_sharding.py --real_devices  # whatever jax.devices() has
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if '--real_devices' not in sys.argv:
  os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + \
      ' --xla_force_host_platform_device_count=8'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from dynmoe_jax import layers, routers, sharding  # noqa: E402
from dynmoe_jax.capacity import Capacity  # noqa: E402


def timed(fn, args, reps):
  return common.time_call(lambda: fn(*args), reps)[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--real_devices', action='store_true')
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--experts', type=int, default=8)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--out', default=common.scratch_out('bench_sharding'),
                      help=common.OUT_HELP)
  args = parser.parse_args()

  n = jax.device_count()
  expert_axis = 4 if n % 4 == 0 and args.experts % 4 == 0 else 1
  x = jax.random.normal(jax.random.PRNGKey(0), (args.tokens, args.dim))
  rows = []
  for label, impl, devices in (('single device', 'sort', 1),
                               (f'GSPMD data={n // expert_axis} expert={expert_axis}', 'sort', n),
                               (f'shard_map a2a data={n // expert_axis} expert={expert_axis}',
                                'shard_map_a2a', n)):
    mesh = sharding.make_mesh(data=-1, expert=expert_axis if devices > 1 else 1,
                              devices=jax.devices()[:devices])
    moe = layers.MoE(num_experts=args.experts, hidden_dim=args.hidden,
                     router=routers.TopK(k=2), capacity=Capacity(factor=1.25),
                     dispatch_impl=impl)
    boxed = jax.eval_shape(moe.init, jax.random.PRNGKey(1), x)
    shardings = sharding.param_shardings(boxed, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      variables = jax.jit(lambda r: nn.meta.unbox(moe.init(r, x)), out_shardings=shardings)(
          jax.random.PRNGKey(1))
      xs = jax.device_put(x, sharding.batch_sharding(mesh, 2))

      @jax.jit
      def step(v, x):
        def loss(v):
          y, aux = moe.apply(v, x, training=True)
          return jnp.sum(y ** 2) + aux.loss
        return jax.grad(loss)(v)

      seconds = timed(step, (variables, xs), args.reps)
    rows.append({'setup': label, 'devices': devices, 'seconds': seconds})
    print(f'{label:40s} {seconds * 1e3:9.1f} ms', flush=True)
  for r in rows:
    r['vs_single'] = r['seconds'] / rows[0]['seconds']
  report = {'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
            'simulated_cpu_devices': not args.real_devices, 'config': vars(args), 'rows': rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(report, f, indent=2)
  print('\n| setup | devices | fwd+bwd ms | x single device |\n|---|---|---|---|')
  for r in rows:
    print(f"| {r['setup']} | {r['devices']} | {r['seconds'] * 1e3:.1f} | {r['vs_single']:.2f} |")
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.barh([r['setup'] for r in rows], [r['vs_single'] for r in rows])
  ax.set_xlabel('fwd+bwd time / single device (same run)')
  ax.set_title(f'MoE layer E={args.experts}, T={args.tokens}, {jax.default_backend()}'
               + (' (simulated devices)' if not args.real_devices else ''))
  fig.tight_layout()
  fig.savefig(args.out + '.png', dpi=120)
  print(f'wrote {args.out}.json and {args.out}.png')


if __name__ == '__main__':
  main()
