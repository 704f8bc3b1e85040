"""dynmoe_jax.checkpointing: round trip, half-written steps, unreadable steps set aside."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import checkpointing


def state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.asarray(int(value))}


def test_round_trip_keeps_values_and_meta(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    c.save(step, state(step), {'experts_per_layer': [0, step]})
  assert c.all_steps() == [2, 3]  # keep=2
  step, restored, meta = c.restore_latest(lambda meta: state(0))
  assert step == 3 and meta == {'experts_per_layer': [0, 3]}
  np.testing.assert_array_equal(restored['w'], np.full(3, 3.0))
  c.close()


def test_unreadable_step_is_moved_aside_and_the_previous_one_restored(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), keep=3)
  c.save(1, state(1), {})
  c.save(2, state(2), {})
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '2' / 'state'):
    for name in files:
      open(os.path.join(root, name), 'w').close()
  step, restored, _ = c.restore_latest(lambda meta: state(0))
  assert step == 1 and float(restored['w'][0]) == 1.0
  (aside,) = os.listdir(tmp_path / 'unreadable_checkpoints')
  assert aside.startswith('2.')
  c.close()


def test_a_mismatch_is_not_treated_as_corruption(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), keep=3)
  c.save(1, state(1), {})

  def refuse(meta):
    raise checkpointing.ModelMismatchError('different model')
  with pytest.raises(checkpointing.ModelMismatchError):
    c.restore_latest(refuse)
  assert c.all_steps() == [1] and not (tmp_path / 'unreadable_checkpoints').exists()
  c.close()
