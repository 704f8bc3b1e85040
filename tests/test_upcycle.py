"""Sparse upcycling: dense params -> MoE params, and --config.init_from in the trainer."""
import json
import os

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from dynmoe_jax import routers, train, upcycle
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.models import transformer
from tests.conftest import killed_and_resumed, load_config

D, H, E = 16, 32, 4


def models(router):
  """router: a name (top_k: k=2) or a settings object."""
  kw = dict(task='classify', stem='conv1d', num_layers=2, dim=D, num_heads=2, mlp_dim=H,
            ffn_bias=False, max_len=64)
  settings = dict(router=router, hidden_dim=H, capacity=Capacity(factor=8.0, eval_factor=8.0))
  dense = transformer.MoETransformer(experts_per_layer=(0, 0), moe=settings, **kw)
  sparse = transformer.MoETransformer(experts_per_layer=(0, E), moe=settings, **kw)
  return dense, sparse, settings


def signals(n=8, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 40))


def upcycled(router):
  dense, sparse, settings = models(router)
  x = signals()
  dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), x)['params'])
  fresh = nn.meta.unbox(sparse.init(jax.random.PRNGKey(1), x)['params'])
  inputs = upcycle.router_inputs(dense, dense_params, [signals(32, 1)], ['layer_1'])
  params = upcycle.upcycle_params(dense_params, fresh, moe_settings=settings,
                                  router_inputs=inputs)
  return dense, sparse, dense_params, params, inputs, x


def test_spherical_kmeans_finds_the_directions():
  rng = np.random.default_rng(0)
  directions = np.eye(D)[:3]
  points = np.concatenate([d * rng.uniform(0.5, 5, (50, 1)) + 0.05 * rng.standard_normal((50, D))
                           for d in directions])
  centroids = upcycle.spherical_kmeans(points, 3, seed=1)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
  assert sorted(np.argmax(np.abs(centroids), axis=1).tolist()) == [0, 1, 2]
  assert np.min(np.max(centroids @ directions.T, axis=0)) > 0.99


@pytest.mark.parametrize('router', ['top_k', 'top_any'])
def test_upcycled_model_computes_the_dense_model(router):
  # Identical experts and combine weights that sum to 1: top-k renormalised, top-any in
  # evaluation (1/K each, or its top-1 expert when none is active).
  dense, sparse, dense_params, params, _, x = upcycled(router)
  want = dense.apply({'params': dense_params}, x)[0]
  got, aux = sparse.apply({'params': params}, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert float(aux['moe']['layer_1'].metrics['dropped_fraction']) == 0.0
  for name in ('stem', 'layer_0', 'head'):
    chex.assert_trees_all_equal(params[name], dense_params[name])


@pytest.mark.parametrize('target', [1.0, 1.5, 3.0])
def test_top_any_thresholds_give_the_target_experts_per_token(target):
  dense, sparse, dense_params, params, inputs, _ = upcycled(
      routers.TopAny().with_budget(target))
  moe = params['layer_1']['moe']
  unit = inputs['layer_1'] / np.linalg.norm(inputs['layer_1'], axis=1, keepdims=True)
  active = (unit @ np.asarray(moe['gate_embeddings'], np.float64).T
            > np.asarray(moe['thresholds'], np.float64)).sum(1)
  assert abs(active.mean() - target) < 0.05
  np.testing.assert_allclose(np.linalg.norm(moe['gate_embeddings'], axis=1), 1.0, rtol=1e-5)


def test_logit_routers_keep_their_fresh_init_and_noise_breaks_symmetry():
  dense, sparse, settings = models('top_k')
  x = signals()
  dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), x)['params'])
  fresh = nn.meta.unbox(sparse.init(jax.random.PRNGKey(1), x)['params'])
  params = upcycle.upcycle_params(dense_params, fresh, moe_settings=settings, noise=0.1)
  moe = params['layer_1']['moe']
  chex.assert_trees_all_equal(moe['router_kernel'], fresh['layer_1']['moe']['router_kernel'])
  assert not np.allclose(moe['wi'][0], moe['wi'][1])
  wi = np.asarray(dense_params['layer_1']['wi']['kernel'])
  assert abs(np.std(moe['wi'] - wi) / np.std(wi) - 0.1) < 0.01  # noise 0.1 x the weight's std


def test_partition_splits_the_dense_hidden_units():
  dense, _, settings = models('top_k')
  sparse = transformer.MoETransformer(
      task='classify', stem='conv1d', num_layers=2, dim=D, num_heads=2, mlp_dim=H,
      ffn_bias=False, max_len=64, experts_per_layer=(0, E),
      moe={**settings, 'hidden_dim': H // E, 'router': routers.TopK(k=E)})
  x = signals()
  dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), x)['params'])
  fresh = nn.meta.unbox(sparse.init(jax.random.PRNGKey(1), x)['params'])
  params = upcycle.upcycle_params(dense_params, fresh, moe_settings={
      **settings, 'hidden_dim': H // E, 'router': routers.TopK(k=E)}, partition=True)
  wi = dense_params['layer_1']['wi']['kernel']
  np.testing.assert_array_equal(np.concatenate(list(params['layer_1']['moe']['wi']), 1), wi)
  # With all E experts active at weight 1/E (a zero router kernel: uniform softmax), the
  # H/F-scaled parts sum to the dense FFN.
  params['layer_1']['moe']['router_kernel'] = np.zeros_like(
      params['layer_1']['moe']['router_kernel'])
  want = dense.apply({'params': dense_params}, x)[0]
  np.testing.assert_allclose(sparse.apply({'params': params}, x)[0], want, atol=1e-4)


def test_what_does_not_fit_is_named():
  dense, sparse, settings = models('top_k')
  x = signals()
  fresh = nn.meta.unbox(sparse.init(jax.random.PRNGKey(1), x)['params'])
  with_bias = dense.clone(ffn_bias=True)
  biased = nn.meta.unbox(with_bias.init(jax.random.PRNGKey(0), x)['params'])
  with pytest.raises(upcycle.UpcycleError, match='has biases.*model.ffn_bias=False'):
    upcycle.upcycle_params(biased, fresh, moe_settings=settings)
  dense_params = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), x)['params'])
  wider = {**dense_params, 'layer_1': {**dense_params['layer_1'],
                                       'wi': {'kernel': np.zeros((D, 2 * H))},
                                       'wo': {'kernel': np.zeros((2 * H, D))}}}
  with pytest.raises(upcycle.UpcycleError, match='hidden_dim=32 differs from the dense '
                                                 'mlp_dim=64.*partition'):
    upcycle.upcycle_params(wider, fresh, moe_settings=settings)
  with pytest.raises(upcycle.UpcycleError, match="model.moe.activation='relu'"):
    upcycle.upcycle_params(dense_params, fresh, moe_settings={**settings, 'activation': 'relu'})
  with pytest.raises(upcycle.UpcycleError, match='pass router_inputs'):
    upcycle.upcycle_params(dense_params, fresh, moe_settings={**settings, 'router': 'top_any'})


# ----------------------------------------------------------------------------- the trainer


def dense_tiny():
  config = load_config('tiny')
  config.model.moe_layers = 'none'
  config.model.ffn_bias = False
  config.model.mlp_dim = config.model.moe.hidden_dim
  return config


def moe_tiny(init_from, router='top_k'):
  config = load_config('tiny', router)
  config.model.ffn_bias = False
  config.init_from = init_from
  config.model.moe.capacity.eval_factor = 8.0  # no eval drops: the step-0 loss is exact
  return config


# make test runs each file on one worker (--dist loadfile): computed once.
@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dense'))
  result = train.Trainer(dense_tiny(), workdir).run()
  return workdir, result


@pytest.mark.slow
# top_any: its gates are set from data; top_k's step-0 equality: test_upcycled_model_computes_the_dense_model
@pytest.mark.parametrize('router', ['top_any'])
def test_init_from_starts_at_the_dense_model_and_resumes_exactly(dense_run, tmp_path, router):
  dense_dir, dense_result = dense_run
  config = moe_tiny(dense_dir, router)
  straight = train.Trainer(config, str(tmp_path / 'straight'))
  straight.run()
  rows = [json.loads(l) for l in open(tmp_path / 'straight' / 'metrics.jsonl')]
  start = [r for r in rows if r['split'] == 'eval' and r['step'] == 0]
  assert len(start) == 1
  assert abs(start[0]['loss'] - dense_result['eval']['loss']) < 1e-4
  assert start[0]['accuracy'] == dense_result['eval']['accuracy']

  again, _ = killed_and_resumed(config, str(tmp_path / 'resumed'), 15)
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  resumed_rows = [json.loads(l) for l in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  assert sum(r['split'] == 'eval' and r['step'] == 0 for r in resumed_rows) == 1


@pytest.mark.slow
def test_init_from_errors_name_the_problem(dense_run, tmp_path):
  dense_dir, _ = dense_run
  with pytest.raises(upcycle.UpcycleError, match='holds no checkpoint'):
    train.Trainer(moe_tiny(str(tmp_path / 'nothing')), str(tmp_path / 'a')).run()
  config = moe_tiny(dense_dir)
  config.model.dim = 64
  with pytest.raises(upcycle.UpcycleError, match=r'does not fit this one: model.dim \(dense: 32'):
    train.Trainer(config, str(tmp_path / 'b')).run()
  config = moe_tiny(dense_dir)
  config.model.moe.glu = True  # found once the fresh model is built
  with pytest.raises(upcycle.UpcycleError, match='must be ungated'):
    train.Trainer(config, str(tmp_path / 'd')).run()
  moe_dir = str(tmp_path / 'moe')
  train.Trainer(moe_tiny(dense_dir), moe_dir).run()
  with pytest.raises(upcycle.UpcycleError, match=r'holds an MoE model \(experts per layer'):
    train.Trainer(moe_tiny(moe_dir), str(tmp_path / 'c')).run()
  for refused in 'abcd':  # nothing written, so the corrected command is not refused
    assert not os.path.exists(tmp_path / refused)
  train.Trainer(moe_tiny(dense_dir), str(tmp_path / 'a')).run()
