"""MNIST-1D (Greydanus 2020) as a tfds builder, generated locally by `mnist1d`.

The published benchmark: 5,000 signals of length 40 from 10 digit templates,
`mnist1d.data.get_dataset_args()` defaults (seed 42), first 4,000 train and
last 1,000 test. Nothing is downloaded. The noise scales are builder configs so
harder variants (issue: "harder inputs take more experts") are one name away:
`mnist1d/noise_x2` doubles both noise scales.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

SIGNAL_LENGTH = 40
NUM_CLASSES = 10


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
  noise_multiplier: float = 1.0


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D signals, 4,000 train / 1,000 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Generated with mnist1d.data.make_dataset, default args.'}
  BUILDER_CONFIGS = [
      Mnist1dConfig(name='standard', description='The published benchmark settings.'),
      Mnist1dConfig(name='noise_x2', description='Both noise scales doubled.',
                    noise_multiplier=2.0),
      Mnist1dConfig(name='noise_x4', description='Both noise scales x4.', noise_multiplier=4.0),
  ]
  DEFAULT_CONFIG_NAME = 'standard'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'signal': tfds.features.Tensor(shape=(SIGNAL_LENGTH,), dtype=np.float32),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('signal', 'label'),
        homepage='https://github.com/greydanus/mnist1d',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated locally
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.corr_noise_scale *= self.builder_config.noise_multiplier
    args.iid_noise_scale *= self.builder_config.noise_multiplier
    data = make_dataset(args)
    return {
        'train': self._generate_examples(data['x'], data['y']),
        'test': self._generate_examples(data['x_test'], data['y_test']),
    }

  def _generate_examples(self, signals, labels):
    for i, (signal, label) in enumerate(zip(signals, labels)):
      yield i, {'signal': np.asarray(signal, np.float32), 'label': int(label)}
