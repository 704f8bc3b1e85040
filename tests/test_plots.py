"""dynmoe_jax.plots: every plot is written, columns sit at their steps."""
import json

import numpy as np

from dynmoe_jax import plots


def write_rows(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def test_step_edges_follow_uneven_rows():
  np.testing.assert_array_equal(plots.step_edges([50, 100, 130, 500]), [0, 50, 100, 130, 500])


def test_writes_every_plot_for_an_adaptive_run(tmp_path):
  rows = []
  for step, experts in ((50, 2), (100, 2), (130, 3), (500, 3)):  # uneven: a boundary at 130
    rows.append({'split': 'train', 'step': step, 'loss': 1.0 / step, 'accuracy': 0.5,
                 'moe/layer_1/active_experts': 1.5,
                 'moe/layer_1/expert_load': [1.0 / experts] * experts,
                 'moe/layer_3/active_experts': 1.2, 'moe/layer_3/expert_load': [0.5, 0.5]})
  rows.append({'split': 'eval', 'step': 500, 'loss': 0.1, 'accuracy': 0.9,
               'moe/layer_1/active_experts': 1.4, 'moe/layer_3/active_experts': 1.1})
  write_rows(tmp_path / 'metrics.jsonl', rows)
  write_rows(tmp_path / 'adaptation.jsonl', [{'step': 130, 'layer': 'layer_1',
                                              'experts_before': 2, 'experts_after': 3}])
  written = plots.write_plots(str(tmp_path))
  assert sorted(p.rsplit('/', 1)[1] for p in written) == [
      'active_experts.png', 'expert_load.png', 'experts_per_layer.png', 'loss_accuracy.png']


def adaptive_rows():
  """Log rows every 50 steps; layer_1 resized 2 -> 3 at the boundary of step 100 and
  3 -> 4 at 200. The row logged at a boundary step was computed before its resize."""
  rows = []
  for step, experts in ((50, 2), (100, 2), (150, 3), (200, 3), (250, 4)):
    rows.append({'split': 'train', 'step': step, 'loss': 1.0, 'accuracy': 0.5,
                 'moe/layer_1/active_experts': 1.5,
                 'moe/layer_1/expert_load': [1.0 / experts] * experts,
                 'moe/layer_3/active_experts': 1.2, 'moe/layer_3/expert_load': [0.5, 0.5]})
  return rows


def event(step, layer, before, after):
  return {'step': step, 'layer': layer, 'experts_before': before, 'experts_after': after}


def test_expert_counts_change_at_the_boundaries_adaptation_records():
  adaptation = [event(100, 'layer_1', 2, 3), event(100, 'layer_3', 2, 2),  # capacity only
                event(200, 'layer_1', 3, 4)]
  series = plots.experts_per_layer(adaptive_rows(), adaptation)
  assert series == {'layer_1': [(0, 2), (100, 3), (200, 4), (250, 4)],
                    'layer_3': [(0, 2), (250, 2)]}


def test_a_capacity_only_run_draws_no_expert_count_plot(tmp_path):
  write_rows(tmp_path / 'metrics.jsonl', adaptive_rows()[:2])
  write_rows(tmp_path / 'adaptation.jsonl', [event(100, 'layer_1', 2, 2)])
  assert plots.experts_per_layer(adaptive_rows()[:2], [event(100, 'layer_1', 2, 2)]) == {}
  written = [p.rsplit('/', 1)[1] for p in plots.write_plots(str(tmp_path))]
  assert 'experts_per_layer.png' not in written and 'expert_load.png' in written
