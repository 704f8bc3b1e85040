"""The LM at accelerator scale: one GPU (H100 / H200) in about 10 minutes.

A decoder (RMSNorm, rotary embeddings, SwiGLU, causal attention: XLA's unless
`model.attention_impl=cudnn`) of width 768 and 12 blocks on `python_corpus`, bytes in
contexts of 1,024; blocks 1, 3, ..., 11 are MoE with 16 SwiGLU experts of hidden 768,
the others SwiGLU of hidden 2048. 226.8M parameters in all (169.9M in experts), 78.1M
active per token at top-2. bf16 compute, float32 parameters and optimizer state.
3,000 steps of 64 x 1,024 bytes (197M bytes, about 0.9 of an epoch).

Top-2 by default (the baseline); DynMoE's top-any at a compute budget of 1.5 experts
per token beside it, in its own workdir:
  make train CONFIG=configs/lm_base.py
  make train CONFIG=configs/lm_base.py WORKDIR=workdir/lm_base_top_any \\
    ARGS='--config.model.moe.router=top_any --config.budget.target_experts_per_token=1.5 --config.model.moe.top_any.train_fallback=True'
Capacity is re-planned from routing every 500 steps, so the budget run computes what
its router uses. Out of memory: `--config.model.remat=dots` (or `full`), or a smaller
`--config.batch_size`.
"""
from dynmoe_jax.default_config import decoder_lm_config


def get_config():
  config = decoder_lm_config('top_k')
  config.num_train_steps = 3000
  config.batch_size = 64
  config.eval_batch_size = 64
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 1000
  config.data.seq_len = 1024
  m = config.model
  m.num_layers = 12
  m.dim = 768
  m.num_heads = 12
  m.mlp_dim = 2048
  m.dtype = 'bfloat16'
  m.moe.top_k.k = 2
  m.moe.num_experts = 16
  m.moe.hidden_dim = 768
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 300
  config.optimizer.weight_decay = 0.1
  a = config.adaptive
  a.capacity = True
  a.every = 500
  a.record_steps = 100
  a.compile_lead_steps = 50
  return config
