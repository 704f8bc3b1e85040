"""The default LM: a small decoder (RMSNorm, rotary embeddings, SwiGLU, fused causal
attention) on `python_corpus` (every distinct .py file of the standard library and the
installed site-packages, generated locally on first use), CPU-sized.

4 blocks of width 128; blocks 1 and 3 MoE with 8 SwiGLU experts of hidden 128, top-p
routing (p = 0.4: about 1.3-1.7 experts per token here) and capacity re-planned from
routing; dense blocks: SwiGLU of hidden 384. Contexts of 256 bytes, 1,800 steps of 16.
`make train CONFIG=configs/lm_small.py`, then
`python -m dynmoe_jax.sample --workdir=workdir/lm_small --prompt='def '`.

Why top-p and not top-any: with this decoder and learning rate, top-any (budget 1.5)
collapsed: by step 200 93% of training tokens activated no expert and by step 700 all
of them, so both MoE blocks went unused (experiments/results/lm_small.md).
"""
from dynmoe_jax.default_config import decoder_lm_config


def get_config():
  config = decoder_lm_config('top_p')
  config.num_train_steps = 1800
  config.batch_size = 16
  config.eval_batch_size = 64
  config.log_every = 20
  config.eval_every = 600
  config.checkpoint_every = 600
  config.data.seq_len = 256
  m = config.model
  m.num_layers = 4
  m.dim = 128
  m.num_heads = 4
  m.mlp_dim = 384
  m.moe.num_experts = 8
  m.moe.hidden_dim = 128
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 200
  a = config.adaptive
  a.capacity = True
  a.every = 300
  a.record_steps = 50
  a.compile_lead_steps = 20
  return config
