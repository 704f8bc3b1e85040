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

import jax
import orbax.checkpoint as ocp

from dynmoe_jax import checkpointing, config_lib, default_config, routers, sharding
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import controls as controls_lib
from dynmoe_jax.train import state as state_lib

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

# Fields added to layout 1 after runs were saved without them: the value that behaves as
# the version before the field existed.
V1_ABSENT_MEANS = {
    'gshard_balance_weight': 0.0, 'top_any_learned_scale': False, 'top_any_max_scale': 100.0,
    'top_any_train_fallback': False, 'top_any_differentiable_normalization': False,
    'budget_two_sided': False, 'budget_error_unit': None, 'budget_horizon': None,
    'capacity': None, 'group_size': None, 'priority': None, 'normalize_top_k': None,
}
ABSENT_MEANS = {'model.noncausal_routing': False,
                'balance.loss_free': False, 'balance.rate': 1e-3,
                'budget.controller': 'rate', 'budget.kp': 0.1, 'budget.ki': 0.02}

# Layout 1's flat model.moe field -> layout 2's (section, field); the router sections take
# the shared fields (k, max_k, expected_k, priority, the loss weights) below.
V1_MOVED = {
    'capacity_factor': ('capacity', 'factor'), 'eval_capacity_factor': ('capacity', 'eval_factor'),
    'capacity_multiple_of': ('capacity', 'multiple_of'), 'capacity': ('capacity', 'slots'),
    'group_size': ('capacity', 'group_size'),
    'target_experts_per_token': ('budget', 'target_experts_per_token'),
    'budget_rate': ('budget', 'rate'), 'budget_two_sided': ('budget', 'two_sided'),
    'budget_error_unit': ('budget', 'error_unit'), 'budget_horizon': ('budget', 'horizon'),
}
V1_KEPT = ('num_experts', 'num_experts_per_layer', 'hidden_dim', 'router', 'dispatch_impl',
           'ragged_backend', 'activation', 'glu')


def _v1_router_sections(old: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """Layout 1's shared router fields, as each router read them then."""
  k, max_k, expected_k, priority = old['k'], old['max_k'], old['expected_k'], old['priority']
  weights = lambda *names: {f'{n}_weight': old[f'{n}_weight'] for n in names}
  return {
      'top_any': dict(
          scale=old['top_any_scale'], learned_scale=old['top_any_learned_scale'],
          max_scale=old['top_any_max_scale'], train_fallback=old['top_any_train_fallback'],
          differentiable_normalization=old['top_any_differentiable_normalization'],
          max_k=max_k, expected_k=float(k if expected_k is None else expected_k),
          priority=priority or 'score',
          **weights('diversity', 'simplicity', 'load_balance', 'efficiency', 'gshard_balance')),
      'top_k': dict(k=k, normalize=old['normalize_top_k'], expected_k=expected_k,
                    priority=priority or 'gshard', **weights('load_balance', 'z_loss')),
      'top_p': dict(p=old['p'], max_k=max_k, expected_k=float(k if expected_k is None
                                                             else expected_k),
                    priority=priority or 'score',
                    **weights('load_balance', 'z_loss', 'entropy')),
      'adaptive_k': dict(max_k=k if max_k is None else max_k, expected_k=expected_k,
                         priority=priority or 'score', **weights('load_balance', 'z_loss')),
      'expert_choice': dict(k=k, **weights('z_loss')),
  }


def migrate(saved: Mapping[str, Any]) -> Dict[str, Any]:
  """A saved config (JSON) in this version's layout (default_config.CONFIG_VERSION):
  layout 1 (no config_version; every router's and the budget's fields flat in model.moe)
  becomes layout 2 (model.moe.capacity, model.moe.<router>, budget), each field holding
  what the old run ran with. A config already in layout 2 is returned as it is."""
  saved = json.loads(json.dumps(saved))  # a copy
  version = saved.get('config_version', 1)
  if 'model' not in saved:
    return saved  # not a run's config
  if version == default_config.CONFIG_VERSION:
    return saved
  if version != 1:
    raise ValueError(f'a saved config of layout {version!r}: this version reads layouts 1 '
                     f'and {default_config.CONFIG_VERSION}')
  old = {**V1_ABSENT_MEANS, **saved['model']['moe']}
  moe = {name: old[name] for name in V1_KEPT}
  moe['capacity'] = {}
  budget = {}
  for name, (section, field) in V1_MOVED.items():
    (moe['capacity'] if section == 'capacity' else budget)[field] = old[name]
  moe.update(_v1_router_sections(old))
  saved['model']['moe'] = moe
  saved['budget'] = budget
  saved['config_version'] = default_config.CONFIG_VERSION
  return saved


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
    'model.moe.top_k.normalize': lambda flat: flat.get('model.moe.top_k.k', 1) >= 2,
}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                ) -> List[Tuple[str, Any, Any]]:
  """(field, saved value, current value) for each leaf that differs and may not; the
  saved config is first migrated to this version's layout."""
  a, b = flatten(migrate(saved)), flatten(current)

  def value(config, key):
    v = config.get(key, ABSENT_MEANS.get(key, '<absent>'))
    if v is None and key in NONE_MEANS:
      return NONE_MEANS[key](config)
    return None if key in config_lib.ZERO_MEANS_OFF and v == 0 else v

  def follows_the_rule_on_both_sides(key):  # then the fields the rule reads are compared
    return key in NONE_MEANS and a.get(key) is None and b.get(key) is None

  # The sections of the routers the run does not use change nothing it computes (a
  # changed router is itself a difference).
  unused = tuple(f'model.moe.{name}.' for name in routers.NAMES
                 if name != b.get('model.moe.router'))
  return [(k, a.get(k, '<absent>'), b.get(k, '<absent>'))
          for k in sorted(set(a) | set(b))
          if value(a, k) != value(b, k) and not _resumable(k)
          and not follows_the_rule_on_both_sides(k) and not k.startswith(unused)]


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
        return migrate(meta['config'])
    except (OSError, ValueError):
      continue  # unreadable: restore will set it aside and fall back
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      return migrate(json.load(f))
  return None


def restore_params(workdir: str, config, sample_inputs):
  """(model, the newest checkpoint's params as host arrays, its step, its budget's
  controls for the model's `moe_controls` or None) of the run of `config` in `workdir`,
  in the layout that checkpoint's meta records. Opens the checkpoints read-only: nothing
  in `workdir` is written."""
  # orbax takes absolute paths only; `--workdir` and `init_from` may be relative
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if not manager.all_steps():
      raise FileNotFoundError(f'{workdir}/checkpoints holds no checkpoint')
    step = max(manager.all_steps())
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    model = config_lib.build_model(config, Layout.from_meta(meta))
    controllers = controls_lib.from_config(config, model.experts_per_layer)
    init = state_lib.make_init(model, config_lib.build_optimizer(config), sample_inputs,
                               controllers.initial_controls() if controllers else None)
    abstract = sharding.strip_boxes(jax.eval_shape(init, jax.random.PRNGKey(0)))
    device = jax.local_devices()[0]
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  finally:
    manager.close()
  # the params and the budget's controls only: the optimizer state stays off the host
  state = restored['state']
  controls = (controllers.layer_controls(jax.device_get(state.moe_controls)) if controllers
              else None)
  return model, jax.device_get(state.params), step, controls
