"""Top-p routing (arXiv 2403.07652) on MNIST-1D: p = 0.4, load balance 1e-2,
router entropy 1e-4 as in the official code."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  config = mnist1d_config('top_p')
  config.model.moe.top_p.p = 0.4
  config.model.moe.top_p.load_balance_weight = 1e-2
  config.model.moe.top_p.entropy_weight = 1e-4
  return config
