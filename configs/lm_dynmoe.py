"""DynMoE top-any byte-level LM on the local Python standard library sources."""
from dynmoe_jax.default_config import lm_config


def get_config():
  return lm_config('top_any')
