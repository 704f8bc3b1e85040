"""Orbax checkpoints of the train state plus a JSON record of the model layout.

Each step directory holds `state` (params, optimizer state, step, rng) and
`meta` (expert layout per layer and the model-shape fields), so a restart
rebuilds a model of the right shapes before restoring arrays into it. Orbax
writes to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a step directory that `all_steps()` lists.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any, Callable, Dict, Optional, Tuple

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # created at the first save: a run refused before it leaves no directory
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                             enable_async_checkpointing=False))

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any]):
    os.makedirs(self.directory, exist_ok=True)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def readable(self, step: int) -> bool:
    """Whether every array of `step` reads back (as host arrays: no target, nothing
    compiled); an unreadable step is left where it is, for restore_latest to handle."""
    try:
      self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return True
    except Exception:  # noqa: BLE001  corrupt, truncated or half-copied
      return False

  def read_meta(self, step: int) -> Dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_latest(self, abstract_state_fn: Callable[[Dict[str, Any]], Any]
                     ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """Restore the newest readable step; an unreadable one is reported (with its
    path) and skipped, never deleted. `abstract_state_fn(meta)` gives the target
    tree (shapes, dtypes, shardings) for that step's layout."""
    for step in reversed(self.all_steps()):
      path = os.path.join(self.directory, str(step))
      try:
        meta = self.read_meta(step)
        target = abstract_state_fn(meta)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return step, restored['state'], meta
      except ModelMismatchError:
        raise
      except Exception as e:  # corrupt, truncated or half-copied checkpoint
        kept = self._set_aside(step, e)
        # One line: TensorStore's error spells out its whole spec (60 lines); that is
        # in the moved folder's why_unreadable.txt.
        log.warning('checkpoint %s is unreadable (%s); moved, not deleted, to %s (the error '
                    'is in its why_unreadable.txt); trying the step before it',
                    path, type(e).__name__, kept)
    return None

  def _set_aside(self, step: int, error: BaseException) -> str:
    """Move an unreadable step out of the manager's way (the resumed run will save
    that step again) without deleting anything of the user's; keep the error beside it."""
    aside = os.path.join(os.path.dirname(self.directory), 'unreadable_checkpoints')
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f'{step}.{int(time.time())}')
    os.rename(os.path.join(self.directory, str(step)), target)
    with open(os.path.join(target, 'why_unreadable.txt'), 'w') as f:
      f.write(''.join(traceback.format_exception(error)))
    self.manager.reload()
    return target

  def close(self):
    self.manager.close()


class ModelMismatchError(ValueError):
  """The workdir holds a run that this config cannot resume."""


class NoReadableCheckpointError(ModelMismatchError):
  """Every checkpoint of the run was unreadable: nothing to resume from."""
