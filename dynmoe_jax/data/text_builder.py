"""Byte-level LM corpus from local text files, as a tfds builder.

Default corpus: the `.py` sources of the running Python's standard library
(`sysconfig.get_paths()['stdlib']`), present on every machine with Python and
readable offline. Files are sorted by path, a file goes to 'test' when
crc32(relative path) % 20 == 0 (about 5%), else to 'train', and each split is cut
into non-overlapping chunks of CHUNK_BYTES bytes. Because the corpus is the local
standard library, its exact bytes follow the Python version (3.11.7 here);
the dataset's version records that. Set DYNMOE_TEXT_DIR to use another
directory of text files (every `*.txt` and `*.py` below it).
"""
from __future__ import annotations

import os
import pathlib
import sys
import sysconfig
import zlib

import numpy as np
import tensorflow_datasets as tfds

CHUNK_BYTES = 257  # 256 inputs + 1 shifted target
MAX_CORPUS_BYTES = 8 * 2**20


def chunk_info(builder: tfds.core.GeneratorBasedBuilder, chunk_bytes: int,
               description: str) -> tfds.core.DatasetInfo:
  """The features of a byte corpus: one uint8 'bytes' tensor of chunk_bytes per example."""
  return builder.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({
          'bytes': tfds.features.Tensor(shape=(chunk_bytes,), dtype=np.uint8)}),
      description=description)


def chunk_examples(blob: bytes, chunk_bytes: int):
  """(index, example) of every whole chunk_bytes-long chunk of blob, in order."""
  array = np.frombuffer(blob, np.uint8)
  for i in range(len(array) // chunk_bytes):
    yield i, {'bytes': array[i * chunk_bytes:(i + 1) * chunk_bytes].copy()}


def corpus_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get('DYNMOE_TEXT_DIR') or sysconfig.get_paths()['stdlib'])


def corpus_files(root: pathlib.Path):
  patterns = ('*.py', '*.txt')
  files = sorted({p for pat in patterns for p in root.rglob(pat)
                  if 'site-packages' not in p.parts and p.is_file()})
  if not files:
    raise FileNotFoundError(f'text corpus: no *.py or *.txt files under {root}')
  return files


class BytesCorpus(tfds.core.GeneratorBasedBuilder):
  """Byte chunks of local text (default: the Python standard library sources)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': f'Python {sys.version_info.major}.{sys.version_info.minor} stdlib, '
                            f'{CHUNK_BYTES}-byte chunks, at most {MAX_CORPUS_BYTES} bytes.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return chunk_info(self, CHUNK_BYTES, __doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    root = corpus_root()
    train, test = [], []
    total = 0
    for path in corpus_files(root):
      data = path.read_bytes()
      if total + len(data) > MAX_CORPUS_BYTES:
        break
      total += len(data)
      rel = str(path.relative_to(root)).encode()
      (test if zlib.crc32(rel) % 20 == 0 else train).append(data)
    return {'train': self._generate_examples(b''.join(train)),
            'test': self._generate_examples(b''.join(test))}

  def _generate_examples(self, blob: bytes):
    return chunk_examples(blob, CHUNK_BYTES)


PYTHON_CHUNK_BYTES = 1025  # up to 1024 inputs + 1 shifted target


def python_roots():
  """The directories the larger corpus reads: DYNMOE_PYTHON_CORPUS_ROOTS (os.pathsep-
  separated), else the standard library and the running environment's site-packages."""
  override = os.environ.get('DYNMOE_PYTHON_CORPUS_ROOTS')
  if override:
    return [pathlib.Path(p) for p in override.split(os.pathsep) if p]
  paths = sysconfig.get_paths()
  return sorted({pathlib.Path(paths[k]) for k in ('stdlib', 'purelib', 'platlib')})


def python_files():
  """(content hash, bytes) of every distinct `.py` file under python_roots(), in path
  order; a file whose exact bytes appeared before (vendored copies) is skipped."""
  import hashlib
  seen = set()
  for root in python_roots():
    for path in sorted(root.rglob('*.py')):
      try:
        data = path.read_bytes()
      except OSError:
        continue
      digest = hashlib.sha1(data).digest()
      if digest in seen or not data:
        continue
      seen.add(digest)
      yield digest, data


class PythonCorpus(tfds.core.GeneratorBasedBuilder):
  """Every distinct `.py` file of the standard library and the installed site-packages,
  deduplicated by content, a file wholly in 'train' or 'test' (crc32 of its content hash
  % 50 == 0: about 2%), cut into PYTHON_CHUNK_BYTES-byte chunks. Offline and larger (about
  200 MiB with this project's requirements installed) than `bytes_corpus`; its exact bytes
  follow the installed packages."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': f'Python {sys.version_info.major}.{sys.version_info.minor} stdlib + '
                            f'site-packages, deduplicated, {PYTHON_CHUNK_BYTES}-byte chunks.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return chunk_info(self, PYTHON_CHUNK_BYTES, self.__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    train, test = [], []
    for digest, data in python_files():
      (test if zlib.crc32(digest) % 50 == 0 else train).append(data)
    if not train or not test:
      raise FileNotFoundError(f'python_corpus: too few .py files under {python_roots()}')
    return {'train': self._generate_examples(b''.join(train)),
            'test': self._generate_examples(b''.join(test))}

  def _generate_examples(self, blob: bytes):
    return chunk_examples(blob, PYTHON_CHUNK_BYTES)
