"""The LM on a Cloud TPU v5e-8 slice (one host, 8 chips of 16 GiB): `lm_base`'s model with
its experts spread over the chips.

Mesh: `expert` = 8 (two of the 16 experts of each MoE block per chip); the batch is split
over ('data', 'expert'), so every chip also does data-parallel work, and the
`shard_map_a2a` dispatch sends each token's pairs to its experts' chips with one
all-to-all each way. 128 x 1,024 bytes per step (16 contexts per chip), 4,000 steps.
On the TPU VM: `pip install -e '.[tpu]'`, then
  python -m dynmoe_jax.main --config=configs/lm_tpu.py --workdir=workdir/lm_tpu
(README, "Cloud TPU").
"""
import os

from dynmoe_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'lm_base.py'))
  config.num_train_steps = 4000
  config.batch_size = 128
  config.eval_batch_size = 128
  config.mesh.data = -1
  config.mesh.expert = 8
  config.mesh.model = 1
  config.model.moe.dispatch_impl = 'shard_map_a2a'
  return config
