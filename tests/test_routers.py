"""dynmoe_jax.routers: the registry is the only place that knows router names."""
import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import capacity, layers, routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.settings import SettingsError
from tests.conftest import ROOT

E, D, F = 4, 8, 16


def test_every_router_creates_exactly_its_router_params():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, D))
  # every option that adds a router parameter on, so that all of them are created
  options = {'top_any': routers.TopAny(learned_scale=True)}
  for name, spec in routers.REGISTRY.items():
    moe = layers.MoE(num_experts=E, hidden_dim=F, router=options.get(name, name))
    importance = jnp.ones((2, 5)) if spec.needs_token_importance else None
    params = jax.eval_shape(  # the names alone: traced, not run
        lambda: moe.init(jax.random.PRNGKey(1), x, token_importance=importance))['params']
    assert set(params) == set(spec.router_params) | {'wi', 'wo'}, name
    assert all(routers.is_router_param(p) for p in spec.router_params)


def slots(router, tokens=64, training=True, **capacity_fields):
  return capacity.slots_per_expert(Capacity(**capacity_fields), router, tokens, E, training)


def test_capacity_rules():
  # expert choice: each expert takes ceil(k * T / E) tokens, whatever the capacity factor
  assert slots(routers.ExpertChoice(k=2), factor=8.0) == 32
  # dynamic routers size for expected_k (DA-MoE: its max_k unless set)
  base = slots(routers.TopAny())
  assert slots(routers.TopAny(expected_k=1.0)) < base
  assert slots(routers.AdaptiveK(max_k=4)) == slots(routers.TopAny(expected_k=4.0))
  assert slots(routers.TopK(k=3)) == slots(routers.TopK(k=2, expected_k=3.0))
  assert routers.TopK(k=3).pairs_per_token() == 3
  assert routers.TopAny().pairs_per_token() is None
  assert slots(routers.TopK(k=1), slots=5) == 5  # explicit: as given, no rounding


def test_planned_capacity_replaces_the_rule_and_scales_with_tokens():
  planned = dict(factor=2.0, eval_factor=4.0, planned=(13, 64))
  top_any = routers.TopAny()
  assert slots(top_any, 64, multiple_of=1, **planned) == 13   # the planned call: exactly
  assert slots(top_any, 32, multiple_of=1, **planned) == 7    # a device's half: ceil(6.5)
  assert slots(top_any, 64, False, multiple_of=1, **planned) == 26  # evaluation: x eval/train
  assert slots(top_any, 5, multiple_of=1, **planned) == 2
  assert slots(routers.TopK(), 64, **planned) == 16           # rounded to multiple_of 8
  assert slots(routers.TopK(), 8, **planned) == 8             # never more than the tokens
  # Expert choice keeps its own capacity.
  assert slots(routers.ExpertChoice(k=2), 64, **planned) == 32
  with pytest.raises(SettingsError, match=r'Capacity.planned=\(0, 64\) must be'):
    Capacity(planned=(0, 64))


@pytest.mark.parametrize('make, message', [
    (lambda: routers.TopK(k=0), 'TopK.k=0 must be an int >= 1'),
    (lambda: routers.TopP(p=1.5), r'TopP.p=1.5 must be in \(0, 1\]'),
    (lambda: routers.TopAny(priority='fifo'), "TopAny.priority='fifo' must be one of"),
    (lambda: routers.TopAny(learned_scale=True, scale=200.0), 'TopAny.max_scale=100.0'),
    (lambda: routers.AdaptiveK(expected_k=-1.0), 'AdaptiveK.expected_k=-1.0 must be'),
    (lambda: routers.ExpertChoice(z_loss_weight=-1.0), 'ExpertChoice.z_loss_weight=-1.0'),
    (lambda: Capacity(factor=0.0), 'Capacity.factor=0.0 must be a number > 0'),
    (lambda: Capacity(slots=4, planned=(8, 64)), 'slots=4 fixes: set one'),
])
def test_settings_refuse_bad_values_when_built(make, message):
  with pytest.raises(SettingsError, match=message):
    make()


def test_checks_name_the_field():
  assert routers.check(routers.TopK(k=9), Capacity(), E) == [
      ('k', 'must be <= the 4 experts')]
  assert routers.check(routers.TopP(max_k=7), Capacity(), E) == [
      ('max_k', 'must be <= the 4 experts')]
  assert routers.check('expert_choice', Capacity(slots=3), E) == [
      ('capacity.slots', "is unused: router 'expert_choice' fixes its own capacity")]
  assert routers.check('top_any', Capacity(), E) == []
  with pytest.raises(ValueError, match="router='top_q' is not one of"):
    routers.get('top_q')
  with pytest.raises(ValueError, match=r'TopK.k=9 must be <= the 4 experts \(num_experts=4\)'):
    layers.MoE(E, F, router=routers.TopK(k=9)).init(jax.random.PRNGKey(0), jnp.ones((4, D)))


def test_a_router_name_means_its_default_settings():
  for name, spec in routers.REGISTRY.items():
    assert routers.resolve(name) == (spec, spec.settings())
    assert routers.resolve(spec.settings()) == (spec, spec.settings())
  with pytest.raises(ValueError, match='neither a router name'):
    routers.resolve(Capacity())


@pytest.mark.parametrize('router', ['top_any', 'top_k'])
def test_new_expert_router_params_point_at_the_direction(router):
  rng = np.random.RandomState(0)
  direction = rng.randn(D)
  direction /= np.linalg.norm(direction)
  kept = ({'gate_embeddings': rng.randn(E, D).astype(np.float32),
           'thresholds': np.zeros(E, np.float32)} if router == 'top_any'
          else {'router_kernel': rng.randn(D, E).astype(np.float32)})
  new = routers.new_expert_router_params(router, kept, direction, (0, 1))
  vector = new['gate_embeddings'][0] if router == 'top_any' else new['router_kernel'][:, 0]
  np.testing.assert_allclose(vector / np.linalg.norm(vector), direction, rtol=1e-5)
  for k, v in new.items():
    assert v.dtype == kept[k].dtype


ROUTER_NAME = re.compile(r"""(==|!=|\bin\s*\(|\bin\s*\[)[^\n]*'(top_any|top_k|top_p|adaptive_k|"""
                         r"""expert_choice)'""")


def test_no_module_outside_the_registry_switches_on_a_router_name():
  package = os.path.join(ROOT, 'dynmoe_jax')
  offenders = []
  for root, _, files in os.walk(package):
    for name in files:
      path = os.path.join(root, name)
      if not name.endswith('.py') or os.path.join('dynmoe_jax', 'routers') in path:
        continue
      for number, line in enumerate(open(path), 1):
        if ROUTER_NAME.search(line) or re.search(r"\brouter\s*(==|!=)", line):
          offenders.append(f'{os.path.relpath(path, ROOT)}:{number}: {line.strip()}')
  assert not offenders, '\n'.join(offenders)


def task_gradients(moe, x, importance=None, params=None):
  """Gradients of a task loss alone (every auxiliary loss weighted 0) w.r.t. the params."""
  if params is None:
    params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x, token_importance=importance)
                           ['params'])
  target = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(p):
    y, _ = moe.apply({'params': p}, x, training=True, token_importance=importance)
    return jnp.sum(y * target)
  return params, jax.jit(jax.grad(loss))(params)


def norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(tree))))


def no_aux(settings):
  """The settings with every auxiliary loss weighted 0."""
  return dataclasses.replace(settings, **{f.name: 0.0 for f in dataclasses.fields(settings)
                                          if f.name.endswith('_weight')})


# Settings under which every token gets a single expert, for each router that can give one.
SINGLE_EXPERT = {
    'top_k': routers.TopK(k=1),
    'top_p': routers.TopP(p=1e-3),
    'adaptive_k': routers.AdaptiveK(max_k=1),
    'top_any': routers.TopAny(train_fallback=True),  # thresholds set so that none passes
}


def test_top_1_trains_its_router_from_the_task_as_switch_does():
  # Switch multiplies by the raw probability: renormalising one expert's weight gives
  # p / p = 1 and the router almost no task gradient.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, D))  # T=48, E=4
  top_1 = no_aux(routers.TopK(k=1))
  default = layers.MoE(num_experts=E, hidden_dim=F, router=top_1, capacity=Capacity(factor=8.0))
  params, raw = task_gradients(
      default.clone(router=dataclasses.replace(top_1, normalize=False)), x)
  _, default = task_gradients(default, x, params=params)
  raw_norm, default_norm = norm(raw['router_kernel']), norm(default['router_kernel'])
  assert raw_norm > 1.0
  assert default_norm > raw_norm / 10, (default_norm, raw_norm)


@pytest.mark.parametrize('router', sorted(SINGLE_EXPERT))
def test_a_token_given_one_expert_still_sends_the_task_gradient_to_its_router(router):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, D))
  spec = routers.get(router)
  importance = jnp.zeros((3, 16)) if spec.needs_token_importance else None
  moe = layers.MoE(num_experts=E, hidden_dim=F, router=no_aux(SINGLE_EXPERT[router]),
                   capacity=Capacity(factor=8.0))
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x, token_importance=importance)
                         ['params'])
  if router == 'top_any':
    params = {**params, 'thresholds': jnp.full((E,), 5.0)}
  y, aux = moe.apply({'params': params}, x, training=True, token_importance=importance)
  assert float(aux.metrics['active_experts']) == 1.0, router
  _, grads = task_gradients(moe, x, importance, params)
  router_norm = norm({k: grads[k] for k in spec.router_params if k in grads})
  expert_norm = norm({k: grads[k] for k in ('wi', 'wo')})
  # measured with renormalised single-expert weights: 1e-5 of the experts' gradient
  assert router_norm > 1e-2 * expert_norm, (router, router_norm, expert_norm)
