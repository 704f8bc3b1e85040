"""dynmoe_jax.routers: the registry is the only place that knows router names."""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import layers, routers
from tests.conftest import ROOT

E, D, F = 4, 8, 16


def test_every_router_creates_exactly_its_router_params():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, D))
  # every option that adds a router parameter on, so that all of them are created
  options = {'top_any': {'top_any_learned_scale': True}}
  for name, spec in routers.REGISTRY.items():
    moe = layers.MoE(num_experts=E, hidden_dim=F, router=name, **options.get(name, {}))
    importance = jnp.ones((2, 5)) if spec.needs_token_importance else None
    params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x, token_importance=importance)
                           ['params'])
    assert set(params) == set(spec.router_params) | {'wi', 'wo'}, name
    assert all(routers.is_router_param(p) for p in spec.router_params)


def test_capacity_rules():
  settings = lambda **kw: layers.MoE(num_experts=E, hidden_dim=F, **kw)
  # expert choice: each expert takes ceil(k * T / E) tokens, whatever the capacity factor
  assert routers.capacity(settings(router='expert_choice', k=2), 64, E, True) == 32
  # dynamic routers size for expected_k, defaulting to k (DA-MoE: its max_k)
  base = routers.capacity(settings(router='top_any', k=2), 64, E, True)
  assert routers.capacity(settings(router='top_any', k=2, expected_k=1.0), 64, E, True) < base
  assert routers.capacity(settings(router='adaptive_k', k=2, max_k=4), 64, E, True) == \
      routers.capacity(settings(router='top_any', k=4), 64, E, True)
  assert routers.get('top_k').pairs_per_token(settings(router='top_k', k=3)) == 3
  assert routers.get('top_any').pairs_per_token(settings()) is None


def test_planned_capacity_replaces_the_rule_and_scales_with_tokens():
  moe = lambda **kw: layers.MoE(num_experts=E, hidden_dim=F, capacity_factor=2.0,
                                eval_capacity_factor=4.0, **kw)
  planned = moe(router='top_any', planned_capacity=(13, 64), capacity_multiple_of=1)
  assert routers.capacity(planned, 64, E, True) == 13      # the planned call: exactly
  assert routers.capacity(planned, 32, E, True) == 7       # a device's half: ceil(6.5)
  assert routers.capacity(planned, 64, E, False) == 26     # evaluation: x eval/train factor
  assert routers.capacity(planned, 5, E, True) == 2
  rounded = moe(router='top_k', planned_capacity=(13, 64))  # capacity_multiple_of 8
  assert routers.capacity(rounded, 64, E, True) == 16
  assert routers.capacity(rounded, 8, E, True) == 8         # never more than the tokens
  # Expert choice keeps its own capacity.
  fixed = moe(router='expert_choice', k=2, planned_capacity=(3, 64))
  assert routers.capacity(fixed, 64, E, True) == 32
  with pytest.raises(ValueError, match='planned_capacity must be'):
    moe(router='top_any', planned_capacity=(0, 64))._validate()


def test_checks_name_the_field():
  s = layers.MoE(num_experts=E, hidden_dim=F, router='top_k', k=9, max_k=7)
  assert routers.check(s, E) == [('k', 'must be <= the 4 experts'), ('max_k', 'must be in [1, 4]')]
  assert routers.check(layers.MoE(num_experts=E, hidden_dim=F, router='top_any', k=9), E) == []
  with pytest.raises(ValueError, match="router='top_q' is not one of"):
    routers.get('top_q')


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
      if not name.endswith('.py') or path.endswith(os.path.join('dynmoe_jax', 'routers.py')):
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
  return params, jax.grad(loss)(params)


def norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(tree))))


NO_AUX = dict(load_balance_weight=0.0, z_loss_weight=0.0, entropy_weight=0.0,
              diversity_weight=0.0, simplicity_weight=0.0, efficiency_weight=0.0)
# Settings under which every token gets a single expert, for each router that can give one.
SINGLE_EXPERT = {
    'top_k': dict(k=1),
    'top_p': dict(p=1e-3),
    'adaptive_k': dict(k=1, max_k=1),
    'top_any': dict(top_any_train_fallback=True),  # thresholds set so that none passes
}


def test_top_1_trains_its_router_from_the_task_as_switch_does():
  # Switch multiplies by the raw probability: renormalising one expert's weight gives
  # p / p = 1 and the router almost no task gradient.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, D))  # T=48, E=4
  default = layers.MoE(num_experts=E, hidden_dim=F, router='top_k', k=1, capacity_factor=8.0,
                       **NO_AUX)
  params, raw = task_gradients(default.clone(normalize_top_k=False), x)
  _, default = task_gradients(default, x, params=params)
  raw_norm, default_norm = norm(raw['router_kernel']), norm(default['router_kernel'])
  assert raw_norm > 1.0
  assert default_norm > raw_norm / 10, (default_norm, raw_norm)


@pytest.mark.parametrize('router', sorted(SINGLE_EXPERT))
def test_a_token_given_one_expert_still_sends_the_task_gradient_to_its_router(router):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, D))
  spec = routers.get(router)
  importance = jnp.zeros((3, 16)) if spec.needs_token_importance else None
  moe = layers.MoE(num_experts=E, hidden_dim=F, router=router, capacity_factor=8.0,
                   **{**NO_AUX, **SINGLE_EXPERT[router]})
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
