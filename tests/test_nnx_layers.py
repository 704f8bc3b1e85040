"""dynmoe_jax.nnx_layers: the NNX layer is the linen layer behind NNX's API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import layers, nnx_layers
from dynmoe_jax.capacity import Capacity

D = 16
SETTINGS = dict(num_experts=4, hidden_dim=32, capacity=Capacity(factor=8.0))


@pytest.mark.parametrize('router', ['top_any', 'top_k', 'adaptive_k'])
def test_the_nnx_layer_computes_what_the_linen_layer_does_with_its_params(router):
  moe = nnx_layers.MoE(D, router=router, rngs=nnx.Rngs(0), **SETTINGS)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, D))
  importance = jax.random.uniform(jax.random.PRNGKey(2), (2, 8)) if router == 'adaptive_k' \
      else None
  y, aux = moe(x, training=True, token_importance=importance)
  params = nnx.state(moe, nnx.Param)
  linen_params = nnx.to_pure_dict(params)['layer']
  expected, expected_aux = layers.MoE(router=router, **SETTINGS).apply(
      {'params': linen_params}, x, training=True, token_importance=importance)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux.loss, expected_aux.loss, rtol=1e-6)
  assert set(linen_params) >= {'wi', 'wo'}


def test_the_nnx_layer_trains_with_nnx_grad_and_keeps_logical_axes():
  moe = nnx_layers.MoE(D, router='top_any', rngs=nnx.Rngs(0), **SETTINGS)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, D))

  def loss_fn(model):
    y, aux = model(x, training=True)
    return jnp.mean((x + y) ** 2) + aux.loss

  grads = nnx.grad(loss_fn)(moe)
  flat = nnx.to_pure_dict(grads)['layer']
  assert np.abs(flat['wi']).max() > 0 and np.abs(flat['gate_embeddings']).max() > 0
  # the linen layer's logical axis names travel as NNX sharding metadata
  assert tuple(moe.layer.wi.get_metadata()['out_sharding']) == ('expert', 'embed', 'mlp')
