"""The LM on a Cloud TPU v5e-8 slice (one host, 8 chips of 16 GiB): `lm_base`'s model with
its experts spread over the chips.

Mesh: `expert` = 8 (two of the 16 experts of each MoE block per chip); the batch is split
over ('data', 'expert'), so every chip also does data-parallel work, and the
`shard_map_a2a` dispatch sends each token's pairs to its experts' chips with one
all-to-all each way. 32 x 1,024 bytes per step (4 contexts per chip), 6,000 steps: the
197M bytes of lm_base's run. Why 32 and not more: the dry run
(`--dry_run --target=v5e-8`) puts the train step at 9.9 GB of a chip's 16 GB at 32 and at
36 GB at 128, with XLA's attention keeping every layer's [contexts, heads, 1024, 1024]
float32 scores for the backward pass (docs/accelerators.md).
On the TPU VM: `pip install -e '.[tpu]'`, then
  python -m dynmoe_jax.main --config=configs/lm_tpu.py --workdir=workdir/lm_tpu
(docs/guide.md, "Sharding, GPU, TPU and multi-host").
"""
import os

from dynmoe_jax import config_lib


def get_config():
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'lm_base.py'))
  config.num_train_steps = 6000
  config.batch_size = 32
  config.eval_batch_size = 32
  config.mesh.data = -1
  config.mesh.expert = 8
  config.mesh.model = 1
  config.model.moe.dispatch_impl = 'shard_map_a2a'
  return config
