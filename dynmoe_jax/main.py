"""Entry point: python -m dynmoe_jax.main --config=configs/mnist1d_dynmoe.py --workdir=DIR

Any config field can be overridden: --config.model.moe.router=top_k.
Multi-host: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
variables); on Cloud TPU `--multihost` alone lets JAX discover the slice.

A mistake of the user's (a bad config file, field or value, a dataset that is not
prepared, a workdir that holds another run) ends with one line on stderr and exit
code 2, before anything is written.
"""
import ast
import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mnist1d_dynmoe.py',
                                          'ml_collections config file')
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, plots)')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'estimate memory and step time on --target and '
                             'lower the step for it, on fake CPU devices; no data, nothing written')
_TARGET = flags.DEFINE_string('target', 'v5e', 'chip for --dry_run: v5e, v5p, v6e, h100, h200, '
                              'optionally with a count (v5e-8)')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize()')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process index')
_CPU_COLLECTIVES = flags.DEFINE_string('cpu_collectives', None,
                                       "CPU collectives for multi-process CPU runs: 'gloo'")


def one_line(error: BaseException) -> str:
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  # ml_collections puts the repr of its message in a KeyError's message: unwrap it
  while len(text) > 1 and text[0] == text[-1] and text[0] in '"\'':
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  return ' '.join(text.replace('\\n', ' ').split())


def fail(message: str):
  sys.stderr.write(f'error: {message}\n')
  sys.exit(2)


def parse_flags(argv):
  """absl's parsing, with config-file and override errors as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(one_line(e))
  except (AttributeError, KeyError) as e:  # an override names a field the config lacks
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    fail(f'a --config override names no field of the config ({one_line(e)}); '
         f'overrides given: {overrides}')
  except (OSError, ValueError, TypeError) as e:  # config file missing, bad value or type
    fail(one_line(e))


class TqdmHandler(logging.Handler):
  """Log lines above the progress bar, never appended to it."""

  def emit(self, record):
    from tqdm import tqdm
    try:
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001  logging must not raise
      self.handleError(record)


def setup_logging():
  # orbax logs every save at absl INFO and tfds warns about the directories it probes:
  # keep the terminal for the progress bar and our own log (logger 'dynmoe_jax').
  absl_logging.set_verbosity(absl_logging.ERROR)
  handler = TqdmHandler()
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  ours = logging.getLogger('dynmoe_jax')
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False


def initialize_distributed():
  import jax
  coordinator = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if _CPU_COLLECTIVES.value:
    jax.config.update('jax_cpu_collectives_implementation', _CPU_COLLECTIVES.value)
  if _MULTIHOST.value or coordinator:
    num = _NUM_PROCESSES.value or (int(os.environ['JAX_NUM_PROCESSES'])
                                   if 'JAX_NUM_PROCESSES' in os.environ else None)
    pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else (
        int(os.environ['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in os.environ else None)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)


def dry_run(config):
  """--dry_run: fake CPU devices for the target's chips, then the estimate; exit 2 with one
  line where the config does not fit or lower."""
  import jax
  from dynmoe_jax import config_lib, dryrun
  try:
    chip, count = dryrun.parse_target(_TARGET.value)
    devices = dryrun.devices_needed(config, count)
    # before anything starts a backend; a host with an accelerator estimates on its CPU too
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', devices)
    config_lib.validate(config)
    print(dryrun.report(dryrun.analyse(config, os.path.basename(_CONFIG_PATH()), chip, devices)))
  except (dryrun.DryRunError, config_lib.ConfigError) as e:
    fail(one_line(e))


def _CONFIG_PATH() -> str:  # noqa: N802  the --config flag's file, without its overrides
  return config_flags.get_config_filename(flags.FLAGS['config'])


def main(argv):
  del argv
  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags reports a file it could not load on first access
  except (OSError, AttributeError, KeyError, ValueError, TypeError) as e:
    fail(one_line(e))
  if _DRY_RUN.value:
    return dry_run(config)
  if not _WORKDIR.value:
    fail('--workdir is required (a run directory; --dry_run needs none)')
  setup_logging()
  initialize_distributed()
  import jax
  from dynmoe_jax import checkpointing, config_lib, train, upcycle
  from dynmoe_jax.data import pipeline
  from dynmoe_jax.train import compat
  user_errors = (config_lib.ConfigError, checkpointing.ModelMismatchError,
                 pipeline.DatasetNotFoundError, pipeline.SplitError, upcycle.UpcycleError,
                 compat.WorkdirError)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except user_errors as e:
    fail(one_line(e))
  except OSError as e:  # the machine's, not the config's: a full disk, a vanished mount
    where = f' ({e.filename})' if e.filename else ''
    fail(f'{e.strerror or one_line(e)}{where}. Checkpoints already saved are intact: '
         'rerun the same command to resume once that is fixed.')
  if jax.process_index() == 0:
    path = os.path.join(_WORKDIR.value, 'result.json')
    with open(path, 'w') as f:
      json.dump(result, f, indent=2, default=float)
    print(summary_line(result, path))


def summary_line(result, path: str) -> str:
  figures = ', '.join(f'{k} {v:.4g}' for k, v in result['eval'].items()
                      if k in ('loss', 'accuracy', 'bits_per_byte') and isinstance(v, float))
  return (f"{result['status']} at step {result['step']}: eval {figures or 'none'}; experts "
          f"per layer {result['experts_per_layer']} (all figures: {path})")


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
