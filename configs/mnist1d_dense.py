"""Dense baseline of the default job: every block a dense FFN of hidden 128, the
width that a top-2 MoE block of hidden-64 experts activates per token."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  config = mnist1d_config()
  config.model.moe_layers = 'none'
  return config
