"""PNG plots of a run from its metrics.jsonl (and adaptation.jsonl)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from dynmoe_jax import names

# Distinct styles, so layers whose lines coincide stay visible.
_STYLES = [dict(ls='-', lw=2.6, marker='o'), dict(ls='--', lw=1.8, marker='s'),
           dict(ls=':', lw=1.6, marker='^'), dict(ls='-.', lw=1.4, marker='D')]


def read_jsonl(path: str) -> List[Dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_figure(fig, path: str, dpi: int) -> str:
  """Writes `fig` as a PNG at `path` and releases it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def step_edges(steps: List[int], first_start: int = 0) -> np.ndarray:
  """Each row covers the steps since the previous row: (previous step, step]."""
  return np.asarray([first_start] + list(steps), np.float64)


def write_plots(workdir: str) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

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

  layers = names.moe_layers_in(train)
  if layers:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, layer in enumerate(layers):
      key = names.metric_key(layer, 'active_experts')
      pts = [(r['step'], r[key]) for r in train if key in r]
      line, = ax.plot(*zip(*pts), label=f'{layer} (training: mean of the log window)')
      evals_pts = [(r['step'], r[key]) for r in evals if key in r]
      if evals_pts:
        ax.plot(*zip(*evals_pts), ls='none', marker='o', color=line.get_color(),
                label=f'{layer} (evaluation)')
      load = names.metric_key(layer, 'expert_load')
      counts = [(r['step'], len(r[load])) for r in train if load in r]
      ax.plot(*zip(*counts), ls=':', color=line.get_color(), label=f'{layer} experts')
    ax.set_xlabel('step')
    ax.set_ylabel('experts per token')
    ax.set_title('active experts per token (training and evaluation modes)', fontsize=9)
    ax.legend(fontsize=7)
    save(fig, 'active_experts.png')

    fig, axes = plt.subplots(1, len(layers), figsize=(4.8 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
      load = names.metric_key(layer, 'expert_load')
      with_load = [r for r in train if load in r]
      width = max(len(r[load]) for r in with_load)
      grid = np.full((width, len(with_load)), np.nan)
      for i, r in enumerate(with_load):
        grid[:len(r[load]), i] = r[load]
      x_edges = step_edges([r['step'] for r in with_load])
      y_edges = np.arange(width + 1) - 0.5
      mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap='viridis',
                           shading='flat')
      ax.set_title(f'{layer} expert load (training)')
      ax.set_xlabel('step')
      ax.set_ylabel('expert')
      ax.yaxis.set_major_locator(MaxNLocator(integer=True))
      fig.colorbar(mesh, ax=ax, fraction=0.046, label='share of routed pairs')
    save(fig, 'expert_load.png')

  adaptation = read_jsonl(os.path.join(workdir, 'adaptation.jsonl'))
  if adaptation and layers:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, layer in enumerate(layers):
      load = names.metric_key(layer, 'expert_load')
      pts = [(0, len(train[0][load]))] + [(r['step'], len(r[load])) for r in train if load in r]
      boundaries = {e['step'] for e in adaptation if e['layer'] == layer}
      marks = [j for j, (step, _) in enumerate(pts) if step in boundaries]
      style = dict(_STYLES[i % len(_STYLES)])
      if marks:
        style['markevery'] = marks
      else:
        style['marker'] = None
      ax.step(*zip(*pts), where='post', label=layer, **style)
    ax.set_xlabel('step (markers: boundaries that changed the layer)')
    ax.set_ylabel('experts')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    save(fig, 'experts_per_layer.png')
  return written
