"""dynmoe_jax.names: block names and metric keys."""
import pytest

from dynmoe_jax import names


def test_layer_names_round_trip_and_reject_anything_else():
  assert names.layer_name(3) == 'layer_3' and names.layer_index('layer_12') == 12
  for bad in ('layer_', 'layers_1', 'moe', 'layer_1_x'):
    with pytest.raises(ValueError, match='layer_<index>'):
      names.layer_index(bad)


def test_moe_layer_names_follow_the_layout():
  assert names.moe_layer_names((0, 4, 0, 6)) == ['layer_1', 'layer_3']
  assert names.moe_layer_names((0, 0)) == []


def test_metric_keys_split_back_and_sort_by_block_index():
  key = names.metric_key('layer_10', 'active_experts')
  assert key == 'moe/layer_10/active_experts'
  assert names.split_metric_key(key) == ('layer_10', 'active_experts')
  assert names.split_metric_key('loss') is None and names.split_metric_key('moe/x') is None
  rows = [{'moe/layer_10/a': 1, 'loss': 0}, {'moe/layer_2/a': 1}]
  assert names.moe_layers_in(rows) == ['layer_2', 'layer_10']  # not string order
