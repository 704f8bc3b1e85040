"""The default job on 1, 2, 4 and 8 (simulated CPU) devices with the GSPMD ('sort') and the
explicit expert-parallel ('shard_map_a2a') paths: does it run, and are its eval figures
those of one device?

Two questions, each cell in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=N and the default config's own
eval_batch_size (500: padded to what the mesh splits):
  * train: `python -m dynmoe_jax.main` for --steps steps on that mesh and path. Training
    itself sums in another order on each mesh, so its figures drift apart a little;
  * eval: the 1-device run's final checkpoint evaluated on that mesh and path: the same
    parameters must give the same figures.
Prints both tables and writes OUT/results.json and OUT/mesh_matrix.png.

  python experiments/mesh_matrix.py                 # 100 steps per cell, ~5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common
from dynmoe_jax import plots

# devices -> (mesh.data, mesh.expert): the expert axis as wide as the default's 4 experts
MESHES = {1: (1, 1), 2: (1, 2), 4: (1, 4), 8: (2, 4)}
IMPLS = ('sort', 'shard_map_a2a')
FIGURES = ('loss', 'accuracy', 'moe/layer_1/active_experts', 'moe/layer_3/active_experts',
           'moe/layer_1/dropped_fraction', 'moe/layer_3/dropped_fraction')


def run_cell(workdir: str, devices: int, impl: str, steps: int) -> dict:
  data, expert = MESHES[devices]
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  proc = subprocess.run(
      [sys.executable, '-m', 'dynmoe_jax.main', '--config=configs/mnist1d_dynmoe.py',
       f'--workdir={workdir}', f'--config.num_train_steps={steps}',
       f'--config.eval_every={steps}', '--config.progress_bar=False',
       f'--config.mesh.data={data}', f'--config.mesh.expert={expert}',
       f'--config.model.moe.dispatch_impl={impl}'],
      cwd=common.ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    return {'ok': False, 'error': proc.stderr.strip().splitlines()[-1]}
  rows = plots.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  final = [r for r in rows if r['split'] == 'eval'][-1]
  return {'ok': True, **{k: final[k] for k in FIGURES}}


def evaluate_checkpoint(workdir: str, impl: str) -> dict:
  """Run in the cell's process: the run's newest checkpoint, evaluated on this mesh."""
  import jax
  import ml_collections
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  data, expert = MESHES[jax.device_count()]
  config.mesh.data, config.mesh.expert = data, expert
  config.model.moe.dispatch_impl = impl
  trainer, state = common.restored(config, workdir)
  with common.mesh_of(trainer):
    figures = trainer.evaluate(state)
  return {k: figures[k] for k in FIGURES}


def eval_cell(workdir: str, devices: int, impl: str) -> dict:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--evaluate', workdir,
                         '--impl', impl], cwd=common.ROOT, env=env, capture_output=True,
                        text=True)
  if proc.returncode:
    return {'ok': False, 'error': proc.stderr.strip().splitlines()[-1]}
  return {'ok': True, **json.loads(proc.stdout.strip().splitlines()[-1])}


def table(title: str, cells: dict, reference: dict) -> dict:
  worst = {}
  print(f'\n{title}\n| path | devices | mesh (data, expert) | ' + ' | '.join(FIGURES) +
        ' | largest difference from sort on 1 device |')
  print('|' + '---|' * (len(FIGURES) + 4))
  for name, cell in cells.items():
    impl, n = name.split()
    if not cell['ok']:
      print(f'| {impl} | {n} | {MESHES[int(n)]} | failed: {cell["error"]} |')
      continue
    worst[name] = max(abs(cell[k] - reference[k]) for k in FIGURES)
    print(f'| {impl} | {n} | {MESHES[int(n)]} | ' + ' | '.join(f'{cell[k]:.4f}' for k in FIGURES)
          + f' | {worst[name]:.2e} |')
  return worst


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--evaluate', help='(internal) evaluate this workdir on this process')
  parser.add_argument('--impl', default='sort')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--out', default=common.scratch_out('mesh_matrix'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  if args.evaluate:
    print(json.dumps(evaluate_checkpoint(args.evaluate, args.impl)))
    return None
  devices = [int(d) for d in args.devices.split(',')]
  trained, evaluated = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in IMPLS:
      for n in devices:
        name = f'{impl} {n}'
        trained[name] = run_cell(os.path.join(tmp, f'{impl}_{n}'), n, impl, args.steps)
        print(f'trained: {impl} on {n} devices: {trained[name]}', flush=True)
    reference_run = os.path.join(tmp, f'sort_{devices[0]}')
    for impl in IMPLS:
      for n in devices:
        evaluated[f'{impl} {n}'] = eval_cell(reference_run, n, impl)
        print(f'evaluated: {impl} on {n} devices: {evaluated[f"{impl} {n}"]}', flush=True)
  reference = trained[f'sort {devices[0]}']
  worst_trained = table(f'Trained {args.steps} steps on each mesh:', trained, reference)
  worst = table('The 1-device checkpoint evaluated on each mesh:', evaluated, reference)
  common.save_json(os.path.join(args.out, 'results.json'),
                   {'steps': args.steps, 'trained': trained, 'evaluated': evaluated,
                    'max_abs_difference_trained': worst_trained,
                    'max_abs_difference_evaluated': worst})
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  names = list(worst_trained)
  x = list(range(len(names)))
  ax.bar([i - 0.2 for i in x], [max(worst_trained[n], 1e-9) for n in names], 0.4,
         label=f'trained {args.steps} steps on the mesh')
  ax.bar([i + 0.2 for i in x], [max(worst.get(n, 0), 1e-9) for n in names], 0.4,
         label='1-device checkpoint evaluated on the mesh')
  ax.set_yscale('log')
  ax.set_xticks(x, names, rotation=30, ha='right', fontsize=8)
  ax.set_ylabel('largest |eval figure - 1 device|')
  ax.set_title('default job: eval figures vs one device (sort); 1e-9 = equal', fontsize=9)
  ax.legend(fontsize=7)
  plots.save_figure(fig, os.path.join(args.out, 'mesh_matrix.png'), dpi=110)
  return {'trained': trained, 'evaluated': evaluated}


if __name__ == '__main__':
  main()
