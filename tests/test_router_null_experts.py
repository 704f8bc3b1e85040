"""dynmoe_jax.routers.null_experts: AdaMoE's null experts against numpy references of its
formulas (arXiv 2406.13233), the layer, adaptive resizing and the budget on it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import adaptive, layers, routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.routers import null_experts
from dynmoe_jax.train import budget as budget_lib
from tests.conftest import (assert_dispatch_equals_every_expert_on_every_token, load_config,
                            trained_under_a_budget)

T, D, E, N, K = 32, 8, 4, 3, 3


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_route(logits, null_logits, k, null_weight=1.0):
  probs = softmax(np.concatenate([logits, null_logits + np.log(null_weight)], -1))
  top = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  chosen = np.zeros_like(probs, bool)
  np.put_along_axis(chosen, top, True, axis=-1)
  real = probs[:, :E]
  mask = chosen[:, :E]
  weights = np.where(mask, real, 0) / (np.where(mask, real, 0).sum(-1, keepdims=True) + 1e-6)
  return probs, chosen, mask, weights


def reference_balance(probs, chosen):
  share = chosen.sum(0) / chosen.sum()
  mean = probs.mean(0)
  group = lambda v: np.concatenate([v[:E], np.full(N, v[E:].mean())])
  return (E + N) * np.sum(group(share) * group(mean))


def case(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(T, E).astype(np.float32), rng.randn(T, N).astype(np.float32)


@pytest.mark.parametrize('null_weight', [1.0, 4.0])
def test_routing_over_real_and_null_experts_follows_the_paper(null_weight):
  logits, null_logits = case()
  out = null_experts.null_route(jnp.asarray(logits), jnp.asarray(null_logits), K,
                                null_weight=null_weight)
  probs, chosen, mask, weights = reference_route(logits, null_logits, K, null_weight)
  np.testing.assert_array_equal(out.mask, mask)
  np.testing.assert_allclose(out.weights, np.where(mask, weights, 0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.scores, probs[:, :E], rtol=1e-5)
  counts = np.asarray(out.num_active)
  assert counts.min() >= K - N and counts.max() <= K and len(set(counts)) > 1
  all_logits = null_experts.with_null(jnp.asarray(logits), jnp.asarray(null_logits),
                                      null_weight)
  np.testing.assert_allclose(null_experts.null_aware_balance(all_logits, K, E),
                             reference_balance(probs, chosen), rtol=1e-5)


def test_a_heavier_null_weight_leaves_fewer_real_experts_and_balance_is_1_when_uniform():
  logits, null_logits = case(1)
  route = lambda w: null_experts.null_route(jnp.asarray(logits), jnp.asarray(null_logits), K,
                                            null_weight=w)
  assert float(route(8.0).num_active.mean()) < float(route(1.0).num_active.mean())
  uniform = jnp.zeros((T, E + N))
  assert float(null_experts.null_aware_balance(uniform, K, E)) == pytest.approx(1.0, rel=1e-5)


def test_the_layer_routes_real_experts_and_resizes_without_touching_the_null_ones():
  x = jax.random.normal(jax.random.PRNGKey(0), (T, D))
  settings = routers.NullExperts(k=K, num_null=N)
  moe = layers.MoE(num_experts=E, hidden_dim=16, router=settings, capacity=Capacity(factor=8.0))
  boxed = moe.init(jax.random.PRNGKey(1), x)['params']
  params = nn.meta.unbox(boxed)
  assert params['null_kernel'].shape == (D, N)
  y, aux = moe.apply({'params': params}, x, training=True)
  assert 'load_balance' in aux.metrics and np.isfinite(float(aux.loss))
  assert K - N <= float(aux.metrics['active_experts']) <= K
  # capacity is sized for the real experts per token at balanced load: K·E/(E + N)
  assert settings.capacity_k(E) == pytest.approx(K * E / (E + N))
  axes = {k[-1]: v for k, v in adaptive.expert_axes(boxed).items()}
  record = adaptive.RecordAccumulator(np.asarray([5, 0, 3, 2]), 4, -np.ones(D), 1)
  layer = adaptive.plan_layer(record, params, axes, router='null_experts',
                              kernel_init=moe.kernel_init, min_experts=1, max_experts=8,
                              new_expert_init='copy_nearest', rng=jax.random.PRNGKey(2))
  plan = adaptive.ResizePlan({(): layer}, adaptive.expert_axes(boxed))
  resized, _ = adaptive.resize(params, (), plan)
  np.testing.assert_array_equal(resized['null_kernel'], params['null_kernel'])
  assert resized['router_kernel'].shape == (D, layer.new_count)
  grown = moe.clone(num_experts=layer.new_count)
  assert np.isfinite(np.asarray(grown.apply({'params': resized}, x, training=True)[0])).all()


def test_a_budget_prices_real_experts_through_the_null_weight():
  config = load_config('tiny', 'null_experts')
  config.budget.target_experts_per_token = 1.0
  b = budget_lib.from_config(config, (0, 4))
  assert (b.control, b.raises_k, b.metric, b.initial_weight) == ('null', False, 'null_weight',
                                                                1.0)
  from dynmoe_jax import config_lib
  config_lib.validate(config, num_devices=1)
  assert config_lib.router_settings(config).capacity_k(4) == 1.0


@pytest.mark.slow
def test_null_experts_train_under_a_budget_and_the_null_weight_moves(tmp_path):
  trainer, last = trained_under_a_budget('null_experts', str(tmp_path))
  assert np.isfinite(last['loss']) and 'moe/layer_1/null_weight' in last
  assert float(trainer.state.moe_controls['layer_1']) != pytest.approx(1.0)


@pytest.mark.parametrize('impl', ['sort', 'einsum', 'ragged'])
def test_every_dispatch_path_computes_what_every_expert_on_every_token_does(impl):
  assert_dispatch_equals_every_expert_on_every_token(routers.NullExperts(k=K, num_null=N), impl,
                                                     D, E)
