"""dynmoe_jax: dynamic Mixture-of-Experts (DynMoE top-any, top-p, DA-MoE, top-k,
expert choice) in JAX/Flax with fixed-capacity dispatch and expert sharding."""
from dynmoe_jax import dispatch, layers, losses, routing

__version__ = '0.1.0'
__all__ = ['dispatch', 'layers', 'losses', 'routing']
