import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, *args):
  """get_config() of configs/<name>.py, as config_flags would load it."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@pytest.fixture
def tiny_config():
  return load_config('tiny')


def run_main(args, env=None, timeout=600):
  """Run `python -m dynmoe_jax.main` in a subprocess from the repo root."""
  import subprocess
  full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
  return subprocess.run([sys.executable, '-m', 'dynmoe_jax.main', *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)
