"""Entry point: python -m dynmoe_jax.main --config=configs/mnist1d_dynmoe.py --workdir=DIR

Any config field can be overridden: --config.model.moe.router=top_k.
Multi-host: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
variables); on Cloud TPU `--multihost` alone lets JAX discover the slice.
"""
import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/mnist1d_dynmoe.py',
                                          'ml_collections config file')
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics, plots)',
                               required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize()')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process index')
_CPU_COLLECTIVES = flags.DEFINE_string('cpu_collectives', None,
                                       "CPU collectives for multi-process CPU runs: 'gloo'")


def main(argv):
  del argv
  # orbax logs every save at absl INFO; keep the terminal for the progress bar and our log.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  ours = logging.getLogger('dynmoe_jax')
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False
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
  from dynmoe_jax import config_lib, train
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  result = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2, default=float))


if __name__ == '__main__':
  app.run(main)
