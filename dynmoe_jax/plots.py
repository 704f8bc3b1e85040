"""PNG plots of a run from its metrics.jsonl (and adaptation.jsonl)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np


def read_jsonl(path: str) -> List[Dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _moe_layers(rows):
  return sorted({k.split('/')[1] for r in rows for k in r if k.startswith('moe/')},
                key=lambda n: int(n.split('_')[-1]))


def save_figure(fig, path: str, dpi: int) -> str:
  """Writes `fig` as a PNG at `path` and releases it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def write_plots(workdir: str) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if r.get('split') == 'train']
  evals = [r for r in rows if r.get('split') == 'eval']
  out_dir = os.path.join(workdir, 'plots')
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(fig, name):
    written.append(save_figure(fig, os.path.join(out_dir, name), dpi=110))

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for split, series in (('train', train), ('eval', evals)):
    if series:
      steps = [r['step'] for r in series]
      axes[0].plot(steps, [r['loss'] for r in series], label=split, marker='.' if
                   split == 'eval' else None)
      key = 'accuracy' if 'accuracy' in series[0] else 'bits_per_byte'
      axes[1].plot(steps, [r[key] for r in series], label=split,
                   marker='.' if split == 'eval' else None)
      axes[1].set_ylabel(key)
  axes[0].set_ylabel('loss')
  for ax in axes:
    ax.set_xlabel('step')
    ax.legend()
  save(fig, 'loss_accuracy.png')

  layers = _moe_layers(train)
  if layers:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in layers:
      pts = [(r['step'], r[f'moe/{name}/active_experts']) for r in train
             if f'moe/{name}/active_experts' in r]
      ax.plot(*zip(*pts), label=name)
      counts = [(r['step'], len(r[f'moe/{name}/expert_load'])) for r in train
                if f'moe/{name}/expert_load' in r]
      ax.plot(*zip(*counts), ls=':', color=ax.lines[-1].get_color(),
              label=f'{name} experts')
    ax.set_xlabel('step')
    ax.set_ylabel('active experts per token')
    ax.legend(fontsize=7)
    save(fig, 'active_experts.png')

    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.8), squeeze=False)
    for ax, name in zip(axes[0], layers):
      loads = [r[f'moe/{name}/expert_load'] for r in train if f'moe/{name}/expert_load' in r]
      steps = [r['step'] for r in train if f'moe/{name}/expert_load' in r]
      width = max(len(x) for x in loads)
      grid = np.full((len(loads), width), np.nan)
      for i, x in enumerate(loads):
        grid[i, :len(x)] = x
      im = ax.imshow(grid.T, aspect='auto', origin='lower', cmap='viridis', interpolation='nearest',
                     extent=(steps[0], max(steps[-1], steps[0] + 1), -0.5, width - 0.5))
      ax.set_title(f'{name} expert load')
      ax.set_xlabel('step')
      ax.set_ylabel('expert')
      fig.colorbar(im, ax=ax, fraction=0.046)
    save(fig, 'expert_load.png')

  adaptation = read_jsonl(os.path.join(workdir, 'adaptation.jsonl'))
  if adaptation:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in sorted({e['layer'] for e in adaptation}, key=lambda n: int(n.split('_')[-1])):
      events = [e for e in adaptation if e['layer'] == name]
      steps = [0] + [e['step'] for e in events]
      counts = [events[0]['experts_before']] + [e['experts_after'] for e in events]
      ax.step(steps, counts, where='post', label=name, marker='o')
    ax.set_xlabel('step')
    ax.set_ylabel('experts')
    ax.legend()
    save(fig, 'experts_per_layer.png')
  return written
