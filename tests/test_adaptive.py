"""Adaptive experts: plans, reallocation of params and optimizer state, trainer integration."""
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dynmoe_jax import adaptive, layers, routing, train
from tests.conftest import load_config

E, D, F, T = 4, 8, 16, 64


def init_moe(router='top_any', num_experts=E, **kw):
  moe = layers.MoE(num_experts=num_experts, hidden_dim=F, router=router, capacity_factor=64.0,
                   eval_capacity_factor=64.0, **kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (T, D))
  boxed = moe.init(jax.random.PRNGKey(1), x)['params']
  return moe, x, boxed, nn.meta.unbox(boxed)


def record(tokens_per_expert, unrouted_count=0, unrouted_sum=None):
  return adaptive.RecordAccumulator(
      np.asarray(tokens_per_expert), unrouted_count,
      np.zeros(D) if unrouted_sum is None else np.asarray(unrouted_sum, np.float64), 1)


def make_plan(moe, boxed, params, rec, **kw):
  axes = adaptive.expert_axes(boxed)
  moe_axes = {k[-1]: v for k, v in axes.items()}
  kw = {'min_experts': 1, 'max_experts': 8, 'new_expert_init': 'fresh', **kw}
  layer = adaptive.plan_layer(rec, jax.device_get(params), moe_axes, router=moe.router,
                              kernel_init=moe.kernel_init, rng=jax.random.PRNGKey(2), **kw)
  return adaptive.ResizePlan({(): layer}, {k: v for k, v in axes.items()}), layer


def test_expert_axes_come_from_logical_names():
  _, _, boxed, _ = init_moe(glu=True)
  assert adaptive.expert_axes(boxed) == {('gate_embeddings',): 0, ('thresholds',): 0,
                                         ('wi',): 0, ('wi_gate',): 0, ('wo',): 0}
  _, _, boxed, _ = init_moe('top_k')
  assert adaptive.expert_axes(boxed)[('router_kernel',)] == 1


def test_plan_removes_unused_and_adds_from_unrouted_inputs():
  moe, _, boxed, params = init_moe()
  unrouted = np.arange(D, dtype=np.float64) - 2.0
  _, layer = make_plan(moe, boxed, params, record([5, 0, 3, 0], 7, unrouted))
  assert layer.keep == (0, 2) and layer.removed == (1, 3) and layer.num_new == 1
  np.testing.assert_allclose(layer.new_params['gate_embeddings'][0],
                             unrouted / np.linalg.norm(unrouted), rtol=1e-6)
  np.testing.assert_array_equal(layer.new_params['thresholds'], [0.0])
  assert layer.new_params['wi'].shape == (1, D, F) and layer.new_params['wo'].shape == (1, F, D)


def test_plan_respects_min_and_max():
  moe, _, boxed, params = init_moe()
  _, layer = make_plan(moe, boxed, params, record([0, 0, 0, 9]), min_experts=3)
  assert layer.new_count == 3 and layer.keep == (0, 1, 3)
  _, layer = make_plan(moe, boxed, params, record([1, 1, 1, 1], 4, np.ones(D)), max_experts=4)
  assert layer.is_noop


def test_planned_layout_is_the_layout_the_plan_gives():
  # The trainer compiles planned_layout's shapes before plan_layer runs at the boundary.
  moe, _, boxed, params = init_moe()
  records = {'layer_1': record([5, 0, 3, 0], 7, np.ones(D)), 'layer_3': record([0, 0, 0, 9]),
             'layer_5': record([1, 1, 1, 1], 4, np.ones(D))}
  kw = dict(min_experts=3, max_experts=4)
  got = adaptive.planned_layout((0, 4, 0, 4, 0, 4), records, **kw)
  want = [0, 4, 0, 4, 0, 4]
  for name, rec in records.items():
    want[int(name[-1])] = make_plan(moe, boxed, params, rec, **kw)[1].new_count
  assert got == tuple(want) == (0, 3, 0, 3, 0, 4)
  empty = adaptive.RecordAccumulator.empty(4, D)  # a layer that recorded nothing keeps its count
  assert adaptive.planned_layout((0, 4), {'layer_1': empty}, **kw) == (0, 4)


def test_noop_plan_gives_identical_trees():
  moe, _, boxed, params = init_moe()
  opt_state = optax.adamw(1e-3).init(params)
  plan, layer = make_plan(moe, boxed, params, record([1, 2, 3, 4]))
  assert layer.is_noop
  new_params, new_opt = adaptive.resize(params, opt_state, plan)
  chex.assert_trees_all_equal((new_params, new_opt), (params, opt_state))


@pytest.mark.parametrize('init', ['fresh', 'copy_nearest'])
def test_resize_keeps_values_and_moments_of_kept_experts(init):
  moe, x, boxed, params = init_moe()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  opt_state = tx.init(params)
  grads = jax.grad(lambda p: jnp.sum(moe.apply({'params': p}, x, training=True)[0] ** 2))(params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments
  plan, layer = make_plan(moe, boxed, params, record([3, 0, 2, 1], 5, np.ones(D)),
                          new_expert_init=init)
  new_params, new_opt = adaptive.resize(params, opt_state, plan)
  keep = np.array(layer.keep)
  assert new_params['wi'].shape == (3 + 1 - 0, D, F)
  for name in ('wi', 'wo', 'gate_embeddings', 'thresholds'):
    np.testing.assert_array_equal(new_params[name][:3], np.asarray(params[name])[keep])
  adam = new_opt[1][0]
  old_adam = opt_state[1][0]
  for moments, old in ((adam.mu, old_adam.mu), (adam.nu, old_adam.nu)):
    np.testing.assert_array_equal(moments['wi'][:3], np.asarray(old['wi'])[keep])
    np.testing.assert_array_equal(moments['wi'][3], np.zeros((D, F)))
    assert float(jnp.abs(old['wi'][keep]).sum()) > 0
  assert int(adam.count) == int(old_adam.count)
  if init == 'copy_nearest':
    gates = np.asarray(params['gate_embeddings'])[keep]
    nearest = keep[np.argmax(gates @ np.ones(D) / np.linalg.norm(gates, axis=-1))]
    np.testing.assert_array_equal(new_params['wi'][3], np.asarray(params['wi'])[nearest])


def test_kept_experts_compute_what_they_computed_before():
  moe, x, boxed, params = init_moe()
  before, _ = moe.apply({'params': params}, x, training=True)
  plan, layer = make_plan(moe, boxed, params, record([3, 0, 2, 1], 5, -np.ones(D)))
  new_params, _ = adaptive.resize(params, (), plan)
  resized = layers.MoE(num_experts=layer.new_count, hidden_dim=F, router='top_any',
                       capacity_factor=64.0)
  after, _ = resized.apply({'params': new_params}, x, training=True)
  old_mask = np.asarray(routing.top_any(x, params['gate_embeddings'],
                                        params['thresholds']).mask)
  new_mask = np.asarray(routing.top_any(x, new_params['gate_embeddings'],
                                        new_params['thresholds']).mask)
  untouched = ~old_mask[:, list(layer.removed)].any(-1) & ~new_mask[:, -1]
  assert untouched.sum() > 5
  np.testing.assert_allclose(np.asarray(after)[untouched], np.asarray(before)[untouched],
                             atol=1e-6)
  np.testing.assert_array_equal(new_mask[:, :3], old_mask[:, list(layer.keep)])


def test_top_k_router_column_is_the_gate_embedding():
  moe, x, boxed, params = init_moe('top_k')
  plan, layer = make_plan(moe, boxed, params, record([3, 0, 2, 1], 4, np.ones(D)))
  new_params, _ = adaptive.resize(params, (), plan)
  assert new_params['router_kernel'].shape == (D, 4)
  np.testing.assert_array_equal(new_params['router_kernel'][:, :3],
                                np.asarray(params['router_kernel'])[:, [0, 2, 3]])
  column = np.asarray(new_params['router_kernel'][:, 3])
  np.testing.assert_allclose(column / np.linalg.norm(column), np.ones(D) / np.sqrt(D), rtol=1e-5)


def adaptive_tiny():
  config = load_config('tiny')
  config.num_train_steps = 30
  config.checkpoint_every = 9  # step 18 lies between the window and the boundary at 20
  config.adaptive.enabled = True
  config.adaptive.every = 10
  config.adaptive.record_steps = 4
  config.adaptive.compile_lead_steps = 3  # window 4-7, compile ahead during 8-9, boundary 10
  config.adaptive.min_experts = 2
  config.adaptive.max_experts = 6
  config.model.moe.num_experts = 2
  config.model.moe.top_any_scale = 4.0  # sharper gates: some tokens activate no expert
  return config


@pytest.mark.slow
def test_trainer_adapts_logs_and_resumes_exactly(tmp_path):
  config = adaptive_tiny()
  straight = train.Trainer(config, str(tmp_path / 'straight'))
  result = straight.run()
  events = [json.loads(l) for l in open(tmp_path / 'straight' / 'adaptation.jsonl')]
  assert events and {e['step'] for e in events} <= {10, 20}
  assert all(e['compiled_ahead'] for e in events)
  assert result['experts_per_layer'][1] == events[-1]['experts_after'] != 2
  assert os.path.exists(tmp_path / 'straight' / 'plots' / 'experts_per_layer.png')

  def crash(trainer, step):
    if step == 19:  # resumes from 18: records complete, the next layout not yet compiled
      raise RuntimeError('simulated kill')

  with pytest.raises(RuntimeError, match='simulated kill'):
    train.Trainer(config, str(tmp_path / 'resumed'), on_step=crash).run()
  again = train.Trainer(config, str(tmp_path / 'resumed'))
  again_result = again.run()
  assert again_result['experts_per_layer'] == result['experts_per_layer']
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  resumed_events = [json.loads(l) for l in open(tmp_path / 'resumed' / 'adaptation.jsonl')]
  strip = lambda es: [{k: v for k, v in e.items() if not k.endswith('seconds')} for e in es]
  assert strip(resumed_events) == strip(events)


@pytest.mark.slow
def test_a_plan_that_keeps_the_shapes_keeps_the_compiled_steps(tmp_path, caplog):
  # Removing one expert and adding one gives the same layout: nothing to compile, and
  # no warning about a layout that differs from the one compiled ahead.
  trainer = train.Trainer(adaptive_tiny(), str(tmp_path))
  trainer.restore_or_init()
  current = trainer.compiled
  boundary = trainer.boundary
  boundary._ahead = (current.layout, None)  # what compile-ahead records for unchanged shapes
  with caplog.at_level('WARNING'):
    compiled, waited, ahead = boundary._compiled_for(current.layout, current)
  assert compiled is current and (waited, ahead) == (0.0, True)
  assert boundary._ahead is None and not caplog.records
