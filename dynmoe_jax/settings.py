"""Frozen settings objects: defaults and validation written once.

A settings class is a frozen dataclass whose `problems()` yields (field, reason) for each
invalid value; construction raises SettingsError on the first. The layer takes these
objects; a config section of the same name holds the same fields (`from_config`), so the
config path runs the same checks and its errors name the config field.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Optional, Tuple


class SettingsError(ValueError):
  """One invalid setting: `field`, `value` and why."""

  def __init__(self, owner: str, field: str, value: Any, reason: str):
    super().__init__(f'{owner}.{field}={value!r} {reason}')
    self.owner, self.field, self.value, self.reason = owner, field, value, reason


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class Settings:
  """Mixin of the frozen settings dataclasses."""

  def problems(self) -> Iterator[Tuple[str, str]]:
    return iter(())

  def __post_init__(self):
    for field, reason in self.problems():
      raise SettingsError(type(self).__name__, field, getattr(self, field), reason)

  @classmethod
  def field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, section: Mapping[str, Any], owner: Optional[str] = None):
    """The settings of a config section holding these fields (unknown keys refused)."""
    values = dict(section)
    unknown = sorted(set(values) - set(cls.field_names()))
    if unknown:
      raise SettingsError(owner or cls.__name__, unknown[0], values[unknown[0]],
                          f'is not a field (fields: {list(cls.field_names())})')
    try:
      return cls(**values)
    except SettingsError as e:
      if owner is None:
        raise
      raise SettingsError(owner, e.field, e.value, e.reason) from None
