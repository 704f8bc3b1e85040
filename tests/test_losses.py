"""Auxiliary losses on hand-built inputs with their values written out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import losses


def test_diversity_zero_for_orthonormal_and_known_value():
  assert float(losses.diversity(jnp.eye(4, 8) * 3.0)) == pytest.approx(0.0, abs=1e-2)
  # two identical directions: gram off-diagonals are 1 -> ||G - I||_F = sqrt(2)
  w = jnp.array([[1.0, 0.0], [2.0, 0.0]])
  assert float(losses.diversity(w)) == pytest.approx(np.sqrt(2), rel=1e-4)
  # masking the duplicate away leaves a single orthonormal row
  assert float(losses.diversity(w, jnp.array([True, False]))) == pytest.approx(0, abs=1e-2)


def test_simplicity_is_mean_row_norm():
  w = jnp.array([[3.0, 4.0], [0.0, 1.0]])
  assert float(losses.simplicity(w)) == pytest.approx(3.0)


def test_load_balance_uniform_is_one_and_collapse_is_e():
  e = 4
  probs = jnp.full((8, e), 1.0 / e)
  mask = jnp.eye(e, dtype=bool)[jnp.arange(8) % e]
  assert float(losses.load_balance(probs, mask)) == pytest.approx(1.0)
  collapsed_probs = jnp.zeros((8, e)).at[:, 0].set(1.0)
  collapsed_mask = jnp.zeros((8, e), bool).at[:, 0].set(True)
  assert float(losses.load_balance(collapsed_probs, collapsed_mask)) == pytest.approx(e)


def test_z_loss_and_entropy():
  logits = jnp.zeros((3, 4))
  assert float(losses.z_loss(logits)) == pytest.approx(np.log(4) ** 2, rel=1e-5)
  assert float(losses.router_entropy(jax.nn.softmax(logits))) == pytest.approx(np.log(4), rel=1e-4)
  assert float(losses.router_entropy(jnp.eye(4))) == pytest.approx(0.0, abs=1e-4)


def test_losses_are_differentiable_and_finite():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
  grads = jax.grad(lambda w: losses.diversity(w) + losses.simplicity(w))(w)
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads).sum()) > 0
