"""dynmoe_jax.train.balance: loss-free load balancing (arXiv 2408.15664), its selection
bias in top-k and top-p, and the bias as checkpointed train state."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import config_lib, routing, train
from dynmoe_jax.train import balance as balance_lib
from dynmoe_jax.train import controls as controls_lib
from tests.conftest import killed_and_resumed, load_config

T, E = 40, 5


def case(seed=0):
  rng = np.random.RandomState(seed)
  return rng.randn(T, E).astype(np.float32), rng.uniform(-0.3, 0.3, E).astype(np.float32)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_the_bias_chooses_the_experts_and_the_probabilities_weigh_them():
  logits, bias = case()
  probs = softmax(logits)
  out = routing.top_k(jnp.asarray(logits), 2, selection_bias=jnp.asarray(bias))
  chosen = np.argsort(-(probs + bias), axis=-1, kind='stable')[:, :2]
  mask = np.zeros_like(probs, bool)
  np.put_along_axis(mask, chosen, True, axis=-1)
  np.testing.assert_array_equal(out.mask, mask)
  kept = np.where(mask, probs, 0)
  np.testing.assert_allclose(out.weights, kept / (kept.sum(-1, keepdims=True) + 1e-6),
                             rtol=1e-5, atol=1e-7)
  plain = routing.top_k(jnp.asarray(logits), 2)
  assert (np.asarray(plain.mask) != mask).any()  # the case moves some choice
  # top-p: the biased order, the unbiased mass
  out = routing.top_p(jnp.asarray(logits), 0.5, selection_bias=jnp.asarray(bias))
  order = np.argsort(-(probs + bias), axis=-1, kind='stable')
  mass = np.take_along_axis(probs, order, -1)
  keep = (np.cumsum(mass, -1) - mass) <= 0.5
  keep[:, 0] = True
  want = np.zeros_like(mask)
  np.put_along_axis(want, order, keep, axis=-1)
  np.testing.assert_array_equal(out.mask, want)
  np.testing.assert_allclose(out.weights, np.where(want, probs, 0), rtol=1e-5, atol=1e-7)


def test_the_bias_moves_toward_balance_by_its_rate():
  balancer = balance_lib.Balancer(0.01, ('layer_1',), (4,))
  controls = balancer.initial_controls()
  np.testing.assert_array_equal(controls['layer_1/bias'], np.zeros(4))
  load = jnp.asarray([0.4, 0.1, 0.25, 0.25])
  new = balancer.update(controls, {'moe/layer_1/expert_load': load})
  np.testing.assert_allclose(new['layer_1/bias'], [-0.01, 0.01, 0.0, 0.0])
  assert balancer.layer_controls(new) == {'layer_1': {'bias': new['layer_1/bias']}}
  assert float(balancer.report(new)['moe/layer_1/bias_range']) == pytest.approx(0.02)


def test_config_turns_it_on_for_routers_that_select_by_score_only():
  config = load_config('tiny', 'top_k')
  config.balance.loss_free = True
  config_lib.validate(config, num_devices=1)
  controllers = controls_lib.from_config(config, (0, 4))
  assert set(controllers.initial_controls()) == {'layer_1/bias'}
  config.model.moe.router = 'top_any'
  with pytest.raises(config_lib.ConfigError, match=r"balance.loss_free=True is invalid: needs "
                                                   r"a router that selects by score"):
    config_lib.validate(config, num_devices=1)
  config = load_config('tiny', 'top_p')
  config.balance.loss_free = True
  config.budget.target_experts_per_token = 1.5  # both controllers at once
  config_lib.validate(config, num_devices=1)
  layer = controls_lib.from_config(config, (0, 4)).layer_controls(
      controls_lib.from_config(config, (0, 4)).initial_controls())['layer_1']
  assert set(layer) == {'p', 'bias'}
  config.balance.rate = 0.0
  with pytest.raises(config_lib.ConfigError, match='config.balance.rate=0.0 is invalid'):
    config_lib.validate(config, num_devices=1)


def test_adaptive_experts_resize_the_bias_with_the_experts():
  from dynmoe_jax import adaptive
  controls = {'layer_1/bias': np.asarray([0.1, -0.2, 0.3, 0.0], np.float32),
              'layer_3/bias': np.asarray([0.5, 0.5], np.float32), 'layer_1': np.float32(0.4)}
  plans = {('layer_1', 'moe'): adaptive.LayerPlan(keep=(0, 2), num_new=1, old_count=4),
           ('layer_3', 'moe'): adaptive.LayerPlan(keep=(0, 1), old_count=2)}
  out = balance_lib.resized(controls, plans)
  np.testing.assert_allclose(out['layer_1/bias'], [0.1, 0.3, 0.2])  # the new one: the mean
  assert out['layer_3/bias'] is controls['layer_3/bias'] and out['layer_1'] == 0.4
  config = load_config('tiny', 'top_k')
  config.balance.loss_free = True
  config.adaptive.enabled = True
  config.adaptive.every, config.adaptive.record_steps = 10, 4
  config.adaptive.compile_lead_steps = 3
  config_lib.validate(config, num_devices=1)  # the pair is accepted


@pytest.mark.slow
def test_the_bias_is_train_state_checkpointed_and_resumed_exactly(tmp_path):
  config = load_config('tiny', 'top_k')
  config.model.moe.top_k.load_balance_weight = 0.0  # the bias alone balances
  config.balance.loss_free = True
  config.balance.rate = 0.01
  straight = train.Trainer(config, str(tmp_path / 'straight'))
  straight.run()
  bias = np.asarray(straight.state.moe_controls['layer_1/bias'])
  assert np.abs(bias).max() > 0 and bias.shape == (4,)
  again, _ = killed_and_resumed(config, str(tmp_path / 'resumed'), kill_after=13)
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  import json
  rows = [json.loads(l) for l in open(tmp_path / 'straight' / 'metrics.jsonl')]
  train_rows = [r for r in rows if r['split'] == 'train']
  assert train_rows[-1]['moe/layer_1/load_ratio'] >= 1.0
  assert 'moe/layer_1/bias_range' in train_rows[-1]
