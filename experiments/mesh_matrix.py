"""The default job on 1, 2, 4 and 8 (simulated CPU) devices with the GSPMD ('sort') and the
explicit expert-parallel ('shard_map_a2a') paths: does it run, and are its eval figures
those of one device?

Each cell is `python -m dynmoe_jax.main` in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=N, the default config's own
eval_batch_size (500: padded to what the mesh splits), for --steps steps. Prints a table
and writes OUT/results.json and OUT/mesh_matrix.png.

  python experiments/mesh_matrix.py                 # 100 steps per cell, ~5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--out', default=os.path.join(common.ROOT, 'experiments', 'results',
                                                     'mesh_matrix'))
  args = parser.parse_args(argv)
  devices = [int(d) for d in args.devices.split(',')]
  cells = {}
  with tempfile.TemporaryDirectory() as tmp:
    for impl in IMPLS:
      for n in devices:
        cells[f'{impl} {n}'] = run_cell(os.path.join(tmp, f'{impl}_{n}'), n, impl, args.steps)
        print(f'{impl} on {n} devices: {cells[f"{impl} {n}"]}', flush=True)
  reference = cells[f'sort {devices[0]}']
  worst = {}
  print('\n| path | devices | mesh (data, expert) | ' + ' | '.join(FIGURES) +
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
  common.save_json(os.path.join(args.out, 'results.json'),
                   {'steps': args.steps, 'cells': cells, 'max_abs_difference': worst})
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  names = list(worst)
  ax.bar(range(len(names)), [max(worst[n], 1e-9) for n in names])
  ax.set_yscale('log')
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
  ax.set_ylabel('largest |eval figure - 1 device|')
  ax.set_title(f'default job, {args.steps} steps: eval vs one device (sort)', fontsize=9)
  plots.save_figure(fig, os.path.join(args.out, 'mesh_matrix.png'), dpi=110)
  return cells


if __name__ == '__main__':
  main()
