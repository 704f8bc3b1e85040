"""A few seconds on CPU: used by the tests. `get_config('top_k')` picks the router."""
from dynmoe_jax.default_config import base_config


def get_config(router='top_any'):
  config = base_config()
  config.num_train_steps = 20
  config.batch_size = 16
  config.eval_batch_size = 250
  config.log_every = 5
  config.eval_every = 10
  config.checkpoint_every = 10
  config.progress_bar = False
  config.model.num_layers = 2
  config.model.dim = 32
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.moe.num_experts = 4
  config.model.moe.hidden_dim = 32
  config.model.moe.router = router
  config.optimizer.warmup_steps = 2
  return config
