"""The accelerator LMs have the sizes their docstrings promise (tests/test_config.py
validates every config file; tests/test_accelerators.py lowers each for TPU and GPU on its
own mesh)."""
import jax
import numpy as np

from dynmoe_jax import adaptive, config_lib, sharding
from dynmoe_jax.train import compiled as compiled_lib
from tests.conftest import load_config


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
  assert config.model.moe.router == 'top_k' and config.model.moe.top_k.k == 2


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
