"""The grouped matmul behind dispatch_impl='ragged': which lowering runs where."""
import types

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import experts


def operands():
  lhs = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
  rhs = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 5))
  return lhs, rhs, jnp.array([4, 0, 6], jnp.int32)


def test_cpu_uses_jax_ragged_dot_and_it_is_a_grouped_matmul():
  lhs, rhs, sizes = operands()
  got = experts.ragged_dot(lhs, rhs, sizes)
  want = np.concatenate([lhs[:4] @ rhs[0], lhs[4:] @ rhs[2]])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert experts.use_fast_ragged_dot() == 'jax.lax.ragged_dot (XLA, cpu)'


def test_accelerators_use_tokamax_where_installed(monkeypatch):
  calls = []
  fake = types.SimpleNamespace(ragged_dot=lambda lhs, rhs, group_sizes: calls.append(
      group_sizes) or jax.lax.ragged_dot(lhs, rhs, group_sizes))
  monkeypatch.setattr(experts, '_tokamax', lambda: fake)
  lhs, rhs, sizes = operands()
  experts.ragged_dot(lhs, rhs, sizes)
  assert not calls  # this CPU backend: never tokamax
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  experts.ragged_dot(lhs, rhs, sizes)
  assert len(calls) == 1
  assert experts.use_fast_ragged_dot() == 'tokamax.ragged_dot (gpu)'


def test_gpu_without_tokamax_turns_on_the_triton_lowering(monkeypatch):
  monkeypatch.setattr(experts, '_tokamax', lambda: None)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  before = jax.config.jax_ragged_dot_use_gpu_pallas_triton_lowering
  try:
    assert 'Pallas/Triton' in experts.use_fast_ragged_dot()
    assert jax.config.jax_ragged_dot_use_gpu_pallas_triton_lowering
  finally:
    jax.config.update('jax_ragged_dot_use_gpu_pallas_triton_lowering', before)
