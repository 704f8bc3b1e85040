"""Whether a workdir's run can be resumed with a config, decided before anything in
the workdir is written, moved or deleted.

A run is its config. A resumed run may change only the fields that decide how long
it goes on and how it reports or runs (RESUMABLE_FIELDS); any other difference
means another run, and the trainer stops with one line naming the fields. A
checkpoint that cannot be restored because the config changed is therefore never
mistaken for a corrupt one.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from dynmoe_jax import checkpointing, config_lib, routers

# Dotted config fields (or prefixes ending in '.') a resumed run may change.
RESUMABLE_FIELDS = (
    'num_train_steps',            # go on for longer
    'log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints', 'progress_bar',
    'eval_batch_size', 'dropped_fraction_warning', 'skip_nonfinite_updates',
    'data.data_dir', 'data.eval_split',
    'mesh.',                      # another device count or mesh: shardings are rebuilt
    'model.moe.dispatch_impl', 'model.moe.ragged_backend',  # same parameters, run another way
    'model.moe.num_experts', 'model.moe.num_experts_per_layer',  # the layout: checked apart
    'adaptive.compile_lead_steps',
)

# Fields added after runs were saved without them: the value that behaves as the version
# before the field existed. A saved run lacking one matches a config holding that value.
ABSENT_MEANS = {
    'model.moe.gshard_balance_weight': 0.0,
    'model.moe.top_any_learned_scale': False,
    'model.moe.top_any_max_scale': 100.0,
    'model.moe.top_any_train_fallback': False,
    'model.moe.top_any_differentiable_normalization': False,
    'model.moe.budget_two_sided': False,
    'model.moe.budget_error_unit': None,
    'model.moe.budget_horizon': None,
    'model.moe.capacity': None,
    'model.moe.group_size': None,
    'model.noncausal_routing': False,
}


class RunMismatchError(checkpointing.ModelMismatchError):
  """The workdir holds a run of another config."""


class WorkdirError(OSError):
  """The workdir cannot hold a run: a file, or on a read-only file system."""


def check_workdir(workdir: str):
  """Refuse a workdir the run could not write, before anything is computed."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory')
  ancestor = workdir
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise WorkdirError(f'--workdir={workdir} cannot be created: {ancestor} is a file')
  # access(2) reports a read-only file system even to root
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise WorkdirError(f'--workdir={workdir} cannot be written: {ancestor} is read-only '
                       'for this user or on a read-only file system')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _resumable(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_FIELDS)


# Fields whose None means a rule on other fields: compared by what they resolve to, so a
# run saved with the value the rule gives resumes under the rule.
NONE_MEANS = {
    # runs before the Switch default saved True for every k
    'model.moe.normalize_top_k': lambda flat: flat.get('model.moe.k', 1) >= 2,
    # runs before the peers' orders saved 'score' for every router
    'model.moe.priority': lambda flat: routers.get(flat['model.moe.router']).default_priority,
}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                ) -> List[Tuple[str, Any, Any]]:
  """(field, saved value, current value) for each leaf that differs and may not."""
  a, b = flatten(saved), flatten(current)

  def value(config, key):
    v = config.get(key, ABSENT_MEANS.get(key, '<absent>'))
    if v is None and key in NONE_MEANS:
      return NONE_MEANS[key](config)
    return None if key in config_lib.ZERO_MEANS_OFF and v == 0 else v

  def follows_the_rule_on_both_sides(key):  # then the fields the rule reads are compared
    return key in NONE_MEANS and a.get(key) is None and b.get(key) is None

  return [(k, a.get(k, '<absent>'), b.get(k, '<absent>'))
          for k in sorted(set(a) | set(b))
          if value(a, k) != value(b, k) and not _resumable(k)
          and not follows_the_rule_on_both_sides(k)]


def config_json(config) -> Dict[str, Any]:
  """The config as its saved JSON reads back (tuples as lists, and so on)."""
  return json.loads(config.to_json_best_effort())


def mismatch_message(workdir: str, diffs: List[Tuple[str, Any, Any]]) -> str:
  fields = ', '.join(f'{k} (run: {a!r}, now: {b!r})' for k, a, b in diffs)
  return (f'{workdir} holds a run of a different config (fields differ: '
          f'{[k for k, _, _ in diffs]}): {fields}. Nothing was changed. To go on with that '
          f'run, pass its values; to start another run, use a new --workdir.')


def check(saved_config: Optional[Mapping[str, Any]], config, workdir: str):
  if saved_config is None:
    return
  diffs = differences(saved_config, config_json(config))
  if diffs:
    raise RunMismatchError(mismatch_message(workdir, diffs))


def _step_dirs(checkpoint_dir: str) -> List[int]:
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted((int(d) for d in os.listdir(checkpoint_dir) if d.isdigit()), reverse=True)


def saved_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The config of the run in `workdir`: from its newest checkpoint whose meta reads,
  else from its config.json; None for a new workdir. Reads only."""
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  for step in _step_dirs(checkpoint_dir):
    try:
      with open(os.path.join(checkpoint_dir, str(step), 'meta', 'metadata')) as f:
        meta = json.load(f)
      if 'config' in meta:
        return meta['config']
    except (OSError, ValueError):
      continue  # unreadable: restore will set it aside and fall back
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None
