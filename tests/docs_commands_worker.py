"""Checks documented commands without running them (tests/test_docs_commands.py): each
`dynmoe_jax.main` command's flags parse and its config, with every override, validates;
the arguments of each `dynmoe_jax.sample` command and experiment script parse and name
routers, tasks and runs the script has. Input: a JSON file of {where, kind, argv}; output:
a JSON list of "where: command: problem" lines on stdout. In a process of its own: it
imports main (absl flags are global) and every experiment script."""
import argparse
import contextlib
import importlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'experiments')]

from documented import parsed_config  # noqa: E402


MODULES = {'sample': 'dynmoe_jax.sample'}  # the rest: experiments/<name>.py


class Parsed(Exception):
  def __init__(self, args):
    super().__init__('parsed')
    self.namespace = args


def parsed_script_args(script: str, argv):
  """The argparse namespace `experiments/<script>.py argv` parses to (its main() stops
  right after parsing), or raises SystemExit with argparse's message."""
  module = importlib.import_module(MODULES.get(script, script))
  original = argparse.ArgumentParser.parse_args

  def stop(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))

  argparse.ArgumentParser.parse_args = stop
  old_argv = sys.argv
  sys.argv = [f'{script}.py', *argv]
  try:
    module.main(argv) if _takes_argv(module.main) else module.main()
  except Parsed as done:
    return module, done.namespace
  finally:
    argparse.ArgumentParser.parse_args = original
    sys.argv = old_argv
  raise AssertionError(f'{script}.main() did not parse its arguments')


def _takes_argv(fn) -> bool:
  import inspect
  return bool(inspect.signature(fn).parameters)


def script_problems(script: str, argv):
  module, args = parsed_script_args(script, argv)
  names = {'compare_routers': {'tasks': getattr(module, 'TASKS', ()),
                               'routers': getattr(module, 'ROUTERS', ())}}.get(script, {})
  if script == 'mnist1d_experts':
    names = {'runs': module.run_configs(10, 5, 0)}
  for field, known in names.items():
    for name in getattr(args, field).split(','):
      if name not in known:
        yield f'--{field}: {name!r} is not one of {sorted(known)}'


def main_problems(argv):
  from absl import flags
  from dynmoe_jax import config_lib, dryrun
  try:
    config = parsed_config(argv)
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    yield f'{type(e).__name__}: {e}'
    return
  try:
    config_lib.validate(config, num_devices=dryrun.devices_needed(config, None))
  except config_lib.ConfigError as e:
    yield str(e)


def check(command) -> list:
  kind, argv = command['kind'], command['argv']
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      if kind == 'main':
        return list(main_problems(argv))
      return list(script_problems(kind, argv))
  except SystemExit:
    return stderr.getvalue().strip().splitlines()[-1:] or ['exit']
  except Exception as e:  # noqa: BLE001  reported, with the command, by the test
    return [f'{type(e).__name__}: {e}']


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    commands = json.load(f)
  print(json.dumps([f"{c['where']}: {' '.join(c['argv'])}: {problem}"
                    for c in commands for problem in check(c)]))
