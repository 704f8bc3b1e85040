"""dynmoe_jax.train.budget: the compute-budget controller."""
import jax.numpy as jnp
import pytest

from dynmoe_jax import capacity, config_lib, routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.train import budget as budget_lib
from tests.conftest import load_config


def metrics(active, unrouted):
  return {'moe/layer_1/active_experts': jnp.asarray(active),
          'moe/layer_1/unrouted_fraction': jnp.asarray(unrouted)}


def test_the_weight_rises_above_the_target_and_falls_below_it():
  b = budget_lib.Budget(target=1.5, rate=2.0, control='efficiency', initial_weight=0.01,
                        layers=('layer_1',))
  controls = b.initial_controls()
  # 1.2 experts + 0.4 zero-expert tokens (1 each in evaluation) = 1.6 > 1.5: dearer
  assert float(b.update(controls, metrics(1.2, 0.4))['layer_1']) == pytest.approx(0.02)
  assert float(b.update(controls, metrics(1.2, 0.2))['layer_1']) == pytest.approx(0.005)
  high = {'layer_1': jnp.asarray(budget_lib.MAX_WEIGHT)}
  assert float(b.update(high, metrics(3.0, 0.0))['layer_1']) == budget_lib.MAX_WEIGHT
  assert b.layer_controls(controls) == {'layer_1': {'efficiency': controls['layer_1']}}
  assert b.metric == 'efficiency_weight'


def test_with_a_training_fallback_unrouted_tokens_are_not_counted_twice():
  config = load_config('tiny')
  config.budget.target_experts_per_token = 1.5
  assert budget_lib.from_config(config, (0, 4)).add_unrouted
  config.model.moe.top_any.train_fallback = True
  b = budget_lib.from_config(config, (0, 4))
  assert not b.add_unrouted
  # training's 1.4 already holds the fallback expert of its 0.4 unrouted tokens: < 1.5
  assert float(b.update(b.initial_controls(), metrics(1.4, 0.4))['layer_1']) < 0.01


def test_config_budget_is_off_by_default_and_sized_into_capacity():
  config = load_config('tiny')
  assert budget_lib.from_config(config, (0, 4)) is None
  config.budget.target_experts_per_token = 1.0
  b = budget_lib.from_config(config, (0, 4))
  assert (b.target, b.control, b.layers) == (1.0, 'efficiency', ('layer_1',))
  slots = lambda router: capacity.slots_per_expert(Capacity(), router, 64, 4, True)
  assert slots(config_lib.router_settings(config)) < slots(routers.TopAny())


def test_a_top_p_budget_adapts_p_the_other_way_and_keeps_it_in_range():
  config = load_config('tiny', 'top_p')
  config.budget.target_experts_per_token = 1.0
  config_lib.validate(config, num_devices=1)
  b = budget_lib.from_config(config, (0, 4))
  assert (b.control, b.raises_k, b.metric) == ('p', True, 'p')
  assert b.initial_weight == pytest.approx(config.model.moe.top_p.p)
  plain = budget_lib.Budget(target=1.5, rate=2.0, control='p', initial_weight=0.4,
                            layers=('layer_1',), raises_k=True)
  w = plain.initial_controls()
  # above the target p falls, below it rises; never past 1 or under the floor
  assert float(plain.update(w, metrics(2.0, 0.0))['layer_1']) == pytest.approx(0.2)
  assert float(plain.update(w, metrics(1.0, 0.0))['layer_1']) == pytest.approx(0.8)
  assert float(plain.update({'layer_1': jnp.asarray(0.8)}, metrics(1.0, 0.0))['layer_1']) == 1.0
  low = {'layer_1': jnp.asarray(budget_lib.MIN_P)}
  assert float(plain.update(low, metrics(3.0, 0.0))['layer_1']) == pytest.approx(budget_lib.MIN_P)
  assert plain.layer_controls(w) == {'layer_1': {'p': w['layer_1']}}
  slots = lambda router: capacity.slots_per_expert(Capacity(), router, 64, 4, True)
  assert slots(config_lib.router_settings(config)) < slots(routers.TopP())
  config.budget.two_sided = True
  with pytest.raises(config_lib.ConfigError, match='budget.two_sided=True is invalid: is for a '
                     "budget that prices experts .* adapts 'p'"):
    config_lib.validate(config, num_devices=1)


def test_a_budget_needs_a_router_that_takes_one():
  config = load_config('tiny', 'top_k')
  config.budget.target_experts_per_token = 1.5
  with pytest.raises(config_lib.ConfigError,
                     match="target_experts_per_token=1.5 is invalid: is for routers with a "
                           r"compute budget \(\['top_any', 'top_p'.*\]\), not 'top_k'"):
    config_lib.validate(config, num_devices=1)
  config = load_config('tiny')
  config.budget.target_experts_per_token = 5.0
  with pytest.raises(config_lib.ConfigError, match=r'target_experts_per_token=5.0 is invalid: must be <= the 4 experts of layer 1'):
    config_lib.validate(config, num_devices=1)


def test_two_sided_budget_turns_the_price_into_a_subsidy_and_back():
  b = budget_lib.Budget(target=1.5, rate=10.0, control='efficiency', initial_weight=1e-4,
                        layers=('layer_1',), two_sided=True)
  w = b.initial_controls()
  below, above = metrics(1.0, 0.0), metrics(2.0, 0.0)
  seen = []
  for _ in range(4):
    w = b.update(w, below)
    seen.append(float(w['layer_1']))
  # 1e-5, then 1e-6 (the floor), then the sign flips at the floor and the subsidy grows
  assert seen == pytest.approx([1e-5, 1e-6, -1e-6, -1e-5])
  for _ in range(3):
    w = b.update(w, above)
    seen.append(float(w['layer_1']))
  assert seen[-3:] == pytest.approx([-1e-6, 1e-6, 1e-5])
  one_sided = budget_lib.Budget(1.5, 10.0, 'efficiency', 1e-6, ('layer_1',))
  assert float(one_sided.update(one_sided.initial_controls(), below)['layer_1']) == \
      pytest.approx(budget_lib.MIN_WEIGHT)


def test_error_unit_scales_each_update_with_the_error():
  b = budget_lib.Budget(target=1.5, rate=2.0, control='efficiency', initial_weight=0.01,
                        layers=('layer_1',), error_unit=0.1)
  w = b.initial_controls()
  # 5% above: half a step (x 2**0.5); 20% below: two steps (/ 4); far off: capped at 5
  assert float(b.update(w, metrics(1.575, 0.0))['layer_1']) == pytest.approx(0.01 * 2 ** 0.5)
  assert float(b.update(w, metrics(1.2, 0.0))['layer_1']) == pytest.approx(0.01 / 4)
  assert float(b.update(w, metrics(6.0, 0.0))['layer_1']) == pytest.approx(0.01 * 2 ** 5)
  config = load_config('tiny')
  config.budget.target_experts_per_token = 1.5
  config.budget.error_unit = 0.1
  assert budget_lib.from_config(config, (0, 4)).error_unit == 0.1


def test_the_plain_rule_multiplies_by_the_python_float_rates():
  # bit for bit what the rule computed before error_unit existed: x 1.05 and x (1 / 1.05)
  # rounded once from float64, not 1 / 1.05 rounded in float32
  b = budget_lib.Budget(target=1.5, rate=1.05, control='efficiency', initial_weight=0.01,
                        layers=('layer_1',))
  w = b.initial_controls()['layer_1']
  for experts in (2.0, 1.0, 1.0, 2.0, 1.0):
    expected = w * (1.05 if experts > 1.5 else 1.0 / 1.05)
    w = b.update({'layer_1': w}, metrics(experts, 0.0))['layer_1']
    assert float(w) == float(expected)


def test_horizon_acts_on_the_count_predicted_from_its_smoothed_trend():
  b = budget_lib.Budget(target=1.5, rate=2.0, control='efficiency', initial_weight=0.01,
                        layers=('layer_1',), horizon=10.0)
  controls = b.initial_controls()
  key = budget_lib.count_key('layer_1')
  assert float(controls[key]) == -1.0  # no count seen yet
  # the first update has no trend: the count now decides (3 > 1.5: dearer), smoothing starts
  controls = b.update(controls, metrics(3.0, 0.0))
  assert float(controls['layer_1']) == pytest.approx(0.02)
  assert float(controls[key]) == pytest.approx(3.0)
  # 2.0, still above the target, but falling: smoothed 0.9·3 + 0.1·2 = 2.9, trend -0.1,
  # predicted 2.0 + 10·(-0.1) = 1.0 < 1.5, so the price falls before the count gets there
  controls = b.update(controls, metrics(2.0, 0.0))
  assert float(controls[key]) == pytest.approx(2.9)
  assert float(controls['layer_1']) == pytest.approx(0.01)
  # without a horizon the same counts raise the price twice
  plain = budget_lib.Budget(1.5, 2.0, 'efficiency', 0.01, ('layer_1',))
  w = plain.initial_controls()
  for count in (3.0, 2.0):
    w = plain.update(w, metrics(count, 0.0))
  assert float(w['layer_1']) == pytest.approx(0.04) and set(w) == {'layer_1'}
  # with error_unit the predicted error sets the step: (1.0 - 1.5) / 1.5 = 1/3 -> 3.33 steps
  scaled = budget_lib.Budget(1.5, 2.0, 'efficiency', 0.01, ('layer_1',), error_unit=0.1,
                             horizon=10.0)
  w = scaled.update(scaled.initial_controls(), metrics(3.0, 0.0))
  w = scaled.update(w, metrics(2.0, 0.0))
  assert float(w['layer_1']) == pytest.approx(0.01 * 2 ** 5 / 2 ** (10 / 3), rel=1e-5)
  config = load_config('tiny')
  config.budget.target_experts_per_token = 1.5
  config.budget.horizon = -1.0
  with pytest.raises(config_lib.ConfigError, match=r'budget.horizon=-1.0 is invalid: must be '
                                                   r'a number >= 0 \(0 or None: off\)'):
    config_lib.validate(config, num_devices=1)


def test_the_default_controller_scales_with_the_error_and_looks_ahead_and_0_turns_off():
  config = load_config('tiny')
  config.budget.target_experts_per_token = 1.5
  b = budget_lib.from_config(config, (0, 4))
  assert (b.error_unit, b.horizon) == (0.1, 20.0)
  assert budget_lib.count_key('layer_1') in b.initial_controls()
  # 0 (what the command line can say) and None (a Python config) give ReMoE's plain rule
  # with the first controller's state: the weights alone
  for off in (0, None):
    config.budget.error_unit = config.budget.horizon = off
    config_lib.validate(config, num_devices=1)
    b = budget_lib.from_config(config, (0, 4))
    assert (b.error_unit, b.horizon) == (None, None)
    assert set(b.initial_controls()) == {'layer_1'}
