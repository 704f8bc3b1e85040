"""Default job (`make train`): DynMoE top-any gating on MNIST-1D, CPU-sized.
See dynmoe_jax.default_config.mnist1d_config for the model and schedule."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  return mnist1d_config('top_any')
