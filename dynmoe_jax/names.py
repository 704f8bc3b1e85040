"""One home for the names that cross module boundaries: MoE block names and the
metric keys built from them. Everything that writes or reads `'layer_<i>'` or
`'moe/<layer>/<key>'` goes through these functions, never through string surgery.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

_LAYER = re.compile(r'^layer_(\d+)$')
MOE_PREFIX = 'moe/'


def layer_name(index: int) -> str:
  """The Flax module name of transformer block `index`."""
  return f'layer_{index}'


def layer_index(name: str) -> int:
  """Inverse of `layer_name`; a clear error for anything else."""
  match = _LAYER.match(name)
  if not match:
    raise ValueError(f'{name!r} is not a block name of the form layer_<index>')
  return int(match.group(1))


def moe_layer_names(layout: Sequence[int]) -> List[str]:
  """Names of the MoE blocks of an expert layout (experts per block, 0 = dense)."""
  return [layer_name(i) for i, n in enumerate(layout) if n]


def metric_key(layer: str, key: str) -> str:
  return f'{MOE_PREFIX}{layer}/{key}'


def split_metric_key(key: str) -> Optional[Tuple[str, str]]:
  """'moe/layer_1/active_experts' -> ('layer_1', 'active_experts'); None otherwise."""
  if not key.startswith(MOE_PREFIX):
    return None
  layer, _, name = key[len(MOE_PREFIX):].partition('/')
  return (layer, name) if name else None


def moe_layers_in(rows: Iterable[Mapping[str, object]]) -> List[str]:
  """The MoE block names that appear in metric rows, in block order."""
  found = {split[0] for row in rows for split in map(split_metric_key, row) if split}
  return sorted(found, key=layer_index)
