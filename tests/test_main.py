"""dynmoe_jax.main, as a new user meets it: mistakes end in one line and write nothing,
log lines never land on the progress bar."""
import re

import pytest

from tests.conftest import run_main


def assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('args,fragments', [
    (['--config.model.moe.num_expert=4'], ['num_expert', 'num_experts']),
    (['--config=configs/does_not_exist.py'], ['configs/does_not_exist.py']),
    (['--config.model.moe.k=9', '--config.model.moe.router=top_k'],
     ['config.model.moe.k=9']),
    (['--config.model.moe.num_experts=0'], ["model.moe_layers='none'"]),
])
def test_config_mistakes_end_in_one_line_and_write_nothing(tmp_path, args, fragments):
  workdir = tmp_path / 'run'
  proc = run_main(['--config=configs/tiny.py', f'--workdir={workdir}', *args], timeout=180)
  assert_one_line_error(proc, *fragments)
  assert not workdir.exists()


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
