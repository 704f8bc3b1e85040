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


def experts_per_layer(train: List[Dict], adaptation: List[Dict]) -> Dict[str, List]:
  """{layer: [(step, experts), ...]} from step 0 to the last step, changing at the steps
  adaptation.jsonl records; {} when no boundary resized a layer (capacity re-plans alone
  change no count). Read from adaptation.jsonl, not the train rows: a row logged at a
  boundary step was computed before the resize, so its count is one window late."""
  resizes = [e for e in adaptation if e['experts_after'] != e['experts_before']]
  if not resizes:
    return {}
  last_step = max([r['step'] for r in train] + [e['step'] for e in resizes])
  out = {}
  for layer in names.moe_layers_in(train):
    load = names.metric_key(layer, 'expert_load')
    changes = sorted((e['step'], e['experts_before'], e['experts_after'])
                     for e in resizes if e['layer'] == layer)
    start = changes[0][1] if changes else next(len(r[load]) for r in train if load in r)
    pts = [(0, start)] + [(step, after) for step, _, after in changes]
    out[layer] = pts + [(last_step, pts[-1][1])]
  return out


def write_plots(workdir: str) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if r.get('split') == 'train']
  evals = [r for r in rows if r.get('split') == 'eval']
  out_dir = os.path.join(workdir, 'plots')
  os.makedirs(out_dir, exist_ok=True)
  figures = [('loss_accuracy.png', _loss_figure(plt, train, evals))]
  layers = names.moe_layers_in(train)
  if layers:
    figures.append(('active_experts.png', _active_experts_figure(plt, layers, train, evals)))
    figures.append(('expert_load.png', _load_figure(plt, layers, train)))
  series = experts_per_layer(train, read_jsonl(os.path.join(workdir, 'adaptation.jsonl')))
  if series:
    figures.append(('experts_per_layer.png', _experts_figure(plt, series)))
  return [save_figure(fig, os.path.join(out_dir, name), dpi=110) for name, fig in figures]


def _loss_figure(plt, train, evals):
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
  return fig


def _active_experts_figure(plt, layers, train, evals):
  # Training counts a token's experts under the training-mode router (top-any without
  # its fallback lets a token take none); evaluation under the eval-mode one (at least
  # one each). Two panels, so neither hides the other; distinct styles per layer, so
  # layers whose lines coincide stay visible.
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True, sharey=True)
  for i, layer in enumerate(layers):
    key = names.metric_key(layer, 'active_experts')
    style = _STYLES[i % len(_STYLES)]
    for ax, series in zip(axes, (train, evals)):
      pts = [(r['step'], r[key]) for r in series if key in r]
      if pts:
        ax.plot(*zip(*pts), label=layer, markersize=4, **style)
  axes[0].set_title('training mode (mean over each log window)', fontsize=9)
  axes[1].set_title('evaluation mode (eval split)', fontsize=9)
  axes[0].set_ylabel('experts per token')
  for ax in axes:
    ax.set_xlabel('step')
    if ax.lines:
      ax.legend(fontsize=7)
  return fig


def _load_figure(plt, layers, train):
  from matplotlib.ticker import MaxNLocator
  # One colour scale for every layer's panel, so equal shades mean equal loads.
  loads = {layer: [r for r in train if names.metric_key(layer, 'expert_load') in r]
           for layer in layers}
  top = max(max(max(r[names.metric_key(layer, 'expert_load')]) for r in rows_)
            for layer, rows_ in loads.items())
  fig, axes = plt.subplots(1, len(layers), figsize=(4.8 * len(layers), 3.8), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    load = names.metric_key(layer, 'expert_load')
    with_load = loads[layer]
    width = max(len(r[load]) for r in with_load)
    grid = np.full((width, len(with_load)), np.nan)
    for i, r in enumerate(with_load):
      grid[:len(r[load]), i] = r[load]
    x_edges = step_edges([r['step'] for r in with_load])
    y_edges = np.arange(width + 1) - 0.5
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap='viridis',
                         shading='flat', vmin=0.0, vmax=max(top, 1e-9))
    ax.set_title(f'{layer} expert load (training)')
    ax.set_xlabel('step')
    ax.set_ylabel('expert')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(mesh, ax=ax, fraction=0.046, label='share of routed pairs')
  return fig


def _experts_figure(plt, series):
  from matplotlib.ticker import MaxNLocator
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for i, (layer, pts) in enumerate(series.items()):
    style = dict(_STYLES[i % len(_STYLES)])
    style['markevery'] = list(range(1, len(pts) - 1))  # the resizes, not the ends
    ax.step(*zip(*pts), where='post', label=layer, **style)
  ax.set_xlabel('step (markers: boundaries that resized the layer)')
  ax.set_ylabel('experts')
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.legend()
  return fig
