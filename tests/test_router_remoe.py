"""dynmoe_jax.routers.remoe: ReLU routing and its load-balanced L1 penalty against numpy
references of ReMoE's formulas (arXiv 2412.14711), the layer and the budget on it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import layers, routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.routers import remoe
from dynmoe_jax.train import budget as budget_lib
from tests.conftest import (assert_dispatch_equals_every_expert_on_every_token, load_config,
                            squared_output_grads, trained_under_a_budget)

T, D, E = 24, 8, 6


def reference_l1(gates, k):
  """ReMoE's L1 with load balancing: E · Σ_e (Σ_t g_te / T) · (#{t: g_te > 0} / (T·k))."""
  counts = (gates > 0).sum(0)
  return E * np.sum(gates.mean(0) * counts / (T * k))


def test_relu_routing_and_its_penalty_follow_the_paper():
  logits = np.random.RandomState(0).randn(T, E).astype(np.float32)
  out = remoe.relu_route(jnp.asarray(logits))
  gates = np.maximum(logits, 0.0)
  np.testing.assert_array_equal(out.mask, logits > 0)
  np.testing.assert_allclose(out.weights, gates)  # the gates themselves: no renormalising
  np.testing.assert_array_equal(out.num_active, (logits > 0).sum(1))
  assert out.num_active.min() >= 0 and (np.asarray(out.num_active) != out.num_active[0]).any()
  np.testing.assert_allclose(remoe.l1_balance(out.weights, out.mask, 1.5),
                             reference_l1(gates, 1.5), rtol=1e-6)


def test_a_token_may_take_no_expert_and_the_router_trains_from_the_task():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D))
  moe = layers.MoE(num_experts=E, hidden_dim=16, router=routers.ReMoE(l1_weight=0.0),
                   capacity=Capacity(factor=8.0))
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x)['params'])
  params = {**params, 'router_kernel': params['router_kernel'] - 0.05}
  (y, aux) = moe.apply({'params': params}, x, training=True)
  assert float(aux.metrics['unrouted_fraction']) > 0  # some tokens: no positive gate
  grads = squared_output_grads(moe, params, x)
  assert float(jnp.abs(grads['router_kernel']).max()) > 1e-6
  assert 'l1' not in aux.metrics  # weight 0: not computed


def test_a_budget_prices_experts_through_the_l1_weight():
  config = load_config('tiny', 'remoe')
  config.budget.target_experts_per_token = 1.5
  b = budget_lib.from_config(config, (0, 4))
  assert (b.control, b.raises_k, b.metric) == ('l1', False, 'l1_weight')
  assert b.initial_weight == config.model.moe.remoe.l1_weight
  assert not b.add_unrouted  # evaluation gives an unrouted token no expert either
  from dynmoe_jax import config_lib
  assert config_lib.router_settings(config).expected_k == 1.5  # capacity and the L1's k


@pytest.mark.slow
def test_remoe_trains_under_a_budget_and_its_weight_moves(tmp_path):
  trainer, last = trained_under_a_budget('remoe', str(tmp_path))
  assert np.isfinite(last['loss'])
  assert 'moe/layer_1/l1_weight' in last
  weight = float(trainer.state.moe_controls['layer_1'])
  assert weight != pytest.approx(routers.ReMoE().l1_weight)


@pytest.mark.parametrize('impl', ['sort', 'einsum', 'ragged'])
def test_every_dispatch_path_computes_what_every_expert_on_every_token_does(impl):
  assert_dispatch_equals_every_expert_on_every_token('remoe', impl, D, E)
