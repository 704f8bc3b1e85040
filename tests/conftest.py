import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """One XLA compilation cache per test session, shared by the xdist workers and the
  subprocesses they start: many tests build the same small models, and a repeat is a
  cache hit. Every session starts empty, so it compiles everything once, as CI does."""
  if hasattr(config, 'workerinput') or 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return  # an xdist worker inherits the controller's; a user's own cache is kept
  path = tempfile.mkdtemp(prefix='dynmoe-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  config._dynmoe_xla_cache = path
  if 'jax' in sys.modules:  # imported before this hook ran: the env var came too late
    sys.modules['jax'].config.update('jax_compilation_cache_dir', path)


def pytest_unconfigure(config):
  path = getattr(config, '_dynmoe_xla_cache', None)
  if path:
    shutil.rmtree(path, ignore_errors=True)


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
