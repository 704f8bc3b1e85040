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

from dynmoe_jax import adaptive, capacity, config_lib, layers, routers, routing, train
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.layout import Layout
from tests.conftest import killed_and_resumed, load_config, squared_output_grads

E, D, F, T = 4, 8, 16, 64


ROOMY = Capacity(factor=64.0, eval_factor=64.0)


def init_moe(router='top_any', num_experts=E, **kw):
  moe = layers.MoE(num_experts=num_experts, hidden_dim=F, router=router, capacity=ROOMY, **kw)
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
  layer = adaptive.plan_layer(rec, jax.device_get(params), moe_axes, router=moe.settings.name,
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
  got = adaptive.planned_layout(Layout((0, 4, 0, 4, 0, 4)), records, expert_bounds=(3, 4))
  want = [0, 4, 0, 4, 0, 4]
  for name, rec in records.items():
    want[int(name[-1])] = make_plan(moe, boxed, params, rec, **kw)[1].new_count
  assert got == Layout(tuple(want)) == Layout((0, 3, 0, 3, 0, 4))
  empty = adaptive.RecordAccumulator.empty(4, D)  # a layer that recorded nothing keeps its count
  assert adaptive.planned_layout(Layout((0, 4)), {'layer_1': empty},
                                 expert_bounds=(3, 4)) == Layout((0, 4))
  # Without expert bounds the experts stay, whatever the records say.
  assert adaptive.planned_layout(Layout((0, 4, 0, 4, 0, 4)), records) == Layout(
      (0, 4, 0, 4, 0, 4))


def window(loads, tokens=64):
  """A record of a window whose step s routed loads[s][e] pairs to expert e."""
  rec = adaptive.RecordAccumulator.empty(len(loads[0]), D)
  for step_loads in loads:
    rec.add(layers.RoutingRecord(np.asarray(step_loads), 0, np.zeros(D), 0, tokens))
  return rec


RULE = capacity.PlanRule(quantile=0.5, headroom=1.0, max_dropped=0.0, tolerance=0.0,
                         multiple_of=1)


def plan(rec, keep, rule, current):
  return capacity.plan_from_loads(rec.step_loads, rec.step_tokens, keep, rule, current)


def test_capacity_follows_the_busiest_expert_of_each_step():
  rec = window([[10, 3, 0, 1], [4, 12, 0, 0], [2, 2, 14, 0]])
  assert plan(rec, range(4), RULE, current=0) == (14, 64)
  # The median step's peak (12) with 1.5x headroom, rounded up to a multiple of 8.
  rule = capacity.PlanRule(0.5, 1.5, max_dropped=1.0, tolerance=0.0, multiple_of=8)
  assert plan(rec, range(4), rule, current=0) == (24, 64)
  # Only the experts that stay count: without expert 2, the busiest has 12.
  rule = capacity.PlanRule(1.0, 1.0, max_dropped=1.0, tolerance=0.0, multiple_of=1)
  assert plan(rec, (0, 1, 3), rule, current=0) == (12, 64)


def test_capacity_is_raised_until_drops_are_under_the_limit():
  # The median peak is 10, but 30 of the 60 pairs would be dropped at 10 slots.
  rec = window([[10, 0], [10, 0], [40, 0]])
  rule = capacity.PlanRule(0.5, 1.0, max_dropped=0.1, tolerance=0.0, multiple_of=2)
  slots, _ = plan(rec, range(2), rule, current=0)
  dropped = lambda c: sum(max(0, l - c) for l in (10, 10, 40)) / 60
  assert dropped(slots) <= 0.1 < dropped(slots - 2)
  # Never more than the tokens of a step (rounded up): an expert gets a token once.
  rule = capacity.PlanRule(1.0, 4.0, max_dropped=0.0, tolerance=0.0, multiple_of=8)
  assert plan(window([[60, 0]], tokens=60), range(2), rule, 0) == (64, 60)


def test_a_small_saving_keeps_the_current_capacity():
  rec = window([[30, 0]])
  rule = capacity.PlanRule(1.0, 1.0, max_dropped=0.0, tolerance=0.1, multiple_of=1)
  assert plan(rec, range(2), rule, current=32)[0] == 32  # 6% smaller
  assert plan(rec, range(2), rule, current=40)[0] == 30  # 25% smaller
  assert plan(rec, range(2), rule, current=20)[0] == 30  # grows always


def test_records_round_trip_through_json():
  rec = window([[1, 2], [3, 4]])
  back = adaptive.RecordAccumulator.from_json(json.loads(json.dumps(rec.to_json())))
  np.testing.assert_array_equal(back.step_loads, [[1, 2], [3, 4]])
  np.testing.assert_array_equal(back.step_tokens, [64, 64])
  assert back.steps == 2 and back.tokens_per_expert.tolist() == [4, 6]


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
  grads = squared_output_grads(moe, params, x)
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
                       capacity=Capacity(factor=64.0))
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
  config.model.moe.top_any.scale = 4.0  # sharper gates: some tokens activate no expert
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

  # Resumes from 18: records complete, the next layout not yet compiled.
  again, again_result = killed_and_resumed(config, str(tmp_path / 'resumed'), 19)
  assert again_result['experts_per_layer'] == result['experts_per_layer']
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  resumed_events = [json.loads(l) for l in open(tmp_path / 'resumed' / 'adaptation.jsonl')]
  strip = lambda es: [{k: v for k, v in e.items() if not k.endswith('seconds')} for e in es]
  assert strip(resumed_events) == strip(events)


def capacity_tiny():
  # Top-1 sized at 4x the mean load: the routing it records asks for fewer slots.
  config = load_config('tiny', 'top_k')
  config.model.moe.top_k.k = 1
  config.model.moe.capacity.factor = 4.0
  config.num_train_steps = 30
  config.checkpoint_every = 9  # step 18 lies between the window and the boundary at 20
  config.adaptive.capacity = True
  config.adaptive.every = 10
  config.adaptive.record_steps = 4
  config.adaptive.compile_lead_steps = 3
  return config


@pytest.mark.slow
def test_trainer_replans_capacity_logs_and_resumes_exactly(tmp_path):
  config = capacity_tiny()
  straight = train.Trainer(config, str(tmp_path / 'straight'))
  straight.run()
  events = [json.loads(l) for l in open(tmp_path / 'straight' / 'adaptation.jsonl')]
  assert events and all(e['experts_before'] == e['experts_after'] == 4 for e in events)
  assert all(e['compiled_ahead'] for e in events)
  tokens = config.batch_size * 40  # 40 tokens per MNIST-1D signal at stem stride 1
  rule = capacity.slots_per_expert(config_lib.moe_kwargs(config)['capacity'],
                                   config_lib.router_settings(config), tokens, 4, training=True)
  first = events[0]
  assert first['step'] == 10 and first['capacity_tokens'] == tokens
  assert first['capacity_before'] == 0 and 0 < first['capacity_after'] < rule
  # Every train and eval row reports the slots the step ran with.
  planned = {e['step']: e['capacity_after'] for e in events}
  rows = [json.loads(l) for l in open(tmp_path / 'straight' / 'metrics.jsonl')]
  for row in rows:
    if row['split'] == 'eval':
      continue
    boundaries = [s for s in planned if s < row['step']]
    slots = planned[max(boundaries)] if boundaries else rule
    assert row['moe/layer_1/capacity'] == slots, row['step']
    assert row['moe/layer_1/dropped_fraction'] < config.dropped_fraction_warning
    assert 0 < row['moe/layer_1/slot_utilization'] <= 1
  evals = {r['step']: r for r in rows if r['split'] == 'eval'}
  # Eval at step 20 runs before that boundary's switch, with step 10's plan scaled to eval
  # batches of 250 signals (eval_capacity_factor / capacity_factor = 1 here).
  scaled = -(-planned[10] * 250 * 40 // tokens)
  assert evals[20]['moe/layer_1/capacity'] == 8 * -(-scaled // 8) < evals[10][
      'moe/layer_1/capacity']
  meta = json.load(open(tmp_path / 'straight' / 'checkpoints' / '30' / 'meta' / 'metadata'))
  assert meta['capacity_per_layer'] == [0, events[-1]['capacity_after']]

  again, again_result = killed_and_resumed(config, str(tmp_path / 'resumed'), 19)
  assert again_result['capacity_per_layer'] == meta['capacity_per_layer']
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  strip = lambda es: [{k: v for k, v in e.items() if not k.endswith('seconds')} for e in es]
  assert strip([json.loads(l) for l in open(tmp_path / 'resumed' / 'adaptation.jsonl')]) == \
      strip(events)


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


def test_resize_keeps_a_learned_temperature():
  moe, x, boxed, params = init_moe(routers.TopAny(learned_scale=True, scale=10.0))
  params = {**params, 'log_scale': jnp.asarray(2.5, jnp.float32)}
  plan, layer = make_plan(moe, boxed, params, record([3, 0, 2, 1], 5, -np.ones(D)))
  new_params, _ = adaptive.resize(params, (), plan)
  assert float(new_params['log_scale']) == 2.5
  assert new_params['gate_embeddings'].shape == (layer.new_count, D)
  resized = layers.MoE(num_experts=layer.new_count, hidden_dim=F,
                       router=routers.TopAny(learned_scale=True), capacity=Capacity(factor=64.0))
  y, _ = resized.apply({'params': new_params}, x, training=True)
  assert np.all(np.isfinite(np.asarray(y)))
