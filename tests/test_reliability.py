"""Fault tolerance: SIGTERM, kill -9, corrupt checkpoints, numerical faults."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import plots, train
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end-to-end: trains models


def start_main(workdir, *overrides):
  return subprocess.Popen(
      [sys.executable, '-m', 'dynmoe_jax.main', '--config=configs/tiny.py',
       f'--workdir={workdir}', *overrides], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f'process ended early: {proc.stderr.read()[-3000:]}')
    time.sleep(0.2)
  raise AssertionError('timed out')


def train_rows(workdir):
  rows = plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in rows]


def steps_logged(workdir):
  return [r['step'] for r in plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
def test_a_signal_checkpoints_the_current_step_writes_plots_and_exits_zero(tmp_path, signum):
  proc = start_main(tmp_path, '--config.num_train_steps=100000', '--config.checkpoint_every=1000',
                    '--config.eval_every=1000')
  wait_for(lambda: len(steps_logged(tmp_path)) >= 2, proc)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'KeyboardInterrupt' not in err
  assert out.startswith('preempted at step '), out
  result = json.loads((tmp_path / 'result.json').read_text())
  assert result['status'] == 'preempted'
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert steps == [result['step']] and 10 <= result['step'] < 1000
  assert (tmp_path / 'plots' / 'loss_accuracy.png').exists()


def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path):
  overrides = ['--config.num_train_steps=40', '--config.checkpoint_every=10',
               '--config.eval_every=20']
  straight = start_main(tmp_path / 'straight', *overrides)
  killed = start_main(tmp_path / 'killed', *overrides)
  wait_for(lambda: max(steps_logged(tmp_path / 'killed') or [0]) >= 22, killed)
  killed.kill()  # SIGKILL: no handler runs
  killed.wait()
  assert straight.wait(timeout=600) == 0
  rerun = start_main(tmp_path / 'killed', *overrides)
  _, err = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, err[-3000:]
  assert train_rows(tmp_path / 'killed') == train_rows(tmp_path / 'straight')


def test_half_written_checkpoint_is_never_picked_up(tmp_path, tiny_config):
  tiny_config.num_train_steps = 10
  train.Trainer(tiny_config, str(tmp_path)).run()
  # what orbax leaves behind when killed mid-save: a temporary directory
  tmp_dir = tmp_path / 'checkpoints' / '20.orbax-checkpoint-tmp-1234'
  tmp_dir.mkdir()
  (tmp_dir / 'state').mkdir()
  trainer = train.Trainer(tiny_config, str(tmp_path))
  assert trainer.checkpointer.all_steps() == [10]
  assert int(trainer.restore_or_init().step) == 10


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_config, caplog):
  tiny_config.num_train_steps = 20
  reference = train.Trainer(tiny_config, str(tmp_path / 'reference'))
  reference.run()
  workdir = tmp_path / 'run'
  train.Trainer(tiny_config, str(workdir)).run()
  state_dir = workdir / 'checkpoints' / '20' / 'state'
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
  again = train.Trainer(tiny_config, str(workdir))
  with caplog.at_level('WARNING', logger='dynmoe_jax'):
    result = again.run()
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == 'WARNING' and r.name.startswith('dynmoe_jax')]
  assert len(warnings) == 1, warnings
  warning, = warnings
  assert f'{workdir}/checkpoints/20 is unreadable' in warning
  assert 'moved, not deleted' in warning
  # one line; TensorStore's 60-line error is kept beside the moved checkpoint
  assert '\n' not in warning and len(warning) < 400, warning
  kept = os.listdir(workdir / 'unreadable_checkpoints')
  assert len(kept) == 1 and kept[0].startswith('20.')
  why = (workdir / 'unreadable_checkpoints' / kept[0] / 'why_unreadable.txt').read_text()
  # the error the warning names, in full (which file the truncation breaks first varies)
  error_type = warning.split(' is unreadable (')[1].split(')')[0]
  assert why.startswith('Traceback') and error_type in why
  assert result['step'] == 20
  chex.assert_trees_all_equal(jax.device_get(reference.state), jax.device_get(again.state))


def poison_experts(layer):
  def hook(trainer, step):
    if step == 5:
      params = jax.tree_util.tree_map_with_path(
          lambda p, v: v * jnp.nan if jax.tree_util.keystr(p) == f"['{layer}']['moe']['wo']"
          else v, trainer.state.params)
      trainer.state = trainer.state.replace(params=params)
  return hook


def test_nonfinite_stops_naming_step_and_layer_and_keeps_last_checkpoint(tmp_path, tiny_config):
  tiny_config.model.moe_layers = 'all'
  tiny_config.checkpoint_every = 5
  with pytest.raises(train.NonFiniteError,
                     match=r'at step 6: the experts of layer_1 produced non-finite outputs'):
    train.Trainer(tiny_config, str(tmp_path), on_step=poison_experts('layer_1')).run()
  trainer = train.Trainer(tiny_config, str(tmp_path))
  assert trainer.checkpointer.all_steps() == [5]
  state = trainer.restore_or_init()
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_skip_nonfinite_updates_keeps_going_and_counts(tmp_path, tiny_config):
  tiny_config.skip_nonfinite_updates = True
  tiny_config.num_train_steps = 10

  def poison_batch_once(trainer, step):
    if step == 4:
      original = trainer.stream.batch
      trainer.stream.batch = lambda s: (
          {**original(s), 'inputs': original(s)['inputs'] * np.nan} if s == 5 else original(s))
  result = train.Trainer(tiny_config, str(tmp_path), on_step=poison_batch_once).run()
  rows = [r for r in plots.read_jsonl(tmp_path / 'metrics.jsonl') if r['split'] == 'train']
  assert sum(r['skipped_steps'] for r in rows) == 1
  assert np.isfinite(result['eval']['loss'])


def test_dropped_fraction_warning(tmp_path, tiny_config, caplog):
  tiny_config.num_train_steps = 5
  tiny_config.model.moe.capacity.factor = 0.1
  tiny_config.model.moe.capacity.multiple_of = 1
  tiny_config.dropped_fraction_warning = 0.05
  with caplog.at_level('WARNING', logger='dynmoe_jax'):
    train.Trainer(tiny_config, str(tmp_path)).run()
  assert 'dropped' in caplog.text and 'raise model.moe.capacity.factor' in caplog.text


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_config):
  tiny_config.num_train_steps = 1000

  def press_ctrl_c_twice(trainer, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)  # the handler runs as kill returns: stop requested
      os.kill(os.getpid(), signal.SIGINT)  # the second one interrupts at once

  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    train.Trainer(tiny_config, str(tmp_path), on_step=press_ctrl_c_twice).run()
  assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_all_checkpoints_unreadable_never_restarts_over_the_run(tmp_path, tiny_config):
  tiny_config.num_train_steps = 10
  train.Trainer(tiny_config, str(tmp_path)).run()
  for root, _, files in os.walk(tmp_path / 'checkpoints'):
    for name in files:
      if 'state' in root:
        open(os.path.join(root, name), 'w').close()
  rows = (tmp_path / 'metrics.jsonl').read_text()
  with pytest.raises(ValueError, match='no checkpoint .* could be read'):
    train.Trainer(tiny_config, str(tmp_path)).run()
  assert (tmp_path / 'metrics.jsonl').read_text() == rows
