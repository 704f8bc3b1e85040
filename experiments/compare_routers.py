"""Router comparison, side by side: dense, top-1, top-2, top-p (two p), DA-MoE,
DynMoE top-any (fixed experts) and DynMoE adaptive, on MNIST-1D and the byte-level
LM corpus; same model size, steps and data; several seeds each.

Phases, all in one command (a rerun skips finished runs and redoes the rest):
  1. train every (task, router, seed) to completion; each run keeps its workdir
     under OUT/runs/ (metrics, checkpoints, plots);
  2. time the train step of every router of a task side by side (seed 0's final
     state, rounds interleaved across routers), reported relative to top-2;
  3. routing analysis of the dynamic routers on the test sets: experts per token
     vs noise level (MNIST-1D variants mnist1d/noise_x2, noise_x4, built locally)
     and vs per-example (MNIST-1D) or per-byte (LM) loss; and experts per token on the
     first examples of the training split (what a compute budget holds);
  4. a markdown table per task, OUT/results.json and PNG plots.

  python experiments/compare_routers.py                    # docs/results.md numbers (2-core CPU, ~60 min)
  python experiments/compare_routers.py --preset full      # GPU/TPU size
  python experiments/compare_routers.py --tasks mnist1d --routers dense,top2,dynmoe --seeds 0
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from typing import Any, Dict, List

import jax
import numpy as np

import common
from dynmoe_jax import names, train
from dynmoe_jax.data import pipeline
# phase 4 (rows, tables, plots) is router_report's; the routers and presets router_variants'
from router_report import (aggregate, difficulty_summary, markdown_table, split_summary,
                           write_plots)
from router_variants import (DYNAMIC, LOSS_BINS, NOISE_DATASETS, PRESETS, ROUTERS, TASKS,
                             make_config, moe_blocks)
# ----------------------------------------------------------------------------- phase 1

def expert_params_per_token(config, active: Dict[str, float], blocks: int) -> float:
  """FFN weights a token multiplies by in the MoE blocks (dense: the same blocks' FFN)."""
  m = config.model
  if not active:
    return float(blocks * 2 * m.dim * m.mlp_dim)
  per_expert = (3 if m.moe.glu else 2) * m.dim * m.moe.hidden_dim
  return float(sum(active.values()) * per_expert)


def summarize_run(config, workdir: str, blocks: int) -> Dict[str, Any]:
  summary = common.run_summary(workdir)
  summary['expert_params_per_token'] = expert_params_per_token(
      config, summary['active_experts'], blocks)
  if not summary['active_experts']:  # dense: its FFNs in the same blocks, 2 FLOPs per weight
    summary['activated_flops_per_token'] = summary['train_computed_flops_per_token'] = \
        2 * summary['expert_params_per_token']
  return summary


def say(line: str):
  sys.stdout.write(line + '\n')  # one write: lines from worker threads stay whole
  sys.stdout.flush()


def run_dir(args, task: str, router: str, seed: int) -> str:
  return os.path.join(args.out, 'runs', task, router, f'seed_{seed}')


def train_one(args, task: str, router: str, seed: int) -> Dict[str, Any]:
  workdir = run_dir(args, task, router, seed)
  config = make_config(task, router, seed, args.preset)
  start = time.perf_counter()
  train.Trainer(config, workdir).run()
  summary = summarize_run(config, workdir, moe_blocks(task, args.preset))
  summary['seconds'] = time.perf_counter() - start
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def train_all(args) -> Dict[str, Dict[str, List[Dict]]]:
  """Trains the runs without a summary.json, `--jobs` at a time (each in its own
  process: one JAX process keeps about 1.5 of 2 CPU cores busy on these models)."""
  todo = [(t, r, s) for t in args.tasks for r in args.routers for s in args.seeds
          if not os.path.exists(os.path.join(run_dir(args, t, r, s), 'summary.json'))]

  def launch(index_and_run):
    index, (task, router, seed) = index_and_run
    say(f'[{index + 1}/{len(todo)}] {task} {router} seed {seed}')
    if args.jobs == 1:
      summary = train_one(args, task, router, seed)
    else:
      summary = common.run_in_process(
          [os.path.abspath(__file__), '--preset', args.preset, '--tasks', task, '--routers',
           router, '--seeds', str(seed), '--out', args.out, '--train_only', '--jobs', '1'],
          run_dir(args, task, router, seed), f'{task} {router} seed {seed}')
    say(f"    {task} {router} seed {seed}: {summary['metric']} {summary['value']:.4f}, "
        f"active experts {summary['active_experts']}, {summary['seconds']:.0f}s")

  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    list(pool.map(launch, enumerate(todo)))
  runs: Dict[str, Dict[str, List[Dict]]] = {}
  for task in args.tasks:
    for router in args.routers:
      for seed in args.seeds:
        with open(os.path.join(run_dir(args, task, router, seed), 'summary.json')) as f:
          runs.setdefault(task, {}).setdefault(router, []).append(json.load(f))
  return runs


# ----------------------------------------------------------------------------- phase 2


def time_train_steps(args, task: str) -> Dict[str, float]:
  """Steps/s of each router's compiled train step (seed 0's final state), measured in
  interleaved rounds; the median round counts."""
  steppers = {}
  for router in args.routers:
    config = make_config(task, router, args.seeds[0], args.preset)
    trainer, state = common.restored(config, run_dir(args, task, router, args.seeds[0]))
    steppers[router] = common.train_stepper(trainer, state, args.timing_steps)
  return common.steps_per_second(common.interleaved_seconds(steppers, args.timing_rounds),
                                 args.timing_steps)


# ----------------------------------------------------------------------------- phase 3


def per_token_experts(trainer, params, moe_controls, batch):
  """Forward pass in eval mode: (logits, {layer: int[B, S] experts per token})."""
  model = trainer.compiled.model
  inputs = train.model_inputs(batch, trainer.config.model.task)
  (logits, _), state = model.apply({'params': params}, inputs, training=False,
                                   moe_controls=moe_controls, mutable=['intermediates'])
  counts = {name: state['intermediates'][name]['moe']['active_experts_per_token']
            for name in names.moe_layer_names(trainer.compiled.layout.experts)}
  return logits, counts


def routing_analysis(config, workdir: str) -> Dict[str, Any]:
  """Experts per token against difficulty for one finished run."""
  trainer, state = common.restored(config, workdir)
  task = config.model.task

  @jax.jit
  def forward(params, moe_controls, batch):
    logits, counts = per_token_experts(trainer, params, moe_controls, batch)
    return logits, counts, train.example_losses(logits, batch, task)[0]

  d = config.data

  def source_of(name: str, split: str = d.eval_split):
    return pipeline.get_source(name, split, d.data_dir)

  def pass_over(source):
    """Per-example (classify) or per-byte (lm) loss, correctness and experts per token."""
    losses, correct, experts = [], [], []
    with common.mesh_of(trainer):
      for batch in pipeline.eval_batches(source, trainer.preprocess, config.eval_batch_size):
        keep = batch.pop('mask') > 0
        logits, counts, loss = jax.device_get(
            forward(state.params, trainer.compiled.layer_controls(state), batch))
        layer_counts = np.stack([counts[n] for n in sorted(counts, key=names.layer_index)],
                                -1)  # [B, S, L]
        if task == 'classify':
          losses.append(np.asarray(loss)[keep])
          correct.append((logits.argmax(-1) == batch['labels'])[keep])
          experts.append(layer_counts.mean(1)[keep])  # [B, L]: mean over the signal's tokens
        else:
          targets = batch['inputs'][:, 1:]
          valid = (targets > 0) & keep[:, None]
          losses.append(np.asarray(loss)[valid])
          correct.append((logits.argmax(-1) == targets)[valid])
          experts.append(layer_counts[valid])  # [N, L]: the token predicting that byte
    return np.concatenate(losses), np.concatenate(correct), np.concatenate(experts, 0)

  out: Dict[str, Any] = {'layers': names.moe_layer_names(trainer.compiled.layout.experts)}
  test_source = source_of(d.name)
  losses, _, experts = pass_over(test_source)
  edges = np.quantile(losses, np.linspace(0, 1, LOSS_BINS + 1))
  bins = np.clip(np.searchsorted(edges, losses, side='right') - 1, 0, LOSS_BINS - 1)
  out['loss_bins'] = [{
      'median_loss': float(np.median(losses[bins == b])),
      'experts_per_token': experts[bins == b].mean(0).tolist(),
      'count': int((bins == b).sum())} for b in range(LOSS_BINS)]
  out['test_experts_per_token'] = experts.mean(0).tolist()
  # as many training examples as the test split has: routing where a budget holds it
  train_slice = f'train[:{len(test_source)}]'
  out['train_slice'] = train_slice
  out['train_slice_experts_per_token'] = pass_over(
      source_of(d.name, train_slice))[2].mean(0).tolist()
  if task == 'classify' and d.name == 'mnist1d':
    out['noise'] = []
    for multiplier, name in NOISE_DATASETS.items():
      _, correct, noisy_experts = pass_over(source_of(name))
      out['noise'].append({'noise_multiplier': multiplier, 'accuracy': float(correct.mean()),
                           'experts_per_token': noisy_experts.mean(0).tolist()})
  return out


# ----------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='cpu', choices=sorted(PRESETS))
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--routers', default=','.join(ROUTERS))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--timing_rounds', type=int, default=5)
  parser.add_argument('--timing_steps', type=int, default=20)
  parser.add_argument('--jobs', type=int, default=2, help='training runs at a time')
  parser.add_argument('--plots_only', action='store_true',
                      help='redraw the PNGs from OUT/results.json, nothing else')
  parser.add_argument('--train_only', action='store_true',
                      help='phase 1 only (the per-run worker of --jobs > 1)')
  parser.add_argument('--out', default=common.scratch_out('compare_routers'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  args.tasks = args.tasks.split(',')
  args.routers = args.routers.split(',')
  args.seeds = [int(s) for s in args.seeds.split(',')]
  unknown = ([t for t in args.tasks if t not in TASKS]
             + [r for r in args.routers if r not in ROUTERS])
  if unknown:
    parser.error(f'unknown tasks/routers {unknown}; tasks: {TASKS}, routers: {ROUTERS}')
  os.makedirs(args.out, exist_ok=True)
  if args.plots_only:
    with open(os.path.join(args.out, 'results.json')) as f:
      return write_plots(json.load(f), args.out)
  # Seeds of one router compile the same programs: the persistent cache skips the repeats.
  jax.config.update('jax_compilation_cache_dir', os.path.join(args.out, 'runs', '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

  start = time.perf_counter()
  runs = train_all(args)
  train_seconds = time.perf_counter() - start
  if args.train_only:
    return runs
  results: Dict[str, Any] = {'preset': args.preset, 'seeds': args.seeds,
                             'train_seconds': train_seconds, 'tasks': {}}
  for task in args.tasks:
    print(f'timing {task} train steps side by side', flush=True)
    steps_per_sec = time_train_steps(args, task) if 'top2' in args.routers else {}
    analysis = {}
    for router in args.routers:
      if router in DYNAMIC:
        print(f'routing analysis {task} {router}', flush=True)
        analysis[router] = [routing_analysis(
            make_config(task, router, seed, args.preset),
            run_dir(args, task, router, seed)) for seed in args.seeds]
    config = make_config(task, 'dynmoe', args.seeds[0], args.preset)
    results['tasks'][task] = {
        'num_train_steps': config.num_train_steps,
        'steps_per_sec': steps_per_sec,
        'rows': aggregate(runs[task], steps_per_sec, analysis)}
  results['total_seconds'] = time.perf_counter() - start
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  tables = [markdown_table(task, results['tasks'][task]['rows']) for task in args.tasks]
  splits = split_summary(results)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write('\n\n'.join(tables) + '\n\n' + splits + '\n')
  print('\n\n'.join(tables))
  print('\n' + splits)
  print('\n' + difficulty_summary(results))
  written = write_plots(results, args.out)
  print(f"\ntrain phase {train_seconds / 60:.1f} min, total {results['total_seconds'] / 60:.1f} "
        f'min; wrote results.json, results.md, ' + ', '.join(os.path.basename(p) for p in written))
  return results

if __name__ == '__main__':
  main()
