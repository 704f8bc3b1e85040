"""End-to-end training on CPU with the tiny config: learning, checkpoints, exact resume."""
import hashlib
import json
import os
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import plots, train
from dynmoe_jax.train import compat
from tests.conftest import ROOT, killed_and_resumed, load_config, run_main, snapshot

pytestmark = pytest.mark.slow  # end-to-end: trains models


def metrics_rows(workdir, split='train'):
  return [r for r in plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == split]


def comparable(rows):
  return [{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in rows]


class Crash(RuntimeError):
  pass


@pytest.mark.parametrize('router', ['top_any', 'top_k'])
def test_tiny_trains_and_loss_falls(tmp_path, router):
  config = load_config('tiny', router)
  config.num_train_steps = 100
  config.log_every = 10
  config.eval_every = 100
  config.checkpoint_every = 50
  config.optimizer.learning_rate = 3e-3
  result = train.Trainer(config, str(tmp_path)).run()
  rows = metrics_rows(tmp_path)
  assert result['status'] == 'completed' and result['step'] == 100
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.2, [r['loss'] for r in rows]
  assert result['eval']['accuracy'] > 0.3  # 10 classes; chance is 0.1
  for key in ('moe/layer_1/active_experts', 'moe/layer_1/dropped_fraction',
              'moe/layer_1/expert_load', 'steps_per_sec', 'accuracy'):
    assert key in rows[-1]
  assert len(rows[-1]['moe/layer_1/expert_load']) == 4
  # compute that follows the router: slots and FLOPs per MoE layer, train and eval rows
  eval_row = metrics_rows(tmp_path, 'eval')[-1]
  for row in (rows[-1], eval_row):
    assert row['moe/layer_1/capacity'] > 0 and 0 < row['moe/layer_1/slot_utilization'] <= 1
    assert 0 < row['moe/layer_1/activated_flops_per_token'] <= \
        row['moe/layer_1/computed_flops_per_token']
  cost = [json.loads(l) for l in open(tmp_path / 'compiled_cost.jsonl')]
  assert cost[0]['step'] == 0 and cost[0]['flops'] > 0 and cost[0]['bytes_accessed'] > 0
  assert cost[0]['parameters'] > cost[0]['expert_parameters'] > 0
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['100', '50']
  assert {'loss_accuracy.png', 'active_experts.png', 'expert_load.png'} <= set(
      os.listdir(tmp_path / 'plots'))
  assert os.listdir(tmp_path / 'tensorboard')


def test_save_restore_gives_identical_state(tmp_path, tiny_config):
  tiny_config.num_train_steps = 10
  trainer = train.Trainer(tiny_config, str(tmp_path))
  trainer.run()
  restored = train.Trainer(tiny_config, str(tmp_path)).restore_or_init()
  chex.assert_trees_all_equal(jax.device_get(trainer.state), jax.device_get(restored))
  assert int(restored.step) == 10


def test_resume_matches_uninterrupted_run(tmp_path, tiny_config):
  straight = tmp_path / 'straight'
  resumed = tmp_path / 'resumed'
  reference = train.Trainer(tiny_config, str(straight))
  reference.run()

  def crash_after_checkpoint(trainer, step):
    if step == 13:  # checkpoint at 10; steps 11-13 are lost and must be redone identically
      raise Crash()

  with pytest.raises(Crash):
    train.Trainer(tiny_config, str(resumed), on_step=crash_after_checkpoint).run()
  again = train.Trainer(tiny_config, str(resumed))
  again.run()
  chex.assert_trees_all_equal(jax.device_get(reference.state), jax.device_get(again.state))
  assert comparable(metrics_rows(straight)) == comparable(metrics_rows(resumed))
  assert metrics_rows(straight, 'eval') == metrics_rows(resumed, 'eval')


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, tiny_config, monkeypatch):
  tiny_config.num_train_steps = 10
  first = train.Trainer(tiny_config, str(tmp_path)).run()
  before = (tmp_path / 'metrics.jsonl').read_text()

  def no_compiling(*args, **kwargs):
    raise AssertionError('a finished run compiled its steps again')
  monkeypatch.setattr(train.Trainer, 'compile', no_compiling)
  result = train.Trainer(tiny_config, str(tmp_path)).run()
  assert result['step'] == 10
  assert (tmp_path / 'metrics.jsonl').read_text() == before
  assert result['eval'] == first['eval'] and result['eval']['step'] == 10  # not {}


def test_workdir_of_a_different_model_is_refused(tmp_path, tiny_config):
  tiny_config.num_train_steps = 5
  tiny_config.checkpoint_every = 5
  train.Trainer(tiny_config, str(tmp_path)).run()
  before = snapshot(tmp_path)
  tiny_config.model.dim = 48
  with pytest.raises(ValueError, match=r"different config \(fields differ: \['model.dim'\]\)"):
    train.Trainer(tiny_config, str(tmp_path)).run()
  assert snapshot(tmp_path) == before
  tiny_config.model.dim = 32
  tiny_config.model.moe.num_experts = 3
  with pytest.raises(ValueError, match=r'experts_per_layer=\[0, 4\]'):
    train.Trainer(tiny_config, str(tmp_path)).run()


def test_command_line_overrides_reach_the_model(tmp_path):
  proc = run_main(['--config=configs/tiny.py', f'--workdir={tmp_path}',
                   '--config.num_train_steps=2', '--config.model.moe.router=top_k',
                   '--config.model.moe.num_experts=3', '--config.model.moe.top_k.k=1',
                   '--config.model.moe_layers=all'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  # one summary line; the whole result is in the workdir
  assert proc.stdout.strip().splitlines() == [proc.stdout.strip()], proc.stdout
  assert proc.stdout.startswith('completed at step 2: eval loss ')
  assert 'experts per layer [3, 3]' in proc.stdout
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['experts_per_layer'] == [3, 3]
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['moe']['router'] == 'top_k'
  rows = metrics_rows(tmp_path)
  assert 'moe/layer_0/load_balance' in rows[-1]  # top-k's loss, not top-any's diversity
  assert len(rows[-1]['moe/layer_0/expert_load']) == 3


def test_bad_config_fails_before_compilation_naming_the_field(tmp_path):
  proc = run_main(['--config=configs/tiny.py', f'--workdir={tmp_path}',
                   '--config.model.moe.top_k.k=9', '--config.model.moe.router=top_k'], timeout=120)
  assert proc.returncode != 0
  assert 'config.model.moe.top_k.k=9' in proc.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_lm_config_trains(tmp_path):
  config = load_config('lm_tiny')
  result = train.Trainer(config, str(tmp_path)).run()
  rows = metrics_rows(tmp_path)
  assert np.isfinite(result['eval']['bits_per_byte'])
  assert rows[-1]['loss'] < rows[0]['loss']


def test_a_changed_optimizer_is_refused_before_anything_is_written(tmp_path, tiny_config):
  tiny_config.num_train_steps = 10
  train.Trainer(tiny_config, str(tmp_path)).run()
  before = snapshot(tmp_path)
  tiny_config.optimizer.grad_clip_norm = 0.0
  tiny_config.num_train_steps = 15  # going on for longer is allowed; the optimizer is not
  with pytest.raises(ValueError, match=r"fields differ: \['optimizer.grad_clip_norm'\]"):
    train.Trainer(tiny_config, str(tmp_path)).run()
  assert snapshot(tmp_path) == before
  assert not (tmp_path / 'unreadable_checkpoints').exists()


def test_another_model_in_the_workdir_is_refused_naming_the_leaf_field(tmp_path):
  first = run_main(['--config=configs/tiny.py', f'--workdir={tmp_path}',
                    '--config.num_train_steps=5'])
  assert first.returncode == 0, first.stderr[-3000:]
  before = snapshot(tmp_path)
  proc = run_main(['--config=configs/tiny.py', f'--workdir={tmp_path}',
                   '--config.num_train_steps=5', '--config.model.moe.router=top_k'])
  assert proc.returncode == 2
  (line,) = [l for l in proc.stderr.splitlines() if l.strip()]
  assert "fields differ: ['model.moe.router']" in line and "run: 'top_any'" in line
  assert snapshot(tmp_path) == before  # config.json, tensorboard: nothing written


def test_a_run_killed_before_its_first_checkpoint_is_refused_for_another_config(tmp_path,
                                                                                 tiny_config):
  (tmp_path / 'config.json').write_text(tiny_config.to_json_best_effort())
  tiny_config.seed = 1
  with pytest.raises(ValueError, match=r"fields differ: \['seed'\]"):
    train.Trainer(tiny_config, str(tmp_path))


def test_eval_figures_do_not_depend_on_the_eval_batch_size(tmp_path, tiny_config):
  tiny_config.num_train_steps = 5
  train.Trainer(tiny_config, str(tmp_path)).run()
  figures = []
  for eval_batch_size in (250, 96, 1000):  # 96 leaves a padded last batch
    tiny_config.eval_batch_size = eval_batch_size
    trainer = train.Trainer(tiny_config, str(tmp_path))
    with jax.set_mesh(trainer.mesh):
      state = trainer.restore_or_init()
    figures.append(trainer.evaluate(state))
    trainer.close()
  # What the eval batch's shape decides (slots per expert, and so how full they are and
  # the FLOPs computed) may differ; quality and routing figures may not.
  shape_bound = ('capacity', 'slot_utilization', 'computed_flops_per_token')
  for other in figures[1:]:
    assert other.keys() == figures[0].keys()
    for key, value in figures[0].items():
      if not key.endswith(shape_bound):
        np.testing.assert_allclose(other[key], value, rtol=1e-5, err_msg=key)
  assert {'moe/layer_1/expert_load', 'moe/layer_1/unrouted_fraction'} <= figures[0].keys()


@pytest.mark.parametrize('horizon', [None, 5.0])
def test_budget_controllers_move_are_checkpointed_and_resume_exactly(tmp_path, tiny_config,
                                                                     horizon):
  tiny_config.budget.target_experts_per_token = 1.0
  tiny_config.budget.rate = 1.2
  tiny_config.budget.horizon = horizon
  straight = train.Trainer(tiny_config, str(tmp_path / 'straight'))
  straight.run()
  weight = float(straight.state.moe_controls['layer_1'])
  assert weight != pytest.approx(tiny_config.model.moe.top_any.efficiency_weight)
  again, _ = killed_and_resumed(tiny_config, str(tmp_path / 'resumed'), kill_after=13)
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))
  rows = metrics_rows(tmp_path / 'straight')
  assert 'moe/layer_1/efficiency_weight' in rows[-1]
  if horizon is not None:  # the smoothed count is part of the state too
    assert float(again.state.moe_controls['layer_1/smoothed_count']) > 0


def test_a_top_p_budget_lowers_p_while_top_p_takes_more_experts_and_resumes_exactly(
    tmp_path):
  config = load_config('tiny', 'top_p')
  config.model.moe.top_p.p = 0.9  # most of 4 experts per token: far above a target of 1.2
  config.budget.target_experts_per_token = 1.2
  straight = train.Trainer(config, str(tmp_path / 'straight'))
  straight.run()
  rows = [r for r in metrics_rows(tmp_path / 'straight') if 'moe/layer_1/p' in r]
  assert rows and rows[0]['moe/layer_1/active_experts'] > 1.2
  assert float(straight.state.moe_controls['layer_1']) < 0.9
  # p reaches routing: the last rows take fewer experts than the first
  assert rows[-1]['moe/layer_1/active_experts'] < rows[0]['moe/layer_1/active_experts']
  # evaluation routes with the adapted p, not the config's
  adapted = straight.evaluate(straight.state)['moe/layer_1/active_experts']
  as_configured = straight.evaluate(straight.state.replace(moe_controls={
      **straight.state.moe_controls, 'layer_1': jnp.float32(0.9)}))
  assert adapted < as_configured['moe/layer_1/active_experts'] - 0.5
  again, _ = killed_and_resumed(config, str(tmp_path / 'resumed'), kill_after=13)
  chex.assert_trees_all_equal(jax.device_get(straight.state), jax.device_get(again.state))


def v1_config(run: str):
  """The config.json of a fixture run saved in config layout 1 (flat model.moe)."""
  return json.loads((pathlib.Path(ROOT) / 'tests' / 'fixtures' / 'v1_runs' / run /
                     'config.json').read_text())


def test_a_run_saved_before_a_config_field_existed_resumes_with_the_old_behaviour():
  """A budget run saved by the version before budget_horizon existed (its config lacks the
  field, its error unit None): it compares equal to both at 0, what the command line can
  say, and unequal to the new defaults."""
  saved = v1_config('top_any_budget')
  assert 'config_version' not in saved and 'target_experts_per_token' in saved['model']['moe']
  del saved['model']['moe']['budget_horizon']
  saved['model']['moe']['budget_error_unit'] = None
  config = load_config('tiny')
  config.budget.target_experts_per_token = 1.5
  config.budget.error_unit = config.budget.horizon = 0.0
  assert compat.differences(saved, compat.config_json(config)) == []
  config.budget.error_unit, config.budget.horizon = 0.1, 20.0
  assert [d[0] for d in compat.differences(saved, compat.config_json(config))] == [
      'budget.error_unit', 'budget.horizon']


def test_a_run_saved_with_the_old_routing_defaults_resumes_where_they_are_the_rule():
  config = load_config('tiny', 'top_k')  # k = 2
  config.model.moe.capacity.factor, config.model.moe.capacity.group_size = 1.5, 20
  saved = v1_config('top_k_groups')
  saved['model']['moe'].update(normalize_top_k=True, priority='score')  # before the rules
  assert compat.differences(saved, compat.config_json(config)) == [
      ('model.moe.top_k.priority', 'score', 'gshard')]  # top_k's default is now 'gshard'
  config.model.moe.top_k.priority = 'score'
  assert compat.differences(saved, compat.config_json(config)) == []  # k=2 renormalised
  config.model.moe.top_k.k = 1
  saved['model']['moe']['k'] = 1  # the other routers' sections (k=1) are not compared
  assert [d[0] for d in compat.differences(saved, compat.config_json(config))] == [
      'model.moe.top_k.normalize']  # top-1 renormalised then, raw now


@pytest.mark.parametrize('run', ['top_any_budget', 'top_k_groups'])
def test_a_run_saved_in_config_layout_1_resumes_bit_exactly(tmp_path, run):
  """tests/fixtures/v1_runs: runs saved at step 10 by the code of layout 1 (flat
  model.moe; tests/fixtures/make_v1_runs.py), resumed to step 20 by this version with the
  same run's config in layout 2. Their state and evaluation at step 20 are those of the
  old code's own continuation, recorded beside them (on the machine that made them: the
  state's bytes are compared where XLA's CPU numerics match)."""
  workdir = tmp_path / run
  shutil.copytree(pathlib.Path(ROOT) / 'tests' / 'fixtures' / 'v1_runs' / run, workdir)
  expected = json.loads((pathlib.Path(ROOT) / 'tests' / 'fixtures' / 'v1_runs' /
                         f'{run}.expected.json').read_text())
  config = load_config('tiny', 'top_any' if run == 'top_any_budget' else 'top_k')
  config.num_train_steps, config.checkpoint_every, config.eval_every = 20, 10, 10
  if run == 'top_any_budget':
    config.budget.target_experts_per_token = 1.5
  else:
    config.model.moe.capacity.factor, config.model.moe.capacity.group_size = 1.5, 20
  trainer = train.Trainer(config, str(workdir))
  assert int(trainer.restore_or_init().step) == 10  # the old checkpoint, read back
  result = trainer.run()
  assert result['step'] == 20
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  rows = [r for r in rows if r.get('step', 0) > 10]
  assert [r['split'] for r in rows] == [r['split'] for r in expected['rows_after_step_10']]
  for got, want in zip(rows, expected['rows_after_step_10']):
    for key, value in want.items():
      if isinstance(value, float) and 'seconds' not in key and 'per_sec' not in key:
        np.testing.assert_allclose(got[key], value, rtol=1e-3, err_msg=key)
  np.testing.assert_allclose(result['eval']['loss'], expected['eval']['loss'], rtol=1e-3)
  if result['eval'] == expected['eval']:  # this CPU computes as the fixtures' did: bit-exact
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(trainer.state)):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    assert digest.hexdigest() == expected['state_sha256']
  # the resumed run's own saves are layout 2: it resumes again without migrating
  assert json.loads((workdir / 'config.json').read_text())['config_version'] == 2
