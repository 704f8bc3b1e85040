import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's CPU backend at LLVM -O0, and its older (non-"fusion emitter") kernel emitters: the
# same HLO passes, less compile time on the suite's small programs, which compile for longer
# than they run. The tiny job's train step: 8.7 s to compile at the defaults, 4.9 s at -O0;
# its XLA compile alone 2.6-3.8 s at -O0 and 1.1-1.9 s with the older emitters as well
# (three runs each, interleaved). Tests compare runs made under the same flags; the
# subprocesses inherit them (xla_flags()).
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')


def xla_flags(devices: int) -> dict:
  """The env of a subprocess with `devices` CPU devices, keeping the suite's XLA flags."""
  kept = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                  if not f.startswith('--xla_force_host_platform_device_count'))
  return {'XLA_FLAGS': f'{kept} --xla_force_host_platform_device_count={devices}'.strip()}


def pytest_configure(config):
  """Per test session, shared by the xdist workers and the subprocesses they start:
  - a temporary tfds data dir, so the suite never writes into the user's
    ~/tensorflow_datasets (the local data sets are generated there once per session);
  - one XLA compilation cache: many tests build the same small models, and a repeat is
    a cache hit. Every session starts empty, so it compiles everything once, as CI does."""
  if hasattr(config, 'workerinput'):
    return  # an xdist worker inherits the controller's environment
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *known_xla_flags(
      FAST_COMPILE)]).strip()
  data_dir = tempfile.mkdtemp(prefix='dynmoe-test-tfds-')
  os.environ['TFDS_DATA_DIR'] = data_dir
  config._dynmoe_tfds = data_dir
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return  # a user's own cache is kept
  path = tempfile.mkdtemp(prefix='dynmoe-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  config._dynmoe_xla_cache = path
  if 'jax' in sys.modules:  # imported before this hook ran: the env var came too late
    sys.modules['jax'].config.update('jax_compilation_cache_dir', path)


def known_xla_flags(candidates):
  """The candidates this jaxlib's XLA accepts (an unknown XLA flag aborts the process, and
  XLA renames its flags between releases): each is tried in a subprocess."""
  import subprocess

  def accepted(flags):
    return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                          capture_output=True, timeout=300,
                          env={**os.environ, 'XLA_FLAGS': ' '.join(flags)}).returncode == 0

  if accepted(candidates):  # one probe in the usual case
    return list(candidates)
  return [flag for flag in candidates if accepted([flag])]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  for attribute in ('_dynmoe_xla_cache', '_dynmoe_tfds'):
    path = getattr(config, attribute, None)
    if path:
      shutil.rmtree(path, ignore_errors=True)
  if hasattr(config, 'workerinput'):
    # An xdist worker has sent its results (its 'workerfinished' went out, flushed, in
    # pytest_sessionfinish). What is left is the interpreter's teardown, which frees the
    # thousands of XLA executables the worker compiled one by one: seconds at the end of
    # every run, for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def snapshot(directory):
  """Every path under `directory` with its bytes (None for a directory; None for the whole
  when it does not exist): what a refused or read-only command must leave as it was."""
  import pathlib
  directory = pathlib.Path(directory)
  if not directory.exists():
    return None
  return {str(p.relative_to(directory)): (None if p.is_dir() else p.read_bytes())
          for p in sorted(directory.rglob('*'))}


def load_config(name: str, *args):
  """get_config() of configs/<name>.py, as config_flags would load it."""
  from dynmoe_jax import config_lib
  return config_lib.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'), *args)


def trained_under_a_budget(router: str, workdir: str, target: float = 1.0, **budget):
  """The tiny job of `router` trained under a budget of `target` experts per token (and
  the other `budget.*` settings given): (the trainer, its last train row)."""
  import json
  from dynmoe_jax import train
  config = load_config('tiny', router)
  config.budget.target_experts_per_token = target
  config.budget.rate = 1.5
  config.budget.update(budget)
  trainer = train.Trainer(config, workdir)
  trainer.run()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return trainer, [r for r in rows if r['split'] == 'train'][-1]


def assert_dispatch_equals_every_expert_on_every_token(router, impl: str, dim: int,
                                                      num_experts: int):
  """A layer of `router` on dispatch path `impl`, with room for every pair, computes what
  running every expert on every token and combining by the router's weights does."""
  import jax
  import numpy as np
  from dynmoe_jax import layers
  from dynmoe_jax.capacity import Capacity
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, dim))
  moe = layers.MoE(num_experts=num_experts, hidden_dim=16, router=router,
                   capacity=Capacity(factor=8.0, eval_factor=8.0), dispatch_impl=impl)
  variables = moe.init(jax.random.PRNGKey(4), x)
  y, _ = moe.apply(variables, x, training=True)
  oracle, _ = moe.clone(dispatch_impl='all_experts_reference').apply(variables, x, training=True)
  np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-6)


def squared_output_grads(moe, params, x):
  """Gradients of sum(y ** 2), y the training output of the layer `moe`, w.r.t. its params;
  jitted (eagerly every op of the backward pass would be a compile of its own)."""
  import jax
  import jax.numpy as jnp
  return jax.jit(jax.grad(
      lambda p: jnp.sum(moe.apply({'params': p}, x, training=True)[0] ** 2)))(params)


def killed_and_resumed(config, workdir: str, kill_after: int):
  """Train in `workdir`, kill the run after step `kill_after` (an exception from the
  step hook, as a crash would), then resume it to the end: (resumed trainer, result)."""
  from dynmoe_jax import train

  def crash(trainer, step):
    if step == kill_after:
      raise RuntimeError('simulated kill')

  with pytest.raises(RuntimeError, match='simulated kill'):
    train.Trainer(config, workdir, on_step=crash).run()
  again = train.Trainer(config, workdir)
  return again, again.run()


@pytest.fixture
def tiny_config():
  return load_config('tiny')


def run_main(args, env=None, timeout=600):
  """Run `python -m dynmoe_jax.main` in a subprocess from the repo root."""
  import subprocess
  full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
  return subprocess.run([sys.executable, '-m', 'dynmoe_jax.main', *args], cwd=ROOT,
                        env=full_env, capture_output=True, text=True, timeout=timeout)
