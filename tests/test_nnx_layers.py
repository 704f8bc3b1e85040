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


def test_the_nnx_layer_has_the_linen_layers_gradients():
  moe = nnx_layers.MoE(D, router='top_k', rngs=nnx.Rngs(0), **SETTINGS)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, D))
  grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x, training=True)[0] ** 2))(moe))
  params = nnx.to_pure_dict(nnx.state(moe, nnx.Param))['layer']
  linen = layers.MoE(router='top_k', **SETTINGS)
  expected = jax.grad(lambda p: jnp.sum(linen.apply({'params': p}, x, training=True)[0] ** 2))(
      params)
  for name, value in expected.items():
    np.testing.assert_allclose(grads['layer'][name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow  # trains for 100 steps in a fresh process: an end-to-end run
def test_the_manuals_nnx_model_trains_with_nnx_jit_and_its_loss_falls(tmp_path):
  import os
  import subprocess
  import sys
  from tests.conftest import ROOT
  from tests.test_readme import code_blocks
  block, = [b for b in code_blocks('docs/guide.md', 'python') if 'class Model(nnx.Module)' in b]
  proc = subprocess.run([sys.executable, '-c', block], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, last = (float(v) for v in proc.stdout.split(',')[0].split()[1::2])
  assert last < 0.5 * first, proc.stdout
