"""A few seconds on CPU: the byte LM path, used by the tests."""
from dynmoe_jax.default_config import lm_config


def get_config(router='top_any'):
  config = lm_config(router)
  config.num_train_steps = 20
  config.batch_size = 8
  config.eval_batch_size = 32
  config.log_every = 5
  config.eval_every = 20
  config.checkpoint_every = 20
  config.progress_bar = False
  config.data.eval_split = 'test[:64]'
  config.data.seq_len = 32
  config.model.num_layers = 2
  config.model.dim = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.max_len = 32
  config.model.moe.num_experts = 4
  config.model.moe.hidden_dim = 32
  config.optimizer.warmup_steps = 2
  return config
