"""Tokens/s and MFU: the FLOP count by hand, the peak table, the train rows."""
import json
import types

import pytest

from dynmoe_jax.train import throughput
from tests.conftest import load_config


def test_flops_per_token_by_hand():
  config = load_config('lm_tiny')  # 2 blocks of width 32, block 1 MoE, seq_len 32, V 257
  rates = throughput.lm_throughput(config, (0, 4), (1e9, 'test'))
  s, d = 32, 32
  attention = 8 * d * d + 4 * s * d
  dense_ffn = 2 * d * config.model.mlp_dim * 2
  assert rates.forward_flops_per_token == 2 * attention + dense_ffn + 2 * d * 257
  assert rates.tokens_per_step == config.batch_size * s
  row = {'steps_per_sec': 2.0, 'moe/layer_1/activated_flops_per_token': 1000.0}
  fields = rates.row_fields(row)
  assert fields['tokens_per_sec'] == 2.0 * config.batch_size * s
  assert fields['mfu'] == pytest.approx(
      3 * (rates.forward_flops_per_token + 1000.0) * fields['tokens_per_sec'] / 1e9)
  assert throughput.lm_throughput(load_config('tiny'), (0, 4), (1e9, 'test')) is None


def test_peaks_of_known_devices_and_a_measured_cpu():
  h100 = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3', platform='gpu')
  assert throughput.device_peak_flops([h100] * 8) == (8 * 989e12, '8 x H100 bf16 peak')
  v5e = types.SimpleNamespace(device_kind='TPU v5 lite', platform='tpu')
  assert throughput.device_peak_flops([v5e] * 4)[0] == 4 * 197e12
  cpu = types.SimpleNamespace(device_kind='cpu', platform='cpu')
  peak, source = throughput.device_peak_flops([cpu])
  assert peak > 1e8 and 'measured' in source


@pytest.mark.slow
def test_lm_train_rows_carry_tokens_per_second_and_mfu(tmp_path):
  from dynmoe_jax import train
  config = load_config('lm_tiny')
  train.Trainer(config, str(tmp_path)).run()
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train_rows = [r for r in rows if r['split'] == 'train']
  assert all(r['tokens_per_sec'] > 0 and 0 < r['mfu'] < 1 for r in train_rows)
