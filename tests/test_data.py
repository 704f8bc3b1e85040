"""Offline tfds builders and the grain pipeline."""
import numpy as np
import pytest

from tests.conftest import load_config
from dynmoe_jax.data import pipeline


@pytest.fixture(scope='module')
def mnist1d_train():
  return pipeline.get_source('mnist1d', 'train')


def test_mnist1d_is_the_standard_split(mnist1d_train):
  test = pipeline.get_source('mnist1d', 'test')
  assert len(mnist1d_train) == 4000 and len(test) == 1000
  example = mnist1d_train[0]
  assert example['signal'].shape == (40,) and example['signal'].dtype == np.float32
  labels = np.array([test[i]['label'] for i in range(len(test))])
  assert set(labels.tolist()) == set(range(10))


def test_train_stream_is_a_function_of_the_step(mnist1d_train):
  preprocess = pipeline.make_preprocess('signal', 'signal', 'label', 40)
  a = pipeline.TrainStream(mnist1d_train, preprocess, 64, seed=3)
  b = pipeline.TrainStream(mnist1d_train, preprocess, 64, seed=3)
  c = pipeline.TrainStream(mnist1d_train, preprocess, 64, seed=4)
  np.testing.assert_array_equal(a.batch(70)['inputs'], b.batch(70)['inputs'])
  assert not np.array_equal(a.batch(70)['inputs'], c.batch(70)['inputs'])
  assert a.batch(0)['inputs'].shape == (64, 40) and a.batch(0)['labels'].dtype == np.int32
  # one epoch (62 full batches of 64 from 4000) covers distinct examples; the next is reshuffled
  epoch = np.concatenate([a.batch(i)['inputs'] for i in range(62)])
  assert len(np.unique(epoch, axis=0)) == len(epoch)
  assert not np.array_equal(a.batch(0)['inputs'], a.batch(62)['inputs'])


def test_process_rows_make_up_the_single_process_batch(mnist1d_train):
  preprocess = pipeline.make_preprocess('signal', 'signal', 'label', 40)
  whole = pipeline.TrainStream(mnist1d_train, preprocess, 64, 0).batch(5)['inputs']
  parts = [pipeline.TrainStream(mnist1d_train, preprocess, 64, 0, i, 2).batch(5)['inputs']
           for i in range(2)]
  assert parts[0].shape == (32, 40)
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_eval_batches_pad_and_mask():
  preprocess = pipeline.make_preprocess('signal', 'signal', 'label', 40)
  source = pipeline.get_source('mnist1d', 'test')
  batches = list(pipeline.eval_batches(source, preprocess, 300))
  assert [b['inputs'].shape[0] for b in batches] == [300] * 4
  assert sum(b['mask'].sum() for b in batches) == 1000
  assert batches[-1]['mask'].sum() == 100
  per_process = [list(pipeline.eval_batches(source, preprocess, 300, i, 2)) for i in range(2)]
  assert [len(p) for p in per_process] == [4, 4]
  assert sum(b['mask'].sum() for p in per_process for b in p) == 1000


def test_bytes_corpus_lm_preprocess():
  source = pipeline.get_source('bytes_corpus', 'test')
  preprocess = pipeline.make_preprocess('lm', 'bytes', None, 32)
  example = preprocess(source[0])
  assert example['inputs'].shape == (33,) and example['inputs'].min() >= 1
  assert 'labels' not in example


def test_text_classification_preprocess_pads_bytes():
  preprocess = pipeline.make_preprocess('text', 'sentence', 'label', 8)
  out = preprocess({'sentence': 'hi!', 'label': 1})
  np.testing.assert_array_equal(out['inputs'], [ord('h') + 1, ord('i') + 1, ord('!') + 1,
                                                0, 0, 0, 0, 0])
  assert out['labels'] == 1


def test_missing_standard_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(pipeline.DatasetNotFoundError,
                     match=r'tfds build cifar10 --file_format=array_record'):
    pipeline.get_source('cifar10', 'train', str(tmp_path))


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match="data.kind='video'"):
    pipeline.make_preprocess('video', 'x', 'y', 8)


def test_split_larger_than_the_prepared_data_names_the_split_fields():
  total = len(pipeline.get_source('bytes_corpus', 'test'))
  with pytest.raises(ValueError, match=r'data.train_split / data.eval_split') as error:
    pipeline.get_source('bytes_corpus', f'test[:{total + 1}]')
  assert not isinstance(error.value, pipeline.DatasetNotFoundError)


# lm_small's python_corpus (every .py installed here; 30-40 s to build) is read by its smoke
# test in tests/test_experiments.py.
@pytest.mark.parametrize('name', ['lm_dynmoe', 'lm_topk', 'mnist1d_dynmoe'])
def test_shipped_configs_read_their_splits(name):
  config = load_config(name)
  for split in (config.data.train_split, config.data.eval_split):
    assert len(pipeline.get_source(config.data.name, split, config.data.data_dir)) > 0


def test_python_corpus_deduplicates_and_keeps_each_file_in_one_split(tmp_path, monkeypatch):
  from dynmoe_jax.data import text_builder
  src = tmp_path / 'src'
  rng = np.random.default_rng(0)
  files = {}
  for i in range(120):
    text = f'# file {i}\n' + ''.join(rng.choice(list('abcdefgh =()\n'), 3000))
    files[f'pkg{i % 7}/m{i}.py'] = text
  files['vendored/copy_of_m0.py'] = files['pkg0/m0.py']  # the same bytes: kept once
  for rel, text in files.items():
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    (src / rel).write_text(text)
  monkeypatch.setenv('DYNMOE_PYTHON_CORPUS_ROOTS', str(src))
  distinct = list(text_builder.python_files())
  assert len(distinct) == 120
  train = pipeline.get_source('python_corpus', 'train', str(tmp_path / 'tfds'))
  test = pipeline.get_source('python_corpus', 'test', str(tmp_path / 'tfds'))
  size = text_builder.PYTHON_CHUNK_BYTES
  assert train[0]['bytes'].shape == (size,) and len(test) > 0
  total = sum(len(d) for _, d in distinct)
  assert (len(train) + len(test)) * size <= total < (len(train) + len(test) + 2) * size
  # No file's header line shows up in both splits (tfds shuffles chunks, so read them all).
  import re
  headers = lambda source: set(re.findall(rb'# file \d+\n', b'|'.join(
      bytes(source[i]['bytes']) for i in range(len(source)))))
  in_test, in_train = headers(test), headers(train)
  assert in_test and in_train and not in_test & in_train
