"""dynmoe_jax.routers.dtop_p and train.pi_budget: DTop-p (arXiv 2512.13996), top-p over
normalised logits whose shared threshold a proportional-integral controller sets, against
numpy references of the normalisation and of the controller."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import config_lib, layers, names, routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.routers import dtop_p
from dynmoe_jax.train import budget as budget_lib
from dynmoe_jax.train import pi_budget
from tests.conftest import (assert_dispatch_equals_every_expert_on_every_token, load_config,
                            squared_output_grads, trained_under_a_budget)

T, D, E = 24, 8, 6


def reference_top_p(logits, p):
  """Experts in descending probability until the mass before each reaches p (top-1 kept)."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  mask = np.zeros_like(probs, bool)
  for t, row in enumerate(probs):
    before = 0.0
    for e in np.argsort(-row, kind='stable'):
      if before <= p or before == 0.0:
        mask[t, e] = True
      before += row[e]
  return mask


def test_logits_are_standardised_per_token_and_scaled_by_the_layers_temperature():
  logits = np.random.RandomState(0).randn(T, E).astype(np.float32) * 3 + 1
  scale = 2.5
  got = dtop_p.normalized_logits(jnp.asarray(logits), jnp.asarray(scale))
  want = (logits - logits.mean(-1, keepdims=True)) / logits.std(-1, keepdims=True) * scale
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # a router kernel scaled up routes alike: the temperature alone sets the sharpness
  np.testing.assert_allclose(dtop_p.normalized_logits(jnp.asarray(logits * 7), scale), got,
                             rtol=1e-4, atol=1e-4)


def test_the_layer_routes_top_p_over_the_normalised_logits_and_learns_its_temperature():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, D))
  settings = routers.DTopP(p=0.5, initial_scale=1.5)
  moe = layers.MoE(num_experts=E, hidden_dim=16, router=settings,
                   capacity=Capacity(factor=8.0))
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x)['params'])
  assert params['logit_scale'].shape == () and float(params['logit_scale']) == 1.5
  _, state = moe.apply({'params': params}, x, training=True,
                       mutable=['intermediates'])
  logits = np.asarray(x.reshape(-1, D) @ params['router_kernel'])
  want = reference_top_p(np.asarray(dtop_p.normalized_logits(jnp.asarray(logits), 1.5)), 0.5)
  active = state['intermediates']['active_experts_per_token']
  np.testing.assert_array_equal(np.asarray(active).reshape(-1), want.sum(-1))
  grads = squared_output_grads(moe, params, x)
  assert abs(float(grads['logit_scale'])) > 1e-6  # the temperature trains from the task


def test_without_normalisation_it_is_top_p():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, T, D))
  moe = layers.MoE(num_experts=E, hidden_dim=16, router=routers.DTopP(normalize=False),
                   capacity=Capacity(factor=8.0))
  variables = moe.init(jax.random.PRNGKey(3), x)
  assert 'logit_scale' not in variables['params']
  y, _ = moe.apply(variables, x)
  y_top_p, _ = moe.clone(router=routers.TopP()).apply(variables, x)
  np.testing.assert_array_equal(y, y_top_p)


def test_bad_settings_name_their_field():
  with pytest.raises(ValueError, match='initial_scale'):
    routers.DTopP(initial_scale=0.0)
  config = load_config('tiny', 'top_any')
  config.budget.target_experts_per_token = 1.5
  config.budget.controller = 'pi'
  with pytest.raises(ValueError, match='budget.controller'):
    config_lib.validate(config)
  config = load_config('tiny', 'dtop_p')
  config.budget.controller = 'pid'
  with pytest.raises(ValueError, match='budget.controller'):
    config_lib.validate(config)


def reference_pi(counts, target, p0, kp, ki, lo=pi_budget.MIN_P, hi=1.0):
  """p after each step: p = clip(p0 + kp·e + ki·Σe), e = (target - mean count) / target,
  the sum frozen while p is held at a bound the error pushes it past."""
  integral, out = 0.0, []
  for count in counts:
    error = (target - np.mean(count)) / target
    raw = p0 + kp * error + ki * (integral + error)
    p = min(max(raw, lo), hi)
    if p == raw or np.sign(error) != np.sign(raw - p):
      integral += error
    out.append(p)
  return out


def test_the_pi_controller_shares_one_p_and_follows_the_reference():
  layers_ = ('layer_1', 'layer_3')
  b = pi_budget.PIBudget(target=1.5, initial=0.4, layers=layers_, kp=0.1, ki=0.05,
                         add_unrouted=False)
  counts = [(2.5, 2.1), (2.0, 1.8), (1.2, 1.0), (1.4, 1.5), (30.0, 30.0), (30.0, 30.0),
            (0.5, 0.5)]
  controls = b.initial_controls()
  got = []
  for count in counts:
    metrics = {names.metric_key(layer, 'active_experts'): jnp.float32(c)
               for layer, c in zip(layers_, count)}
    controls = b.update(controls, metrics)
    shared = b.layer_controls(controls)
    assert shared['layer_1']['p'] is shared['layer_3']['p']  # one threshold for every layer
    got.append(float(shared['layer_1']['p']))
  np.testing.assert_allclose(got, reference_pi(counts, 1.5, 0.4, 0.1, 0.05), rtol=1e-5)
  assert got[4] == pytest.approx(pi_budget.MIN_P)  # clipped ...
  assert got[6] > got[3]  # ... without winding up: it recovers at once
  assert set(b.report(controls)) == {'moe/layer_1/p', 'moe/layer_3/p'}


def test_config_builds_the_pi_controller_for_dtop_p():
  config = load_config('tiny', 'dtop_p')
  config.budget.target_experts_per_token = 1.5
  config.budget.controller = 'pi'
  config_lib.validate(config)
  assert budget_lib.from_config(config, (0, 4)) is None  # the per-layer one stays off
  b = pi_budget.from_config(config, (0, 4))
  assert isinstance(b, pi_budget.PIBudget)
  assert (b.initial, b.kp, b.ki) == (config.model.moe.dtop_p.p, config.budget.kp,
                                     config.budget.ki)
  assert config_lib.router_settings(config).expected_k == 1.5


@pytest.mark.slow
def test_dtop_p_trains_under_a_pi_budget_and_p_moves(tmp_path):
  trainer, last = trained_under_a_budget('dtop_p', str(tmp_path), controller='pi')
  assert np.isfinite(last['loss'])
  shared = {v for k, v in last.items() if k.startswith('moe/') and k.endswith('/p')}
  assert len(shared) == 1  # every layer's p is the one threshold
  assert float(trainer.state.moe_controls[pi_budget.VALUE_KEY]) != pytest.approx(
      routers.DTopP().p)


@pytest.mark.parametrize('impl', ['sort', 'einsum', 'ragged'])
def test_every_dispatch_path_computes_what_every_expert_on_every_token_does(impl):
  assert_dispatch_equals_every_expert_on_every_token('dtop_p', impl, D, E)
