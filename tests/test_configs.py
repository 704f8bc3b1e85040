"""The accelerator LMs have the sizes their docstrings promise and run (shrunk) on the
meshes they name (tests/test_config.py validates every config file)."""
import json

import jax
import numpy as np
import pytest

from dynmoe_jax import adaptive, config_lib, sharding
from dynmoe_jax.train import compiled as compiled_lib
from tests.conftest import load_config, run_main, xla_flags


def abstract_params(config):
  model = config_lib.build_model(config)
  tokens = np.zeros((1, config.data.seq_len), np.int32)
  return jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)}, tokens, training=False))['params']


def test_lm_base_is_a_100_to_300m_bf16_decoder():
  config = load_config('lm_base')
  boxed = abstract_params(config)
  counts = compiled_lib.parameter_counts(sharding.strip_boxes(boxed),
                                         adaptive.expert_axes(boxed))
  assert 100e6 <= counts['parameters'] <= 300e6, counts
  assert counts['expert_parameters'] > counts['parameters'] / 2, counts
  assert {l.dtype for l in jax.tree.leaves(sharding.strip_boxes(boxed))} == {np.dtype('float32')}
  assert (config.model.arch, config.model.dtype, config.data.seq_len) == (
      'decoder', 'bfloat16', 1024)
  assert config.model.moe.router == 'top_k' and config.model.moe.k == 2


def test_parameter_counts_grow_by_the_experts_alone():
  counts = {}
  for experts in (4, 8):
    config = load_config('lm_tiny')
    config.model.moe.num_experts = experts
    boxed = abstract_params(config)
    params = sharding.strip_boxes(boxed)
    counts[experts] = compiled_lib.parameter_counts(params, adaptive.expert_axes(boxed))
    assert counts[experts]['parameters'] == sum(l.size for l in jax.tree.leaves(params))
  assert counts[8]['expert_parameters'] == 2 * counts[4]['expert_parameters'] > 0
  assert (counts[8]['parameters'] - counts[4]['parameters']
          == counts[4]['expert_parameters'])


def test_lm_tpu_spreads_lm_base_over_an_expert_axis_of_8():
  base, tpu = load_config('lm_base'), load_config('lm_tpu')
  assert tpu.model.moe.num_experts % tpu.mesh.expert == 0 and tpu.mesh.expert == 8
  for field in ('arch', 'dim', 'num_layers', 'mlp_dim', 'dtype'):
    assert tpu.model[field] == base.model[field], field
  assert tpu.batch_size % 8 == 0


# The sizes a CPU can run in seconds; everything else is the config's own.
SHRINK = ['--config.num_train_steps=6', '--config.batch_size=16', '--config.eval_batch_size=16',
          '--config.data.seq_len=64', '--config.model.num_layers=2', '--config.model.dim=64',
          '--config.model.num_heads=4', '--config.model.mlp_dim=64',
          '--config.model.moe.hidden_dim=32', '--config.log_every=2', '--config.eval_every=6',
          '--config.checkpoint_every=4', "--config.data.eval_split=test[:32]",
          '--config.progress_bar=False', '--config.adaptive.every=4',
          '--config.adaptive.record_steps=2', '--config.adaptive.compile_lead_steps=1']


@pytest.mark.slow
# lm_tpu is lm_base on a mesh of 8; lm_base's own steps run in device_check's smoke test.
@pytest.mark.parametrize('name,devices', [('lm_tpu', 8)])
def test_accelerator_lm_configs_train_shrunk_on_their_mesh(tmp_path, name, devices):
  proc = run_main([f'--config=configs/{name}.py', f'--workdir={tmp_path}', *SHRINK],
                  env=xla_flags(devices))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if r['split'] == 'train']
  assert train_rows and all(np.isfinite(r['loss']) for r in train_rows)
  assert train_rows[-1]['tokens_per_sec'] > 0 and train_rows[-1]['mfu'] > 0
  cost = [json.loads(l) for l in open(tmp_path / 'compiled_cost.jsonl')]
  assert cost[0]['parameters'] > cost[0]['expert_parameters'] > 0
