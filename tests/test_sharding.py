"""dynmoe_jax.sharding: mesh shapes, the axis rules, fitted specs (pure functions; the
multi-device runs are in test_multidevice.py)."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from dynmoe_jax import layers, sharding


def test_mesh_shape_resolves_minus_one_and_names_bad_axes():
  assert sharding.mesh_shape(-1, 4, 1, num_devices=8) == (2, 4, 1)
  assert sharding.mesh_shape(2, 2, 2, num_devices=8) == (2, 2, 2)
  with pytest.raises(ValueError, match='not divisible by the other mesh axes'):
    sharding.mesh_shape(-1, 3, 1, num_devices=8)
  with pytest.raises(ValueError, match='only one of'):
    sharding.mesh_shape(-1, -1, 1, num_devices=8)
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.mesh_shape(4, 4, 1, num_devices=8)


def test_rules_put_experts_on_the_expert_axis():
  assert sharding.logical_to_spec(('expert', 'embed', 'mlp')) == P('expert', None, 'model')
  assert sharding.logical_to_spec(('batch', None)) == P(('data', 'expert'), None)


def test_fit_spec_keeps_indivisible_dimensions_whole():
  mesh = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
  assert sharding.fit_spec((8, 16), P('expert', None), mesh) == P('expert', None)
  assert sharding.fit_spec((6, 16), P('expert', None), mesh) == P(None, None)


def test_param_shardings_follow_logical_names():
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  moe = layers.MoE(num_experts=4, hidden_dim=8)
  boxed = jax.eval_shape(lambda: moe.init(jax.random.PRNGKey(0), jnp.ones((4, 8))))['params']
  shardings = sharding.param_shardings(boxed, mesh)
  assert shardings['wi'].spec == P('expert', None, 'model')
  assert shardings['thresholds'].spec == P('expert')


def test_constrain_is_the_identity_without_a_mesh():
  x = jnp.ones((4, 2))
  assert sharding.constrain(x, ('batch', None)) is x
