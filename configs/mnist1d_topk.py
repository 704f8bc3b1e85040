"""Top-k (GShard, k=2) baseline on MNIST-1D; `--config.model.moe.top_k.k=1` for Switch."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  config = mnist1d_config('top_k')
  config.model.moe.top_k.k = 2
  return config
