"""Every command the README, docs/ and experiments/results/ give is well-formed: its make
target exists; a training command's flags parse and its config, with every override,
validates; an experiment's arguments parse and name routers, tasks and runs the script has
(tests/docs_commands_worker.py). Commands with placeholders a reader fills in are listed
apart. experiments/docs_commands.py runs every one at small sizes (too long for the suite:
its plan is tested here, and one chain of commands run); the README's example, the
upcycling commands, the NNX example and device_check --smoke run here as written
(test_readme.py, test_nnx_layers.py, test_experiments.py)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
from documented import classify, documented_commands  # noqa: E402


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


@pytest.fixture(scope='module')
def runner():
  import docs_commands
  return docs_commands


def test_every_documented_command_is_run_at_a_small_size_or_said_why_not(runner, tmp_path):
  commands = documented_commands()
  runs, not_run = runner.plan(commands)
  runner.place(runs, str(tmp_path))
  assert [r.problem for r in runs if r.problem] == []
  # every command is run (once: repeats are listed as `also`) or said why not
  assert len(runs) + sum(len(r.also) for r in runs) + len(not_run) == len(commands)
  assert {n['why'] for n in not_run} <= set(runner.NOT_RUN.values())
  for run in runs:
    command = run.command(0, 0)
    # what it writes goes under the scratch folder, never into experiments/results/
    written = [a for a in command if a.startswith(('--workdir=', '--out', 'WORKDIR='))]
    outs = [command[i + 1] for i, a in enumerate(command) if a == '--out']
    for path in [w.split('=', 1)[1] for w in written if '=' in w] + outs:
      assert path.startswith(str(tmp_path)), (run.documented, path)
    if run.kind not in ('main', 'sample') and '--dry_run' not in command:
      assert outs, run.documented
  dry = [r for r in runs if '--dry_run' in r.args]
  assert dry and not [r for r in dry if set(r.args) & set(runner.MAIN_SMALL)]  # as written
  multi, = [r for r in runs if r.processes > 1]
  assert '--cpu_collectives=gloo' in multi.args
  upcycled, = [r for r in runs if 'init_from' in r.documented]
  assert runs.index(upcycled) > min(upcycled.needs)


def test_sizes_replace_the_flags_a_command_gives(runner):
  assert runner.with_sizes(['--tasks', 'lm', '--seeds', '0,1,2', '--preset=cpu_long'],
                           ['--seeds', '0', '--preset', 'smoke']) == [
      '--tasks', 'lm', '--seeds', '0', '--preset', 'smoke']


@pytest.mark.slow
def test_the_runner_trains_lm_small_and_samples_from_it(tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'docs_commands.py'),
                         '--only', 'dynmoe_jax.sample', '--out', str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads((out / 'results.json').read_text())['rows']
  assert [r['documented'].split()[:2] for r in rows] == [
      ['make', 'train'], ['python', '-m']] and all(r['ok'] for r in rows)
  assert (out / 'seconds.png').stat().st_size > 0 and '| ok |' in (out / 'results.md').read_text()
