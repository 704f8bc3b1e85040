"""tfds array_record sources fed by grain, with exact, index-based resume.

Batch `s` of the training stream is a pure function of (seed, s, process): the
grain MapDataset is shuffled per epoch with `seed + epoch`, repeated, batched,
and read by index. A resumed run asks for batch `s` and gets what an
uninterrupted run got; no iterator state needs checkpointing.

Local builders (`mnist1d`, `bytes_corpus`, `python_corpus`) are generated here on first use.
Any other tfds name (`cifar10`, `glue/sst2`, `lm1b`, ...) is read from the
user's data dir in array_record format; if it is missing the error says how to
prepare it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Dict, Iterator, Optional

import grain
import numpy as np
import tensorflow_datasets as tfds

from dynmoe_jax.data import mnist1d_builder, text_builder

# Importing the builder modules registers them with tfds under these names.
LOCAL_BUILDERS = {'mnist1d': mnist1d_builder.Mnist1d, 'bytes_corpus': text_builder.BytesCorpus,
                  'python_corpus': text_builder.PythonCorpus}
KINDS = ('signal', 'image', 'text', 'lm')

Batch = Dict[str, np.ndarray]


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared (as array_record) in the data dir."""


class SplitError(ValueError):
  """The dataset is prepared, but not with the split or slice asked for."""


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


@contextlib.contextmanager
def _file_lock(path: str):
  """Serialises preparation across local processes (multi-process tests, hosts sharing NFS)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_source(name: str, split: str, data_dir: Optional[str] = None):
  """A random-access tfds data source for `name`/`split`."""
  data_dir = data_dir or default_data_dir()
  if name.split('/')[0] in LOCAL_BUILDERS:
    with _file_lock(os.path.join(data_dir, f'.{name.replace("/", "_")}.lock')):
      builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
      if not builder.is_prepared():
        builder.download_and_prepare(file_format='array_record')
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types for a missing or tfrecord-only dataset
    if _is_prepared(name, data_dir, 'array_record'):
      raise SplitError(
          f'split {split!r} does not fit tfds dataset {name!r} as prepared in {data_dir} '
          f'({type(e).__name__}: {e}); set data.train_split / data.eval_split to a split '
          f'(or slice) it has') from e
    raise DatasetNotFoundError(
        f"tfds dataset {name!r} is not prepared as array_record in {data_dir} (nothing here "
        f"downloads it). Prepare it once on a machine that can download it, with `tfds build "
        f"{name} --file_format=array_record --data_dir=DIR`, copy DIR here, and pass "
        f"--config.data.data_dir=DIR (or set TFDS_DATA_DIR).") from e


def _is_prepared(name: str, data_dir: str, file_format: str) -> bool:
  """Whether `name` has prepared files of `file_format` in data_dir (tfds's own
  is_prepared() also says yes for an empty version directory)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      return False
    return any(file_format.replace('_', '') in f.name.replace('_', '')
               for f in os.scandir(builder.data_dir) if f.is_file())
  except Exception:  # unknown name, unreadable metadata: not usable either way
    return False


def make_preprocess(kind: str, input_key: str, label_key: Optional[str], seq_len: int
                    ) -> Callable[[dict], dict]:
  """Feature dict -> {'inputs': ..., 'labels': ...} of fixed shapes."""
  if kind not in KINDS:
    raise ValueError(f'data.kind={kind!r} is not one of {KINDS}')

  def to_bytes(value):
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
      return value
    if isinstance(value, str):
      value = value.encode('utf-8')
    return np.frombuffer(bytes(value), np.uint8)

  def fixed_length(ids, length):
    out = np.zeros((length,), np.int32)
    out[:min(length, len(ids))] = ids[:length]
    return out

  def preprocess(features):
    value = features[input_key]
    if kind == 'signal':
      inputs = np.asarray(value, np.float32)
    elif kind == 'image':
      inputs = np.asarray(value, np.float32) / 255.0
    elif kind == 'text':  # byte ids shifted by one so 0 is padding
      inputs = fixed_length(to_bytes(value).astype(np.int32) + 1, seq_len)
    else:  # lm: seq_len + 1 byte ids (+1, 0 = padding), inputs and targets come from it
      inputs = fixed_length(to_bytes(value).astype(np.int32) + 1, seq_len + 1)
    out = {'inputs': inputs}
    if label_key is not None and kind != 'lm':
      out['labels'] = np.asarray(features[label_key], np.int32)
    return out

  return preprocess


def example_batch(data_config) -> Batch:
  """One all-zero example (leading axis 1) of the shapes and dtypes `make_preprocess`
  gives, from the config and the tfds builder's metadata alone: nothing is generated,
  read or downloaded (the dry run and the export checks build steps from it)."""
  d = data_config
  if d.kind in ('text', 'lm'):
    out = {'inputs': np.zeros((1, d.seq_len + (d.kind == 'lm')), np.int32)}
  else:
    features = tfds.builder(d.name, data_dir=d.data_dir or default_data_dir()).info.features
    out = {'inputs': np.zeros((1, *features[d.input_key].shape), np.float32)}
  if d.label_key is not None and d.kind != 'lm':
    out['labels'] = np.zeros((1,), np.int32)
  return out


class TrainStream:
  """Infinite stream of shuffled training batches, read by step.

  Global batch `s` holds elements [s*B, (s+1)*B) of the seeded, per-epoch
  reshuffled, repeated dataset, whatever the process count; process i reads
  only its rows [i*B/P, (i+1)*B/P) of it. So a run on P processes sees exactly
  the global batches of a run on one.
  """

  def __init__(self, source, preprocess, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    if global_batch_size % process_count:
      raise ValueError(f'batch_size={global_batch_size} is not divisible by the '
                       f'{process_count} processes')
    if len(source) < global_batch_size:
      raise ValueError(f'the training split has {len(source)} examples, fewer than one batch '
                       f'of {global_batch_size}')
    self.global_batch_size = global_batch_size
    self.per_process_batch = global_batch_size // process_count
    self.offset = process_index * self.per_process_batch
    self._elements = grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(preprocess)

  def batch(self, step: int) -> Batch:
    start = step * self.global_batch_size + self.offset
    examples = [self._elements[start + j] for j in range(self.per_process_batch)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def eval_batches(source, preprocess, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """One pass over the split, this process's rows of each global batch. Every
  process yields the same number of batches of the same shape (collectives need
  that); padding rows carry `mask` 0."""
  if global_batch_size % process_count:
    raise ValueError(f'eval_batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  local = global_batch_size // process_count
  elements = grain.MapDataset.source(source).map(preprocess)
  total = len(elements)
  for start in range(0, total, global_batch_size):
    indices = [start + process_index * local + j for j in range(local)]
    real = [i for i in indices if i < total]
    examples = [elements[i] for i in real] or [elements[0]]
    examples += [examples[-1]] * (local - len(examples))
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch['mask'] = (np.arange(local) < len(real)).astype(np.float32)
    yield batch
