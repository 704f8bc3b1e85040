"""dynmoe_jax.main, as a new user meets it: mistakes end in one line and write nothing,
log lines never land on the progress bar."""
import os
import re

import pytest

from tests.conftest import run_main, snapshot


def assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('args,fragments', [
    # the message as written, not its repr (no escaped quotes)
    (['--config.model.moe.num_expert=4'], ["('num_expert' Did you mean \"num_experts\""]),
    (['--config=configs/does_not_exist.py'], ['configs/does_not_exist.py']),
    # (a bad router setting: test_a_refused_run_leaves_its_workdir_as_it_was)
    (['--config.model.moe.num_experts=0'], ["model.moe_layers='none'"]),
])
def test_config_mistakes_end_in_one_line_and_write_nothing(tmp_path, args, fragments):
  workdir = tmp_path / 'run'
  proc = run_main(['--config=configs/tiny.py', f'--workdir={workdir}', *args], timeout=180)
  assert_one_line_error(proc, *fragments)
  assert not workdir.exists()


@pytest.mark.parametrize('args,fragments', [
    (['--config.init_from={tmp}/no_such_run'], ['init_from=', 'holds no checkpoint']),
    (['--config.model.moe.top_k.k=9', '--config.model.moe.router=top_k'],
     ['config.model.moe.top_k.k=9']),
])
@pytest.mark.parametrize('existing', [False, True])
def test_a_refused_run_leaves_its_workdir_as_it_was(tmp_path, args, fragments, existing):
  workdir = tmp_path / 'run'
  if existing:  # a directory the user made, with a file of theirs in it
    workdir.mkdir()
    (workdir / 'notes.txt').write_text('mine')
  before = snapshot(workdir)
  proc = run_main(['--config=configs/tiny.py', f'--workdir={workdir}',
                   *[a.format(tmp=tmp_path) for a in args]], timeout=180)
  assert_one_line_error(proc, *fragments)
  assert snapshot(workdir) == before


@pytest.mark.parametrize('make,fragment', [
    (lambda p: p.write_text('x'), 'is a file, not a directory'),
    (lambda p: (p.parent / 'file').write_text('x'), 'cannot be created'),
])
def test_a_workdir_that_cannot_hold_a_run_is_one_line(tmp_path, make, fragment):
  workdir = tmp_path / 'run'
  make(workdir)
  target = workdir if workdir.exists() else tmp_path / 'file' / 'run'
  proc = run_main(['--config=configs/tiny.py', f'--workdir={target}'], timeout=180)
  assert_one_line_error(proc, fragment)


def test_a_read_only_workdir_is_refused_before_anything_runs(tmp_path, monkeypatch):
  from dynmoe_jax.train import compat
  # root may write a chmod-555 directory, so the read-only file system is simulated
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(tmp_path)
                      else real_access(p, mode))
  with pytest.raises(compat.WorkdirError, match='cannot be written: .* read-only'):
    compat.check_workdir(str(tmp_path / 'run'))


def test_a_dataset_that_is_not_prepared_is_one_line_and_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'run'
  proc = run_main(['--config=configs/tiny.py', f'--workdir={workdir}',
                   '--config.data.name=cifar10', f'--config.data.data_dir={tmp_path / "data"}'],
                  timeout=180)
  assert_one_line_error(proc, "'cifar10' is not prepared as array_record",
                        'tfds build cifar10 --file_format=array_record')
  assert 'already prepared' not in proc.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_log_lines_never_share_a_line_with_the_progress_bar(tmp_path):
  proc = run_main(['--config=configs/lm_tiny.py', f'--workdir={tmp_path}',
                   '--config.progress_bar=True', '--config.eval_every=10'], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  eval_lines = [l for l in re.split(r'[\r\n]', proc.stderr) if ' INFO eval step' in l]
  assert len(eval_lines) == 2, proc.stderr[-3000:]
  for line in eval_lines:
    assert line.split(' INFO ')[0].count('it/s') == 0, line  # nothing of the bar before it
  assert 'np.float64' not in proc.stderr
