"""Runs a few steps of the tiny config under a given device count / mesh / dispatch
path and saves what the sharding tests compare. Launched in a subprocess because
the CPU device count is fixed when JAX starts.

  python tests/sharding_worker.py OUT.npz [key=value ...]
keys: devices, data, expert, experts, impl, steps, adaptive (1 = on), adam_eps, coordinator,
      num_processes, process_id
"""
import os
import sys

args = dict(a.split('=', 1) for a in sys.argv[2:])
os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split()  # keep the suite's other flags
     if not f.startswith('--xla_force_host_platform_device_count')] +
    [f"--xla_force_host_platform_device_count={args.get('devices', '1')}"])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

if 'coordinator' in args:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(args['coordinator'], int(args['num_processes']),
                             int(args['process_id']))

import numpy as np  # noqa: E402

from dynmoe_jax import plots, train  # noqa: E402
from tests.conftest import load_config  # noqa: E402


def main():
  config = load_config('tiny', args.get('router', 'top_any'))
  config.num_train_steps = int(args.get('steps', '4'))
  config.log_every = 1
  config.eval_every = config.num_train_steps
  config.checkpoint_every = config.num_train_steps
  config.batch_size = 16
  config.eval_batch_size = 200
  config.model.moe.num_experts = int(args.get('experts', '8'))
  config.model.moe.dispatch_impl = args.get('impl', 'sort')
  config.model.moe.capacity.factor = 8.0
  # Adam's first step moves every weight by lr * sign(g). A gradient that is zero up to
  # rounding (1e-9, summed in another order on another layout or CPU) would then move a
  # full lr one way or the other; eps well above rounding keeps such weights still, so the
  # comparison measures the layout, not Adam's sign of noise.
  config.optimizer.eps = float(args.get('adam_eps', '1e-3'))
  if args.get('adaptive') == '1':
    config.adaptive.enabled = True
    config.adaptive.every = 3
    config.adaptive.record_steps = 1
    config.adaptive.compile_lead_steps = 1  # the compile-ahead thread lowers on the mesh
    config.adaptive.min_experts = 1
    config.adaptive.max_experts = 8
    config.model.moe.top_any.scale = 4.0  # sharper gates: some tokens activate no expert
  config.mesh.data = int(args.get('data', '-1'))
  config.mesh.expert = int(args.get('expert', '1'))
  trainer = train.Trainer(config, args['workdir'])
  result = trainer.run()
  wi = trainer.state.params['layer_1']['moe']['wi']
  shard_shapes = sorted({tuple(s.data.shape) for s in wi.addressable_shards})
  if jax.process_index() == 0:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(trainer.state.params, tiled=True) \
        if jax.process_count() > 1 else jax.device_get(trainer.state.params)
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}
    rows = plots.read_jsonl(os.path.join(args['workdir'], 'metrics.jsonl'))
    losses = [r['loss'] for r in rows if r['split'] == 'train']
    np.savez(sys.argv[1], losses=np.array(losses), eval_loss=result['eval']['loss'],
             shard_shape=np.array(shard_shapes[0]), num_shard_shapes=len(shard_shapes),
             experts_per_layer=np.array(result['experts_per_layer']),
             devices=jax.device_count(), **{f'param{k}': v for k, v in flat.items()})
  elif jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.process_allgather(trainer.state.params, tiled=True)


if __name__ == '__main__':
  main()
