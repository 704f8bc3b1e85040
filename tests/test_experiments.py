"""experiments/compare_routers.py end to end at the 'smoke' size: training runs in
worker processes, side-by-side timing, routing analysis, table, JSON and plots."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end-to-end: trains models


def load_script(name):
  """An experiments/ script as a module; its `import common` resolves as it does when the
  script runs (Python puts the script's directory first on sys.path)."""
  experiments_dir = os.path.join(ROOT, 'experiments')
  if experiments_dir not in sys.path:
    sys.path.insert(0, experiments_dir)
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments',
                                                                   f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def compare_routers():
  return load_script('compare_routers')


def test_every_preset_and_router_builds_a_valid_config(compare_routers):
  from dynmoe_jax import config_lib
  for preset in compare_routers.PRESETS:
    for task in compare_routers.TASKS:
      for router in compare_routers.ROUTERS:
        config = compare_routers.make_config(task, router, 0, preset)
        config_lib.validate(config)
        assert config.progress_bar is False
  dense = compare_routers.make_config('mnist1d', 'dense', 0, 'cpu')
  top1 = compare_routers.make_config('mnist1d', 'top1', 0, 'cpu')
  # dense has the activated FFN width of top-1
  assert dense.model.mlp_dim == top1.model.moe.hidden_dim and top1.model.moe.top_k.k == 1


def check_analysis(compare_routers, analysis):
  bins = analysis['loss_bins']
  assert len(bins) == compare_routers.LOSS_BINS
  medians = [b['median_loss'] for b in bins]
  assert medians == sorted(medians)
  experts = np.array([b['experts_per_token'] for b in bins])
  # eval-mode top-any: unrouted tokens fall back to one expert; 8 experts, one MoE block
  assert experts.shape == (compare_routers.LOSS_BINS, 1)
  assert np.all((experts >= 1) & (experts <= 8))
  return sum(b['count'] for b in bins)


def test_compare_routers_smoke(compare_routers, tmp_path):
  out = str(tmp_path)
  results = compare_routers.main(['--preset', 'smoke', '--tasks', 'mnist1d', '--routers',
                                  'top2,dynmoe', '--seeds', '0', '--jobs', '2',
                                  '--timing_rounds', '1', '--timing_steps', '2', '--out', out])
  with open(os.path.join(out, 'results.json')) as f:
    assert json.load(f)['tasks'].keys() == {'mnist1d'}
  for name in ('results.md', 'pareto.png', 'experts_per_layer.png', 'difficulty.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  rows = {r['router']: r for r in results['tasks']['mnist1d']['rows']}
  assert rows.keys() == {'top2', 'dynmoe'}
  assert rows['top2']['mean_active_experts'] == pytest.approx(2.0)
  assert rows['top2']['steps_per_sec_vs_top2'] == pytest.approx(1.0)
  assert rows['dynmoe']['steps_per_sec_vs_top2'] > 0
  assert rows['top2']['analysis'] == []  # fixed-k routers are not analysed
  (analysis,) = rows['dynmoe']['analysis']
  assert check_analysis(compare_routers, analysis) == 1000  # every test signal once
  assert [n['noise_multiplier'] for n in analysis['noise']] == [1.0, 2.0, 4.0]
  # the test split's experts per token agree with the run's eval; the training split's are
  # counted over as many examples
  assert np.mean(analysis['test_experts_per_token']) == pytest.approx(
      rows['dynmoe']['mean_active_experts'], rel=1e-4)
  assert analysis['train_slice'] == 'train[:1000]'
  assert 1 <= np.mean(analysis['train_slice_experts_per_token']) <= 8
  assert os.path.exists(os.path.join(out, 'runs', 'mnist1d', 'dynmoe', 'seed_0', 'summary.json'))
  table = open(os.path.join(out, 'results.md')).read()
  assert '| mnist1d router | test accuracy (%)' in table
  assert 'mnist1d dynmoe: experts/token test ' in table and ', train[:1000] ' in table


def test_lm_run_summary_and_per_byte_analysis(compare_routers, tmp_path):
  import argparse
  args = argparse.Namespace(out=str(tmp_path), preset='smoke')
  summary = compare_routers.train_one(args, 'lm', 'dynmoe', 0)
  assert summary['metric'] == 'bits_per_byte' and 0 < summary['value'] < 9
  assert summary['final_experts'] == {'layer_1': 8}
  config = compare_routers.make_config('lm', 'dynmoe', 0, 'smoke')
  analysis = compare_routers.routing_analysis(
      config, compare_routers.run_dir(args, 'lm', 'dynmoe', 0))
  # every target byte of test[:32] once: 32 chunks x 16 targets, no padding in the corpus
  assert check_analysis(compare_routers, analysis) == 32 * 16
  assert 'noise' not in analysis
  assert analysis['train_slice'] == 'train[:32]'
  table = compare_routers.markdown_table('lm', compare_routers.aggregate(
      {'dynmoe': [summary]}, {}, {}))
  assert '| lm router | test bits/byte' in table and '| dynmoe |' in table


def test_lm_small_smoke(tmp_path):
  load_script('lm_small').main(['--out', str(tmp_path), '--num_train_steps', '2',
                                '--eval_split', 'test[:64]', '--variants', 'top_any_fallback'])
  results = json.load(open(tmp_path / 'results.json'))
  assert set(results) == {'top_any_fallback, budget 1.5'}
  assert all(np.isfinite(r['bits_per_byte']) and r['tokens_per_sec'] > 0
             for r in results.values())
  assert (tmp_path / 'lm_small.png').exists() and (tmp_path / 'results.md').exists()


def test_bench_scaling_smoke(tmp_path):
  out = tmp_path / 'scaling'
  load_script('bench_scaling').main(['--tokens', '256', '--dim', '32', '--hidden', '64',
                                     '--reps', '1', '--out', str(out)])
  rows = json.load(open(f'{out}.json'))['rows']
  assert [r['piece'] for r in rows][:2] == ['MoE layer', 'expert FFNs alone']
  assert all(r['ms_E8'] > 0 and r['ms_E64'] > 0 and r['ratio'] > 0 for r in rows)
  assert os.path.exists(f'{out}.png')


def test_device_check_smoke_writes_its_table_json_and_plot(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'device_check.py'),
                         '--smoke', '--out', str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'results.json').read_text())
  names = [r['name'] for r in result['expert_ffn']]
  assert names[:3] == ['sort', 'einsum', 'ragged/xla']
  assert {'ragged/megablox', 'ragged/pallas_triton'} <= set(names)  # interpreted on a CPU
  assert [r['name'] for r in result['lm']] == ['lm_base/top2', 'lm_base/top_any_b1.5']
  assert all(r['tflops'] > 0 and r['seconds'] > 0 for r in result['expert_ffn'] + result['lm'])
  assert result['lm'][0]['step_time_vs_top2'] == 1.0
  assert all(r['compiled_temp_bytes'] > 0 for r in result['lm'])  # the compiler's own estimate
  assert (tmp_path / 'results.png').stat().st_size > 0
  assert '| lm_base/top_any_b1.5 |' in (tmp_path / 'results.md').read_text()
