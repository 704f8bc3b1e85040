"""The default LM: a small decoder (RMSNorm, rotary embeddings, SwiGLU, fused causal
attention) on `python_corpus` (every distinct .py file of the standard library and the
installed site-packages, generated locally on first use), CPU-sized.

4 blocks of width 128; blocks 1 and 3 MoE with 8 SwiGLU experts of hidden 128, top-any
gating with a budget of 1.5 experts per token and capacity re-planned from routing; dense
blocks: SwiGLU of hidden 384. Contexts of 256 bytes. `make train CONFIG=configs/lm_small.py`,
then `python -m dynmoe_jax.sample --workdir=workdir/lm_small --prompt='def '`.
"""
from dynmoe_jax.default_config import lm_config


def get_config():
  config = lm_config('top_any')
  config.num_train_steps = 1800
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every = 20
  config.eval_every = 600
  config.checkpoint_every = 600
  config.data.name = 'python_corpus'
  config.data.eval_split = 'test[:2048]'
  config.data.seq_len = 256
  m = config.model
  m.arch = 'decoder'
  m.max_len = 1024
  m.num_layers = 4
  m.dim = 128
  m.num_heads = 4
  m.mlp_dim = 384
  m.moe.num_experts = 8
  m.moe.hidden_dim = 128
  m.moe.glu = True
  m.moe.activation = 'silu'
  m.moe.target_experts_per_token = 1.5
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.min_lr_ratio = 0.1
  a = config.adaptive
  a.capacity = True
  a.every = 300
  a.record_steps = 50
  a.compile_lead_steps = 20
  return config
