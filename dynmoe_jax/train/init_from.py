"""`--config.init_from=DIR`: a run's params upcycled from the newest checkpoint of the
dense run in DIR (`dynmoe_jax.upcycle` does the upcycling itself)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict

import ml_collections

from dynmoe_jax import config_lib, routers, upcycle
from dynmoe_jax.train import compat, steps
from dynmoe_jax.upcycle import UpcycleError

log = logging.getLogger('dynmoe_jax')

# Fields that make a dense checkpoint fit an MoE config: everything but the FFNs.
MATCHING_FIELDS = ('model.arch', 'model.task', 'model.stem', 'model.num_layers', 'model.dim',
                   'model.num_heads', 'model.num_classes', 'model.vocab_size', 'model.max_len',
                   'model.pool', 'model.stem_kernel', 'model.stem_stride', 'model.param_dtype',
                   'model.ffn_bias', 'data.kind')


def dense_config(workdir: str, config) -> ml_collections.ConfigDict:
  """The config of the dense run in `workdir`, after checking that it can start `config`."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(checkpoints) or not any(d.isdigit() for d in os.listdir(checkpoints)):
    raise UpcycleError(f'config.init_from={workdir!r} holds no checkpoint (expected '
                       f'{checkpoints}/<step>)')
  if config.model.arch != 'transformer':
    raise UpcycleError(f"config.init_from: upcycling supports model.arch='transformer' so far, "
                       f'not {config.model.arch!r}')
  saved = compat.saved_config(workdir)
  dense = ml_collections.ConfigDict(saved)
  layout = config_lib.experts_layout(dense)
  if any(layout):
    raise UpcycleError(f'config.init_from={workdir!r} holds an MoE model (experts per layer '
                       f'{list(layout)}); upcycling starts from a dense one')
  flat_saved, flat_now = compat.flatten(saved), compat.flatten(compat.config_json(config))
  differ = [f for f in MATCHING_FIELDS if flat_saved.get(f) != flat_now.get(f)]
  if differ:
    raise UpcycleError(f'config.init_from={workdir!r} holds a model that does not fit this '
                       'one: ' + ', '.join(f'{f} (dense: {flat_saved.get(f)!r}, now: '
                                          f'{flat_now.get(f)!r})' for f in differ))
  return dense


def from_checkpoint(config, fresh_params, example_batch, train_batch) -> Dict[str, Any]:
  """What `--config.init_from=DIR` runs: the params of `config`'s MoE model upcycled from
  the newest checkpoint of the dense run in config.init_from.

  fresh_params: the MoE model's fresh init (host arrays); example_batch: a training batch
  (shapes); train_batch(i): global training batch i (top-any's gates are set from the
  dense model's FFN inputs over the first `upcycle.kmeans_batches` of them)."""
  u, task = config.upcycle, config.model.task
  start = time.perf_counter()
  dense = dense_config(config.init_from, config)
  sample = steps.model_inputs({k: v[:1] for k, v in example_batch.items()}, task)
  dense_model, dense_params, dense_step, _ = compat.restore_params(
      config.init_from, dense, sample)
  inputs = None
  if routers.get(config.model.moe.router).upcycle_router is not None:
    inputs = upcycle.router_inputs(dense_model, dense_params,
                                   (steps.model_inputs(train_batch(i), task)
                                    for i in range(u.kmeans_batches)),
                                   upcycle.moe_blocks(fresh_params))
  params = upcycle.upcycle_params(dense_params, fresh_params,
                                  moe_settings=config_lib.moe_kwargs(config),
                                  router_inputs=inputs, partition=u.partition, noise=u.noise,
                                  seed=config.seed, kmeans_iterations=u.kmeans_iterations)
  log.info(
      'upcycled from %s (dense step %d) in %.1fs: every expert a copy of its block\'s FFN%s',
      config.init_from, dense_step, time.perf_counter() - start,
      f' (+ noise {u.noise})' if u.noise else '')
  return params
