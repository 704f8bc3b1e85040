"""The commands the README, docs/ and experiments/results/ give: extracted from their bash
blocks and inline code, placeholders a reader fills in filled in, and sorted into what can
be checked or run (training, sampling, experiment scripts) and what cannot (the test suite,
installation, placeholders). Used by experiments/docs_commands.py, which runs them, and by
tests/test_docs_commands.py, which checks their flags."""
from __future__ import annotations

import glob
import os
import re
import shlex
import sys
from typing import Dict, List, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ('README.md', 'docs/*.md', 'experiments/results/*.md')
# What a reader fills in, filled in (then the command is checked, or run) ...
FILLED_IN = (('--config=CONFIG', '--config=configs/tiny.py'), ('CHIP[-N]', 'v5e-8'),
             ('$HOST0', 'localhost'), ('=$N', '=2'), ('=$I', '=0'),
             ('gs://$BUCKET', '/tmp/bucket'), ('=DIR', '=/tmp/run'), ('.seed=N', '.seed=1'))
# ... and what is left of a placeholder: not checked.
PLACEHOLDERS = re.compile(r'\$|\.\.\.')
# Installing and logging in: what `make` does here, or a TPU VM's own set-up.
SETUP = ('gcloud ', 'cd ', 'pip ', '.venv/bin/pip ')
MAKE_TARGETS = ('install', 'train', 'test', 'test-fast', 'bench', 'clean')
NOT_RUN = {'make': 'the test suite (what .ci/run runs)', 'setup': 'installation',
           'placeholder': 'a placeholder, nothing to run', 'docs_commands': 'this runner itself'}


# ----------------------------------------------------------------------------- extraction

def documented_commands() -> List[Tuple[str, str]]:
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


def filled_in(line: str) -> str:
  for placeholder, value in FILLED_IN:
    line = line.replace(placeholder, value)
  return line


def classify(where: str, line: str) -> Union[dict, Tuple[str, str]]:
  """{where, kind, argv} of a command to check or run, or (kind, line) of one not run."""
  line = filled_in(line)
  if PLACEHOLDERS.search(line):
    return 'placeholder', line
  if line.startswith(SETUP):
    return 'setup', line
  words = shlex.split(line)
  if words[0] == 'make':
    assert words[1] in MAKE_TARGETS, (where, line)
    if words[1] != 'train':
      return 'make', line
    settings = make_settings(words)
    argv = [f"--config={settings['CONFIG']}", *shlex.split(settings.get('ARGS', ''))]
    return {'where': where, 'kind': 'main', 'argv': argv}
  if words[0] in ('python', '.venv/bin/python'):
    if words[1:3] == ['-m', 'dynmoe_jax.main']:
      return {'where': where, 'kind': 'main', 'argv': words[3:]}
    if words[1:3] == ['-m', 'dynmoe_jax.sample']:
      return {'where': where, 'kind': 'sample', 'argv': words[3:]}
    if words[1].startswith('experiments/') and words[1].endswith('.py'):
      return {'where': where, 'kind': os.path.basename(words[1])[:-3], 'argv': words[2:]}
  return 'other', line


def make_settings(words: Sequence[str]) -> Dict[str, str]:
  """`make train K=V ...`'s variables, with the Makefile's defaults."""
  settings = dict(w.split('=', 1) for w in words[2:])
  settings.setdefault('CONFIG', 'configs/mnist1d_dynmoe.py')
  settings.setdefault('WORKDIR', f"workdir/{os.path.basename(settings['CONFIG'])[:-3]}")
  return settings


def parsed_config(argv: Sequence[str]):
  """The config `python -m dynmoe_jax.main argv` runs: main's flags, each command in a
  FlagValues of its own (config_flags' overrides do not survive absl's unparse_flags)."""
  import copy
  from absl import flags
  from ml_collections import config_flags
  from dynmoe_jax import main as main_lib
  values = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(main_lib.__name__):
    if flag.name != 'config':
      values[flag.name] = copy.deepcopy(flag)
  default = flags.FLAGS['config'].default_as_str.strip("'")
  config = config_flags.DEFINE_config_file('config', default, flag_values=values)
  old_argv, sys.argv = sys.argv, ['main', *argv]  # config_flags reads its overrides there
  try:
    values(sys.argv)
  finally:
    sys.argv = old_argv
  return config.value

