"""Top-2 byte-level LM baseline for configs/lm_dynmoe.py."""
from dynmoe_jax.default_config import lm_config


def get_config():
  config = lm_config('top_k')
  config.model.moe.top_k.k = 2
  return config
