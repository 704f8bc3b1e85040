"""Config validation: every bad value stops before compilation, naming the field."""
import glob
import os

import numpy as np
import pytest

from dynmoe_jax import config_lib
from tests.conftest import ROOT, load_config

ALL_CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                     for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')))


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_shipped_configs_validate(name):
  config = load_config(name)
  # on the devices its mesh names (lm_tpu: 8)
  devices = int(np.prod([s for s in config.mesh.values() if s != -1]))
  layout = config_lib.validate(config, num_devices=devices)
  assert len(layout) == config.model.num_layers


BAD_CONFIGS = [
    # (field, value, expected message fragment); a dict sets several fields
    ('model.moe.capacity.slots', 0,
     'config.model.moe.capacity.slots=0 is invalid: must be an int >= 1'),
    ({'model.moe.capacity.slots': 4, 'adaptive.capacity': True, 'adaptive.every': 10},
     'config.adaptive.capacity=True is invalid: re-plans the slots per expert that '
     'model.moe.capacity.slots=4 fixes'),
    ({'model.moe.capacity.slots': 4, 'model.moe.router': 'expert_choice'},
     "config.model.moe.capacity.slots=4 is invalid: is unused: router 'expert_choice' fixes its "
     'own capacity'),
    ('model.moe.top_any.priority', 'fifo', "config.model.moe.top_any.priority='fifo' is invalid"),
    ('model.moe.top_k.priority', 'fifo', "config.model.moe.top_k.priority='fifo' is invalid"),
    ('model.moe.top_any.unknown', 1, "config.model.moe.top_any.unknown=1 is invalid: is not a "
     "field (fields: ['scale',"),
    ('model.moe.router', 'top_q', "config.model.moe.router='top_q' is invalid: must be one of"),
    ('model.moe.dispatch_impl', 'scatter', "config.model.moe.dispatch_impl='scatter'"),
    ({'model.moe.router': 'top_k', 'model.moe.top_k.k': 9},
     'config.model.moe.top_k.k=9 is invalid: must be <= the 4 experts (layer 1: 4 experts)'),
    ('model.moe.top_any.expected_k', -1.0, 'config.model.moe.top_any.expected_k=-1.0'),
    ('model.moe.top_p.p', 0.0, 'config.model.moe.top_p.p=0.0 is invalid: must be in (0, 1]'),
    ('model.moe.top_p.p', 1.5, 'config.model.moe.top_p.p=1.5'),
    ('model.moe.capacity.factor', 0.0, 'config.model.moe.capacity.factor=0.0 is invalid'),
    ('model.moe.capacity.eval_factor', -1.0, 'config.model.moe.capacity.eval_factor=-1.0'),
    ('model.moe.top_any.max_k', 7,
     'config.model.moe.top_any.max_k=7 is invalid: must be <= the 4 experts (layer 1: 4 experts)'),
    ('model.moe.activation', 'tanhh', "config.model.moe.activation='tanhh'"),
    ('model.moe.num_experts_per_layer', (4, 4, 4),
     'model.moe.num_experts_per_layer=[4, 4, 4] lists 3 counts for 1 MoE layers [1]'),
    ('model.moe_layer_indices', (0, 5), 'model.moe_layers has indices [5] outside [0, 2)'),
    ('model.moe_layers', 'odd', "config.model: model.moe_layers='odd'"),
    ('model.moe.top_any.load_balance_weight', -0.1,
     'config.model.moe.top_any.load_balance_weight=-0.1 is invalid: must be a number >= 0'),
    ('budget.rate', 1.0, 'config.budget.rate=1.0 is invalid: must be a number > 1'),
    ('num_train_steps', -5, 'config.num_train_steps=-5 is invalid: must be an int > 0'),
    ('batch_size', 0, 'config.batch_size=0'),
    ('model.num_heads', 3, 'config.model.num_heads=3 is invalid: must divide model.dim=32'),
    ('model.dropout', 1.0, 'config.model.dropout=1.0'),
    ('model.task', 'lm', "config.model.task='lm' is invalid: 'lm' goes with data.kind='lm'"),
    ('data.kind', 'audio', "config.data.kind='audio'"),
    ('model.dtype', 'float8', "config.model.dtype='float8'"),
    ('optimizer.learning_rate', 0.0, 'config.optimizer.learning_rate=0.0'),
    ('mesh.expert', 3, 'config.mesh: mesh.data=-1: 1 devices are not divisible by the other '
     'mesh axes (3)'),
    ('mesh.data', 0, 'config.mesh: mesh sizes must be positive ints or -1'),
    ('log_every', 0, 'config.log_every=0'),
    ({'adaptive.enabled': True, 'adaptive.every': 100, 'adaptive.record_steps': 50,
      'adaptive.compile_lead_steps': 60},
     'config.adaptive.record_steps=50 is invalid: plus adaptive.compile_lead_steps=60 must be '
     '<= adaptive.every=100'),
    ({'adaptive.enabled': True, 'adaptive.every': 10, 'adaptive.record_steps': 2,
      'adaptive.compile_lead_steps': 2, 'num_train_steps': 10},
     'config.adaptive.every=10 is invalid: must be < num_train_steps=10'),
    ('model.moe.num_experts', 0,
     "config.model.moe.num_experts=0 is invalid: must be >= 1 for each MoE block (1,); for a "
     "dense model set model.moe_layers='none'"),
    ('model.moe.top_any.scale', 0.0, 'config.model.moe.top_any.scale=0.0 is invalid'),
    ({'model.moe.top_any.learned_scale': True, 'model.moe.top_any.scale': 10.0,
      'model.moe.top_any.max_scale': 5.0},
     'config.model.moe.top_any.max_scale=5.0 is invalid: must be a number >= scale=10.0'),
    ({'adaptive.enabled': True, 'adaptive.compile_lead_steps': -1},
     'config.adaptive.compile_lead_steps=-1 is invalid: must be an int >= 0'),
]


BAD_CONFIGS = [(c[0], c[1]) if isinstance(c[0], dict) else ({c[0]: c[1]}, c[2])
               for c in BAD_CONFIGS]


@pytest.mark.parametrize('overrides,message', BAD_CONFIGS,
                         ids=[','.join(f'{k}={v}' for k, v in o.items()) for o, _ in BAD_CONFIGS])
def test_bad_config_is_rejected_with_the_field_named(overrides, message):
  config = load_config('tiny')
  for field, value in overrides.items():
    config_lib.set_field(config, field, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, num_devices=1)
  assert message in str(info.value), str(info.value)


def test_adaptive_bounds_are_checked():
  config = load_config('tiny')
  config.adaptive.enabled = True
  config.adaptive.min_experts = 5
  config.adaptive.max_experts = 8
  with pytest.raises(config_lib.ConfigError, match='must lie in \\[adaptive.min_experts=5'):
    config_lib.validate(config)
  config.adaptive.min_experts = 9
  with pytest.raises(config_lib.ConfigError, match='adaptive.min_experts=9 is invalid'):
    config_lib.validate(config)


def test_batch_must_split_over_the_mesh():
  config = load_config('tiny')
  config.batch_size = 12
  config.mesh.data = 8
  with pytest.raises(config_lib.ConfigError, match='mesh.data\\*mesh.expert=8'):
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize('field,value,message', [
    ('capacity_quantile', 0.0, 'must be in \\(0, 1\\]'),
    ('capacity_headroom', 0.9, 'must be a number >= 1'),
    ('capacity_max_dropped', 0.5, 'must be in \\[0, dropped_fraction_warning=0.2\\)'),
    ('capacity_tolerance', 1.0, 'must be in \\[0, 1\\)'),
])
def test_capacity_replanning_settings_are_checked(field, value, message):
  config = load_config('tiny')
  config.adaptive.capacity = True
  config.adaptive.every = 10
  config.adaptive.record_steps = 5
  config.adaptive.compile_lead_steps = 5
  config_lib.validate(config)
  config.adaptive[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.adaptive.{field}=.* {message}'):
    config_lib.validate(config)


def test_expert_choice_capacity_is_not_replanned():
  config = load_config('tiny', 'expert_choice')
  config.adaptive.capacity = True
  config.adaptive.every = 10
  config.adaptive.record_steps = 5
  config.adaptive.compile_lead_steps = 5
  with pytest.raises(config_lib.ConfigError, match="'expert_choice' fixes its own capacity"):
    config_lib.validate(config)


@pytest.mark.parametrize('steps', [40, 7])
def test_a_short_run_of_the_default_lm_is_told_the_three_cadence_overrides(steps):
  config = load_config('lm_small')
  config.num_train_steps = steps
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  overrides = {}
  for field in ('every', 'record_steps', 'compile_lead_steps'):
    assert f'--config.adaptive.{field}=' in message, message
    overrides[field] = int(message.split(f'--config.adaptive.{field}=')[1].split()[0])
  config.adaptive.update(overrides)  # the suggestion, applied as given, validates
  config_lib.validate(config)


def test_expert_choice_in_a_causal_lm_needs_the_noncausal_opt_in():
  config = load_config('lm_tiny')
  config.model.moe.router = 'expert_choice'
  with pytest.raises(config_lib.ConfigError, match="later tokens of its routing group .* "
                                                   'set model.noncausal_routing=True'):
    config_lib.validate(config)
  config.model.noncausal_routing = True
  config_lib.validate(config)
  config.model.moe.capacity.group_size = 0
  with pytest.raises(config_lib.ConfigError, match='config.model.moe.capacity.group_size=0'):
    config_lib.validate(config)
