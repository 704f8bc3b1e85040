"""DA-MoE (arXiv 2409.06669) on MNIST-1D: experts per token from attention
importance, at most max_k = 4."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  config = mnist1d_config('adaptive_k')
  config.model.moe.adaptive_k.max_k = 4
  config.model.moe.adaptive_k.expected_k = 2.0
  return config
