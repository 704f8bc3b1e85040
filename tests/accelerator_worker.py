"""Run in a subprocess with 8 fake CPU devices (the device count is fixed when JAX starts):
export every config's train and eval steps for TPU and GPU, the ragged kernels' exports,
the per-device kernel path's numerics on a mesh, and the dry run's byte counts.
Usage: python tests/accelerator_worker.py OUT.json"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dynmoe_jax import config_lib, dryrun, grouped_matmul  # noqa: E402
from dynmoe_jax.train import export  # noqa: E402

# The sizes a CPU lowers in seconds, for the decoders; every code path is the config's own
# (router, dispatch, mesh axes, dtype, remat). Batches divide the 8 devices.
DECODER_SHRINK = {'data.seq_len': 64, 'model.num_layers': 2, 'model.dim': 64,
                  'model.num_heads': 4, 'model.mlp_dim': 64, 'model.moe.hidden_dim': 32}
BATCH = {'batch_size': 16, 'eval_batch_size': 16}


def load(name, **overrides):
  config = config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
  shrink = {**BATCH, **(DECODER_SHRINK if config.model.arch == 'decoder' else {}), **overrides}
  for dotted, value in shrink.items():
    *parents, leaf = dotted.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def exports(name, config):
  try:
    done = export.export_config(config, name)
  except export.ExportError as e:
    return {'error': str(e)}
  return {f'{p}/{s}': {'kernels': list(e.kernels), 'grouped_matmul': e.grouped_matmul}
          for (p, s), e in done.items()}


def per_shard_numerics():
  """The kernel backends on a mesh of 8 (each device its slice of the pair list) equal XLA."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))  # auto axes, as the trainer's
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(200, 32)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(4, 32, 48)), jnp.float32)
  sizes = jnp.asarray([30, 0, 90, 60], jnp.int32)  # 20 unused rows; groups cross devices
  out = {}
  with jax.set_mesh(mesh):
    lhs_sharded = jax.device_put(lhs, NamedSharding(mesh, P('data')))
    want = jax.jit(jax.value_and_grad(lambda a, b: (jax.lax.ragged_dot(a, b, sizes) ** 2).sum(),
                                      argnums=(0, 1)))(lhs_sharded, rhs)
    for backend in ('megablox', 'pallas_triton'):
      fn = grouped_matmul.get(backend)
      got = jax.jit(jax.value_and_grad(lambda a, b: (fn(a, b, sizes) ** 2).sum(),
                                       argnums=(0, 1)))(lhs_sharded, rhs)
      out[backend] = max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                         for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return out


def grouped_expert_parallel():
  """Routing groups under shard_map_a2a on a (data 2, expert 4) mesh: each shard's groups
  dispatched and sent in one all-to-all give what the sort path gives for the same groups
  (64 tokens, 8 a shard, groups of 4; capacity 1, so pairs overflow in every group)."""
  from dynmoe_jax import layers, routers, sharding
  from dynmoe_jax.capacity import Capacity
  moe = lambda impl: layers.MoE(num_experts=8, hidden_dim=16,
                                router=routers.TopK(k=2, priority='batch'),
                                capacity=Capacity(slots=1, group_size=4), dispatch_impl=impl)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 12))
  params = jax.jit(moe('sort').init)(jax.random.PRNGKey(1), x)  # eagerly: ~200 small compiles
  out = {}
  with jax.set_mesh(sharding.make_mesh(2, 4, 1)):
    for impl in ('sort', 'shard_map_a2a'):
      y, aux = jax.jit(lambda p, t: moe(impl).apply(p, t, training=True))(params, x)
      out[impl] = {'y': np.asarray(y).tolist(), 'loss': float(aux.loss),
                   'dropped': float(aux.metrics['dropped_fraction']),
                   'capacity': float(aux.metrics['capacity'])}
  return out


def main(path):
  configs = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py'))
  result = {'configs': {name: exports(name, load(name)) for name in configs}}
  result['ragged'] = {
      backend: exports(f'lm_base ragged {backend}', load(
          'lm_base', **{'model.moe.dispatch_impl': 'ragged', 'model.moe.ragged_backend': backend}))
      for backend in ('auto', 'megablox', 'pallas_triton')}
  result['per_shard_relative_error'] = per_shard_numerics()
  result['grouped_expert_parallel'] = grouped_expert_parallel()
  config = load('lm_tpu')
  analysis = dryrun.analyse(config, 'lm_tpu', dryrun.CHIPS['v5p'], 8)
  batch_bytes = 16 * 65 * 4 // 8  # int32 bytes of this device's rows
  result['dry_run_lm_tpu_shrunk'] = {**analysis['state_bytes'],
                                     'xla_arguments': analysis['xla_memory']['arguments'],
                                     'batch_bytes': batch_bytes}
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1])
