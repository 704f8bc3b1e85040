"""The MoE linen module: oracle, gradients, static shapes, dtypes, errors."""
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynmoe_jax import capacity, layers, routers, sharding
from dynmoe_jax.capacity import Capacity

B, S, D, F, E = 2, 12, 16, 24, 6
ROUTERS = ['top_any', 'top_k', 'top_p', 'adaptive_k', 'expert_choice']


def make_inputs(seed=0, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(B, S, D), dtype)
  importance = jnp.asarray(rng.rand(B, S), jnp.float32)
  return x, importance


ROOMY = Capacity(factor=8.0, eval_factor=8.0)


def build(router, impl='sort', capacity=ROOMY, **kw):
  """router: a name or a settings object (routers.TopK(k=1), ...)."""
  return layers.MoE(num_experts=E, hidden_dim=F, router=router, capacity=capacity,
                    dispatch_impl=impl, **kw)


def init_apply(moe, x, importance, training=True, seed=0):
  imp = importance if moe.router == 'adaptive_k' else None
  variables = moe.init(jax.random.PRNGKey(seed), x, training=False, token_importance=imp)
  y, aux = moe.apply(variables, x, training=training, token_importance=imp)
  return variables, y, aux


def loop_oracle(params, x, weights, activation=nn.gelu):
  """Every expert as its own dense FFN in a Python loop, weighted by the router."""
  tokens = np.asarray(x).reshape(-1, D)
  out = np.zeros_like(tokens)
  for e in range(E):
    h = activation(tokens @ params['wi'][e])
    out += np.asarray(weights)[:, e:e + 1] * np.asarray(h @ params['wo'][e])
  return out.reshape(x.shape)


class MoELayerTest(parameterized.TestCase):

  @parameterized.product(router=ROUTERS, training=[True, False])
  def test_output_shape_metrics_and_oracle(self, router, training):
    x, importance = make_inputs()
    moe = build(router)
    variables, y, aux = init_apply(moe, x, importance, training)
    chex.assert_shape(y, x.shape)
    chex.assert_tree_all_finite((y, aux))
    chex.assert_shape(aux.metrics['expert_load'], (E,))
    chex.assert_shape(aux.record.unrouted_input_sum, (D,))
    assert float(aux.metrics['dropped_fraction']) == 0.0
    # recompute the router weights outside the layer and compare with the loop oracle
    params = nn.meta.unbox(variables['params'])
    route = _route_like_layer(moe, params, x, importance, training)
    np.testing.assert_allclose(y, loop_oracle(params, x, route.weights), atol=2e-5, rtol=1e-4)
    assert float(aux.metrics['active_experts']) == pytest.approx(
        float(route.num_active.mean()), rel=1e-6)
    imp = importance if router == 'adaptive_k' else None
    _, state = moe.apply(variables, x, training=training, token_importance=imp,
                         mutable=['intermediates'])
    per_token = state['intermediates']['active_experts_per_token']
    np.testing.assert_array_equal(per_token, np.asarray(route.mask).sum(-1).reshape(B, S))

  @parameterized.product(router=ROUTERS)
  def test_dispatch_impls_agree_without_drops(self, router):
    x, importance = make_inputs(1)
    outs = {}
    for impl in layers.DISPATCH_IMPLS:
      # the expert-parallel path needs a mesh; a one-device mesh runs it here
      # (8-device meshes: tests/test_sharding.py)
      mesh = sharding.make_mesh(data=1, expert=1, devices=jax.devices()[:1])
      moe = build(router, impl)
      imp = importance if router == 'adaptive_k' else None

      @jax.jit  # eager ops under a mesh are slow; one compiled function per impl
      def forward_and_grad(variables):
        loss = lambda v: jnp.sum(moe.apply(v, x, training=True, token_importance=imp)[0] ** 2)
        return moe.apply(variables, x, training=True, token_importance=imp)[0], jax.grad(loss)(
            variables)

      variables = moe.init(jax.random.PRNGKey(0), x, training=False, token_importance=imp)
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        outs[impl] = forward_and_grad(variables)
    for impl in layers.DISPATCH_IMPLS[1:]:
      chex.assert_trees_all_close(outs[impl], outs['sort'], atol=1e-4, rtol=1e-4)

  def test_top_any_zero_expert_tokens_get_zero_output_in_training(self):
    x, importance = make_inputs(2)
    moe = build('top_any')
    variables = moe.init(jax.random.PRNGKey(0), x)
    # thresholds so high that no token activates any expert
    params = nn.meta.unbox(variables['params'])
    params = {**params, 'thresholds': jnp.full((E,), 5.0)}
    y, aux = moe.apply({'params': params}, x, training=True)
    np.testing.assert_array_equal(y, np.zeros_like(y))
    assert float(aux.metrics['unrouted_fraction']) == 1.0
    assert int(aux.record.unrouted_count) == B * S
    np.testing.assert_allclose(aux.record.unrouted_input_sum, x.reshape(-1, D).sum(0), rtol=1e-5)
    y_eval, aux_eval = moe.apply({'params': params}, x, training=False)
    assert float(aux_eval.metrics['active_experts']) == 1.0  # top-1 fallback
    assert float(jnp.abs(y_eval).sum()) > 0

  def test_top_any_train_fallback_keeps_a_layer_alive_and_its_gradient(self):
    # All scores below all thresholds: without the fallback no token is routed and no
    # task gradient reaches the router (the collapse of README "The default LM"); with
    # it each token takes its top-1 expert at weight 1, the gradient reaches the gate
    # embeddings, and the record still counts the tokens as unrouted.
    x, _ = make_inputs(4)
    moe = lambda **kw: build(routers.TopAny(diversity_weight=0.0, simplicity_weight=0.0,
                                            load_balance_weight=0.0, efficiency_weight=0.0,
                                            **kw))
    variables = moe().init(jax.random.PRNGKey(0), x)
    params = {**nn.meta.unbox(variables['params']), 'thresholds': jnp.full((E,), 5.0)}

    def task_loss(p, module):
      y, aux = module.apply({'params': p}, x, training=True)
      return jnp.sum(y ** 2), aux

    grad_fn = jax.jit(jax.value_and_grad(task_loss, has_aux=True), static_argnums=1)
    (_, aux), grads = grad_fn(params, moe())
    assert not np.any(grads['gate_embeddings']) and float(aux.metrics['active_experts']) == 0
    fallback = moe(train_fallback=True)
    (_, aux), grads = grad_fn(params, fallback)
    assert np.abs(grads['gate_embeddings']).max() > 1e-6
    assert float(aux.metrics['active_experts']) == 1.0
    assert float(aux.metrics['unrouted_fraction']) == 1.0
    assert int(aux.record.unrouted_count) == B * S
    # training with the fallback = evaluation's output for these tokens
    y_train, _ = fallback.apply({'params': params}, x, training=True)
    y_eval, _ = moe().apply({'params': params}, x, training=False)
    np.testing.assert_allclose(y_train, y_eval, rtol=1e-6, atol=1e-6)

  def test_top_any_gshard_balance_weight_adds_its_term(self):
    x, _ = make_inputs(6)
    base = build('top_any')
    variables = base.init(jax.random.PRNGKey(0), x)
    _, aux = base.apply(variables, x, training=True)
    assert 'gshard_balance' not in aux.metrics  # weight 0 by default: not computed
    _, aux_g = build(routers.TopAny(gshard_balance_weight=0.5)).apply(variables, x,
                                                                     training=True)
    assert float(aux_g.metrics['gshard_balance']) > 0
    assert float(aux_g.loss) == pytest.approx(
        float(aux.loss) + 0.5 * float(aux_g.metrics['gshard_balance']), rel=1e-6)

  def test_top_any_learned_scale_starts_at_top_any_scale_and_is_capped(self):
    x, _ = make_inputs(5)
    fixed = lambda scale: build(routers.TopAny(scale=scale))
    learned = build(routers.TopAny(scale=10.0, learned_scale=True, max_scale=100.0))
    params = nn.meta.unbox(learned.init(jax.random.PRNGKey(0), x)['params'])
    assert float(params['log_scale']) == pytest.approx(np.log(10.0))
    params = {**params, 'thresholds': jnp.linspace(-0.2, 0.2, E)}
    without = {k: v for k, v in params.items() if k != 'log_scale'}

    def loss(p, module):
      y, aux = module.apply({'params': p}, x, training=True)
      return jnp.sum(y ** 2) + aux.loss

    # the same loss as a fixed scale of 10, and a gradient for the scale
    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    fixed_loss = jax.jit(loss, static_argnums=1)  # compared jitted with jitted
    value, grads = grad_fn(params, learned)
    assert float(value) == pytest.approx(float(fixed_loss(without, fixed(10.0))), rel=1e-6)
    assert abs(float(grads['log_scale'])) > 0
    # above the cap: the capped scale, and no gradient (as torch.clamp in the reference)
    high = {**params, 'log_scale': jnp.asarray(np.log(300.0), jnp.float32)}
    value, grads = grad_fn(high, learned)
    assert float(value) == pytest.approx(float(fixed_loss(without, fixed(100.0))), rel=1e-5)
    assert float(grads['log_scale']) == 0.0

  def test_gradients_match_finite_differences(self):
    x, _ = make_inputs(3)
    x = x[:, :4]
    for router, wrt in (('top_k', None), ('top_p', None), ('top_any', ('wi', 'wo'))):
      moe = build(router, activation='silu', glu=True, dtype=jnp.float64,
                  param_dtype=jnp.float64)
      with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        boxed = jax.jit(moe.init)(jax.random.PRNGKey(0), x64)['params']
        params = jax.tree.map(lambda a: a.astype(jnp.float64), nn.meta.unbox(boxed))
        fixed = {k: v for k, v in params.items() if wrt is not None and k not in wrt}
        free = {k: v for k, v in params.items() if k not in fixed}

        def loss(free, x):
          y, aux = moe.apply({'params': {**free, **fixed}}, x, training=True)
          return jnp.sum(jnp.sin(y)) + aux.loss

        # top-any's gradient w.r.t. router inputs is straight-through by design
        # (tested in test_routing), so there only expert params are checked.
        args = (free, x64) if wrt is None else (free,)
        fn = jax.jit(loss if wrt is None else (lambda free: loss(free, x64)))
        jax.test_util.check_grads(fn, args, order=1, modes=['rev'], eps=1e-6,
                                  atol=1e-5, rtol=1e-5)

  def test_one_compilation_for_different_routing_patterns(self):
    moe = build('top_any', capacity=Capacity(factor=1.0))
    x, _ = make_inputs()
    variables = moe.init(jax.random.PRNGKey(0), x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(v, x):
      y, aux = moe.apply(v, x, training=True)
      return y, aux.metrics['active_experts']

    actives = set()
    for seed in range(4):  # very different routing patterns, same shapes
      xs = make_inputs(seed)[0] * (1.0 + 3 * seed) + seed
      actives.add(round(float(step(variables, xs)[1]), 4))
    assert len(actives) > 1

  @parameterized.parameters('top_any', 'top_k')
  def test_bf16(self, router):
    x, importance = make_inputs(4)
    moe32 = build(router)
    moe16 = build(router, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables = moe32.init(jax.random.PRNGKey(0), x)
    y32, _ = moe32.apply(variables, x, training=True)
    v16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nn.meta.unbox(variables))
    y16, aux16 = moe16.apply(v16, x.astype(jnp.bfloat16), training=True)
    assert y16.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y16)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.1)

  def test_small_capacity_reports_drops(self):
    x, _ = make_inputs(5)
    small = Capacity(factor=0.25, multiple_of=1)
    _, _, aux = init_apply(build(routers.TopK(k=2), capacity=small),
                           x, None)
    assert 0.0 < float(aux.metrics['dropped_fraction']) < 1.0

  def test_logical_axis_names_on_every_param(self):
    x, _ = make_inputs()
    for router in ('top_any', 'top_k'):
      variables = build(router, glu=True).init(jax.random.PRNGKey(0), x)
      boxes = jax.tree.leaves(variables['params'],
                              is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
      assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
      for b in boxes:
        assert 'expert' in b.names and len(b.names) == b.value.ndim

  @parameterized.named_parameters(
      ('k_too_large', lambda: build(routers.TopK(k=7)), 'k=7'),
      ('bad_p', lambda: build(routers.TopP(p=1.5)), 'p=1.5'),
      ('zero_p', lambda: build(routers.TopP(p=0.0)), 'p=0.0'),
      ('bad_capacity', lambda: build('top_k', capacity=Capacity(factor=0.0)), 'factor=0.0'),
      ('bad_eval_capacity', lambda: build('top_k', capacity=Capacity(eval_factor=-1.0)),
       'eval_factor=-1.0'),
      ('unknown_router', lambda: build('top_q'), "router='top_q'"),
      ('unknown_dispatch', lambda: build('top_k', impl='scatter'), "dispatch_impl='scatter'"),
      ('bad_activation', lambda: build('top_k', activation='tanhh'), 'activation'),
      ('bad_max_k', lambda: build(routers.TopP(max_k=0)), 'max_k=0'),
  )
  def test_bad_config_errors(self, make, message):
    x, _ = make_inputs()
    with pytest.raises(ValueError, match=message):
      make().init(jax.random.PRNGKey(0), x)

  def test_wrong_last_dimension(self):
    x, _ = make_inputs()
    moe = build('top_k')
    variables = moe.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match='last dimension 8'):
      moe.apply(variables, x[..., :8])

  def test_adaptive_k_requires_importance(self):
    x, _ = make_inputs()
    with pytest.raises(ValueError, match='token_importance'):
      build('adaptive_k').init(jax.random.PRNGKey(0), x)


def _route_like_layer(moe, params, x, importance, training):
  from dynmoe_jax import routing
  tokens = x.reshape(-1, D)
  settings = moe.settings
  if settings.name == 'top_any':
    return routing.top_any(tokens, params['gate_embeddings'], params['thresholds'],
                           training=training)
  logits = tokens @ params['router_kernel']
  if settings.name == 'top_k':
    return routing.top_k(logits, settings.k)
  if settings.name == 'top_p':
    return routing.top_p(logits, settings.p)
  if settings.name == 'adaptive_k':
    k = routing.importance_to_k(importance, settings.max_k).reshape(-1)
    return routing.adaptive_k(logits, k, settings.max_k)
  return routing.expert_choice(logits, capacity.expert_choice_slots(B * S, E, settings.k))


@pytest.mark.parametrize('impl', ['sort', 'ragged', 'all_experts_reference'])
def test_flops_follow_the_rows_each_path_computes(impl):
  x, importance = make_inputs(4)
  moe = build(routers.TopK(k=2), impl, capacity=Capacity(factor=1.0, multiple_of=8))
  rows = {'sort': E * moe.slots_per_expert(B * S, training=True), 'ragged': B * S * 2,
          'all_experts_reference': E * B * S}[impl]
  _, _, aux = init_apply(moe, x, importance)
  per_row = 2 * D * F * 2  # wi and wo
  assert float(aux.rows) == rows
  np.testing.assert_allclose(aux.metrics['activated_flops_per_token'], 2 * per_row)
  np.testing.assert_allclose(aux.metrics['computed_flops_per_token'], rows * per_row / (B * S),
                             rtol=1e-6)
  kept = B * S * 2 * (1 - float(aux.metrics['dropped_fraction']))
  np.testing.assert_allclose(aux.metrics['slot_utilization'], kept / rows, rtol=1e-6)


def test_top_any_max_k_bounds_the_ragged_pair_list():
  x, importance = make_inputs(5)
  unbounded = build('top_any', 'ragged')
  _, _, aux = init_apply(unbounded, x, importance)
  assert float(aux.rows) == B * S * E
  bounded = build(routers.TopAny(max_k=2), 'ragged')
  variables = bounded.init(jax.random.PRNGKey(0), x)
  (_, aux), state = bounded.apply(variables, x, training=True, mutable=['intermediates'])
  assert float(aux.rows) == B * S * 2
  per_token = np.asarray(state['intermediates']['active_experts_per_token'])
  assert per_token.max() > 2  # the case needs tokens with more than max_k experts
  # every pair past a token's first two experts is dropped, and counted
  want = np.maximum(per_token - 2, 0).sum() / per_token.sum()
  assert float(aux.metrics['dropped_fraction']) == pytest.approx(want, rel=1e-6)


def test_an_explicit_capacity_is_taken_exactly_in_training_and_evaluation():
  moe = build(routers.TopK(k=2), capacity=Capacity(slots=3))  # the rule: a multiple of 8
  assert moe.slots_per_expert(B * S, training=True) == 3
  assert moe.slots_per_expert(B * S, training=False) == 3
  x, importance = make_inputs()
  _, _, aux = init_apply(moe, x, importance)
  assert float(aux.metrics['capacity']) == 3.0
  assert float(aux.metrics['dropped_fraction']) > 0  # 3 slots for B*S*2 / E pairs each


@pytest.mark.parametrize('kw,message', [
    (dict(slots=0), 'Capacity.slots=0 must be an int >= 1'),
    (dict(slots=2.5), 'Capacity.slots=2.5 must be an int >= 1'),
    (dict(slots=4, planned=(16, 64)), 're-plans the slots per expert that slots=4 fixes'),
])
def test_a_bad_explicit_capacity_is_one_line(kw, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    Capacity(**kw)


@pytest.mark.parametrize('router,slots', [
    (routers.TopK(k=2, priority='batch'), 2),  # overflow in every group
    (routers.TopK(k=1, priority='gshard'), 1),
    (routers.ExpertChoice(k=2), None),
    (routers.TopAny(), 2),
])
def test_routing_per_group_equals_routing_each_group_alone(router, slots):
  groups, group_size = 4, 6
  x = jax.random.normal(jax.random.PRNGKey(0), (groups, group_size, D))
  grouped = layers.MoE(num_experts=E, hidden_dim=F, router=router,
                       capacity=Capacity(slots=slots, group_size=group_size))
  alone = grouped.clone(capacity=Capacity(slots=slots))
  variables = grouped.init(jax.random.PRNGKey(1), x)
  y, aux = grouped.apply(variables, x, training=True)
  each = [alone.apply(variables, x[g], training=True) for g in range(groups)]
  np.testing.assert_allclose(y, jnp.stack([out for out, _ in each]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux.loss, np.mean([a.loss for _, a in each]), rtol=1e-5)
  dropped = sum(float(a.metrics['dropped_fraction']) * float(a.record.tokens_per_expert.sum())
                for _, a in each)
  assert float(aux.metrics['dropped_fraction']) * float(aux.record.tokens_per_expert.sum()) \
      == pytest.approx(dropped)
  assert float(aux.metrics['capacity']) == groups * float(each[0][1].metrics['capacity'])


def test_routing_groups_must_divide_the_tokens():
  moe = layers.MoE(num_experts=E, hidden_dim=F, capacity=Capacity(group_size=5))
  with pytest.raises(ValueError, match='24 tokens do not split into routing groups of '
                                       'capacity.group_size=5'):
    moe.init(jax.random.PRNGKey(0), jnp.zeros((4, 6, D)))
