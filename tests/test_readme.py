"""The documentation's commands and code, run as written (commands at small sizes through
overrides appended to them), so a reader's copy-paste cannot break unnoticed."""
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_main

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
from docs_commands import CLASSIFIER_SMALL, MAIN_SMALL  # noqa: E402
from documented import make_settings, shell_lines  # noqa: E402

SHORT = MAIN_SMALL + CLASSIFIER_SMALL  # the small size docs_commands.py runs MNIST-1D jobs at


def code_blocks(path: str, language: str):
  text = open(os.path.join(ROOT, path)).read()
  return re.findall(rf'```{language}\n(.*?)```', text, flags=re.S)


def test_the_readme_python_example_runs(tmp_path):
  block, = code_blocks('README.md', 'python')
  proc = subprocess.run([sys.executable, '-c', block], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith('loss ') and 'experts per token' in proc.stdout


def make_train_commands(block: str):
  """`make train CONFIG=... WORKDIR=... ARGS="..."` lines -> (config, workdir, args)."""
  commands = []
  for line in shell_lines(block):
    words = shlex.split(line)
    if words[:2] == ['make', 'train']:
      settings = make_settings(words)
      commands.append((settings['CONFIG'], settings['WORKDIR'],
                       shlex.split(settings.get('ARGS', ''))))
  return commands


@pytest.mark.slow
def test_the_manuals_upcycling_commands_run(tmp_path):
  block, = [b for b in code_blocks('docs/guide.md', 'bash') if 'init_from=workdir/dense' in b]
  commands = make_train_commands(block)
  assert len(commands) == 2
  for config, workdir, args in commands:
    # the manual's relative workdirs, under this test's folder
    args = [a.replace('=workdir/', f'={tmp_path}/workdir/') for a in args]
    proc = run_main([f'--config={config}', f'--workdir={tmp_path / workdir}', *args, *SHORT],
                    timeout=600)
    assert proc.returncode == 0, (config, args, proc.stderr[-3000:])
  assert (tmp_path / 'workdir' / 'upcycled' / 'checkpoints' / '6').is_dir()


def test_the_manuals_table_of_router_settings_is_every_routers_defaults():
  from dynmoe_jax import routers
  text = open(os.path.join(ROOT, 'docs/guide.md')).read()
  rows = dict(re.findall(r'^\| `(\w+)` \| `(routers\.\w+\(.*\))` \|$', text, flags=re.M))
  assert set(rows) == set(routers.NAMES)
  for name, expression in rows.items():
    assert eval(expression, {'routers': routers}) == routers.get(name).settings(), name
