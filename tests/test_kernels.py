"""The Pallas grouped matmuls (megablox for TPU, the Triton kernel for GPU), run in interpret
mode on this CPU: forward and both gradients equal XLA's ragged_dot, alone and inside the
MoE layer; the backend setting's choice, checks and descriptions."""
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from dynmoe_jax import grouped_matmul, layers
from dynmoe_jax.kernels import megablox, triton_gmm

KERNELS = {'megablox': megablox.grouped_matmul, 'pallas_triton': triton_gmm.grouped_matmul}
RTOL = 1e-5
# (rows, K, N, group sizes): uneven, empty groups, an unused tail of rows, sizes that are
# no multiple of any tile (megablox's 128, the Triton kernel's 64 / 16).
CASES = [(100, 24, 40, [10, 0, 50, 30]), (128, 32, 64, [0, 128, 0]),
         (300, 256, 128, [0, 130, 0, 100]), (7, 16, 16, [0, 0, 0])]


def assert_close(got, want, name):
  scale = float(jnp.max(jnp.abs(want))) or 1.0
  err = float(jnp.max(jnp.abs(got - want))) / scale
  assert err <= RTOL, f'{name}: relative error {err:.2e}'


def value_and_grads(fn, lhs, rhs, sizes, cotangent):
  out, vjp = jax.vjp(jax.jit(lambda a, b: fn(a, b, sizes)), lhs, rhs)
  return (out, *vjp(cotangent))


@pytest.mark.parametrize('backend', sorted(KERNELS))
@pytest.mark.parametrize('rows,depth,cols,sizes', CASES)
def test_kernel_equals_xla_ragged_dot_values_and_both_gradients(backend, rows, depth, cols,
                                                                 sizes):
  rng = np.random.default_rng(rows)
  lhs = jnp.asarray(rng.normal(size=(rows, depth)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), depth, cols)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)
  sizes = jnp.asarray(sizes, jnp.int32)
  want = value_and_grads(jax.lax.ragged_dot, lhs, rhs, sizes, cotangent)
  got = value_and_grads(KERNELS[backend], lhs, rhs, sizes, cotangent)
  for name, g, w in zip(('value', 'd_tokens', 'd_experts'), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert_close(g, w, name)
  assert not bool(jnp.any(got[0][int(sizes.sum()):])), 'rows past the groups must be 0'


def moe_outputs(backend, x):
  moe = layers.MoE(num_experts=4, hidden_dim=32, router='top_k', glu=True,
                   dispatch_impl='ragged', ragged_backend=backend)
  variables = moe.init(jax.random.PRNGKey(0), x)

  @jax.jit
  def loss_and_grads(params, x):
    def loss(params, x):
      y, aux = moe.apply({'params': params}, x, training=True)
      return (y ** 2).sum() + aux.loss, y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  (_, y), (d_params, d_x) = loss_and_grads(variables['params'], x)
  return y, d_params, d_x


@pytest.mark.parametrize('backend', ['auto', 'megablox', 'pallas_triton'])
def test_kernels_inside_the_moe_layer_under_jit_equal_xla(backend):
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 25, 48))  # 75 tokens: no tile multiple
  want = moe_outputs('xla', x)
  got = moe_outputs(backend, x)
  assert_close(got[0], want[0], 'output')
  assert_close(got[2], want[2], 'd_tokens')
  wanted = jax.tree_util.tree_leaves_with_path(want[1])
  for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got[1]), wanted,
                               strict=True):
    assert_close(g, w, f'd_params{jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('backend,platform,target', [
    ('megablox', 'tpu', 'tpu_custom_call'), ('pallas_triton', 'cuda', '__gpu$xla.gpu.triton')])
def test_kernel_gradient_exports_for_its_platform_with_the_kernel_call(backend, platform,
                                                                       target):
  fn = jax.value_and_grad(
      lambda a, b, s: KERNELS[backend](a, b, s).astype(jnp.float32).sum(), argnums=(0, 1))
  args = (jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((4, 128, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((4,), jnp.int32))
  exported = jax_export.export(
      jax.jit(fn), platforms=[platform],
      disabled_checks=[jax_export.DisabledSafetyCheck.custom_call(target)])(*args)
  calls = re.findall(r'custom_call @([\w$.]+)', exported.mlir_module())
  assert calls.count(target) >= 3, calls  # forward, lhs gradient, rhs gradient


def test_auto_picks_by_platform_and_describes_it():
  assert grouped_matmul.resolve('auto', 'tpu') == 'megablox'
  assert grouped_matmul.resolve('auto', 'cuda') == 'pallas_triton'
  assert grouped_matmul.resolve('auto', 'cpu') == 'xla'
  assert grouped_matmul.describe('auto', 'cpu') == "jax.lax.ragged_dot (XLA) on cpu ('auto')"
  assert 'interpreted' in grouped_matmul.describe('megablox', 'cpu')
  assert grouped_matmul.platform_name('gpu') == 'cuda'


def test_a_kernel_on_the_wrong_accelerator_or_missing_tokamax_is_one_line(monkeypatch):
  with pytest.raises(ValueError, match=r"'megablox' is a tpu kernel; on cuda it would run "
                                       r'interpreted'):
    grouped_matmul.check('megablox', 'cuda')
  with pytest.raises(ValueError, match="'pallas_triton' is a cuda kernel; on tpu"):
    grouped_matmul.check('pallas_triton', 'tpu')
  grouped_matmul.check('megablox', 'cpu')  # interpret mode: the tests' own path
  monkeypatch.setattr(grouped_matmul, '_tokamax', lambda: None)
  with pytest.raises(ValueError, match=r"needs tokamax \(pip install"):
    grouped_matmul.check('tokamax', 'cuda')


def test_tokamax_backend_calls_tokamax_where_installed(monkeypatch):
  calls = []
  fake = types.SimpleNamespace(ragged_dot=lambda lhs, rhs, group_sizes: calls.append(
      group_sizes) or jax.lax.ragged_dot(lhs, rhs, group_sizes))
  monkeypatch.setattr(grouped_matmul, '_tokamax', lambda: fake)
  lhs, rhs = jnp.ones((10, 4)), jnp.ones((3, 4, 5))
  sizes = jnp.array([4, 0, 6], jnp.int32)
  out = grouped_matmul.get('tokamax')(lhs, rhs, sizes)
  assert len(calls) == 1 and out.shape == (10, 5)


def test_config_refuses_an_unknown_backend(tiny_config):
  from dynmoe_jax import config_lib
  tiny_config.model.moe.ragged_backend = 'cutlass'
  with pytest.raises(config_lib.ConfigError, match='model.moe.ragged_backend'):
    config_lib.validate(tiny_config)
