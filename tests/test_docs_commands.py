"""Every command the README, docs/ and experiments/results/ give is well-formed: its make
target exists; a training command's flags parse and its config, with every override,
validates; an experiment's arguments parse and name routers, tasks and runs the script has
(tests/docs_commands_worker.py). Commands with placeholders a reader fills in are listed
apart. The README's example, the upcycling commands, the NNX example and device_check
--smoke are also run as written, at small sizes (test_readme.py, test_nnx_layers.py,
test_experiments.py)."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DOCS = ('README.md', 'docs/*.md', 'experiments/results/*.md')
# A word a reader replaces before running the command.
# What a reader fills in, filled in (then the rest of the command is checked) ...
FILLED_IN = (('--config=CONFIG', '--config=configs/tiny.py'), ('CHIP[-N]', 'v5e-8'),
             ('$HOST0', 'localhost'), ('=$N', '=2'), ('=$I', '=0'),
             ('gs://$BUCKET', '/tmp/bucket'), ('=DIR', '=/tmp/run'), ('.seed=N', '.seed=1'))
# ... and what is left of a placeholder: not checked.
PLACEHOLDERS = re.compile(r'\$|\.\.\.')
# Installing and logging in: what `make` does here, or a TPU VM's own set-up.
SETUP = ('gcloud ', 'cd ', 'pip ', '.venv/bin/pip ')
MAKE_TARGETS = ('install', 'train', 'test', 'test-fast', 'bench', 'clean')


def documented_commands():
  """(where, command) for each command line of a bash block and each inline command."""
  found = []
  for pattern in DOCS:
    for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
      text = open(path).read()
      where = os.path.relpath(path, ROOT)
      for block in re.findall(r'```(?:bash|sh)\n(.*?)```', text, flags=re.S):
        for line in shell_lines(block):
          found.extend((where, part.strip()) for part in remote_commands(line))
      for span in re.findall(r'`((?:make |python |\.venv/bin/python )[^`]*)`', text):
        found.append((where, ' '.join(span.split())))
  return found


def shell_lines(block: str):
  """A bash block's commands: continuations and lines inside an open quote joined,
  comments dropped."""
  pending = ''
  for line in block.replace('\\\n', ' ').splitlines():
    line = f"{pending} {re.sub(r'[ ]+#.*$', '', line)}".strip()
    if line.count('"') % 2:
      pending = line
      continue
    pending = ''
    if line and not line.startswith('#'):
      yield line.strip()


def remote_commands(line: str):
  """`gcloud ... --command="a && b"`: the commands it runs there (a, b); else the line."""
  match = re.match(r'gcloud .*--command="(.*)"$', line)
  return [line] if match is None else match.group(1).split('&&')


def classify(where, line):
  """{where, kind, argv} of a command this file checks, or (kind, reason) of one it does not."""
  for placeholder, value in FILLED_IN:
    line = line.replace(placeholder, value)
  if PLACEHOLDERS.search(line):
    return 'placeholder', line
  if line.startswith(SETUP):
    return 'setup', line
  words = shlex.split(line)
  if words[0] == 'make':
    assert words[1] in MAKE_TARGETS, (where, line)
    if words[1] != 'train':
      return 'make', line
    settings = dict(w.split('=', 1) for w in words[2:])
    argv = [f"--config={settings.get('CONFIG', 'configs/mnist1d_dynmoe.py')}",
            *shlex.split(settings.get('ARGS', ''))]
    return {'where': where, 'kind': 'main', 'argv': argv}
  if words[0] in ('python', '.venv/bin/python'):
    if words[1:3] == ['-m', 'dynmoe_jax.main']:
      return {'where': where, 'kind': 'main', 'argv': words[3:]}
    if words[1:3] == ['-m', 'dynmoe_jax.sample']:
      return {'where': where, 'kind': 'sample', 'argv': words[3:]}
    if words[1].startswith('experiments/') and words[1].endswith('.py'):
      return {'where': where, 'kind': os.path.basename(words[1])[:-3], 'argv': words[2:]}
  return 'other', line


def checked(commands, tmp_path, name):
  path = tmp_path / f'{name}.json'
  path.write_text(json.dumps(commands))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'docs_commands_worker.py'),
                         str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_documented_command_parses_and_its_config_validates(tmp_path):
  commands, others = [], []
  for where, line in documented_commands():
    kind = classify(where, line)
    (commands if isinstance(kind, dict) else others).append(kind)
  by_kind = {}
  for command in commands:
    by_kind.setdefault(command['kind'], []).append(command)
  # The extraction still finds what the docs hold (a broken pattern would pass vacuously).
  assert len(by_kind['main']) >= 25 and len(by_kind['compare_routers']) >= 10, (
      {k: len(v) for k, v in by_kind.items()})
  assert {'sample', 'mnist1d_experts', 'bench_layer', 'device_check'} <= set(by_kind)
  assert [line for kind, line in others if kind == 'other'] == []
  assert checked(commands, tmp_path, 'documented') == []


def test_a_broken_command_is_reported(tmp_path):
  problems = checked([
      {'where': 'x.md', 'kind': 'main', 'argv': ['--config=configs/tiny.py',
                                                 '--config.model.moe.top_k.k=0']},
      {'where': 'x.md', 'kind': 'main', 'argv': ['--config=configs/tiny.py',
                                                 '--config.model.no_such_field=1']},
      {'where': 'x.md', 'kind': 'compare_routers', 'argv': ['--routers', 'top2,top9']},
      {'where': 'x.md', 'kind': 'bench_layer', 'argv': ['--no_such_flag']},
      {'where': 'x.md', 'kind': 'mnist1d_experts', 'argv': ['--runs', 'dense,nope']},
  ], tmp_path, 'broken')
  assert len(problems) == 5, problems
  assert 'top_k.k' in problems[0] and 'no_such_field' in problems[1]
  assert "'top9'" in problems[2] and "'nope'" in problems[4]


@pytest.mark.parametrize('line,kind', [
    ('make train CONFIG=configs/lm_base.py', 'main'),
    ("python -m dynmoe_jax.sample --workdir=DIR --prompt='x'", 'sample'),  # DIR filled in
    ('.venv/bin/python -m dynmoe_jax.main ...', 'placeholder'),
    ('make test', 'make')])
def test_commands_are_classified(line, kind):
  got = classify('x.md', line)
  assert (got['kind'] if isinstance(got, dict) else got[0]) == kind
