"""TPU and GPU without one: every config's train and eval steps lower for both (jax.export
from this CPU host, on the config's mesh over 8 fake devices), the ragged path's TPU and
GPU exports hold their Pallas kernels, and the dry run sizes a config for a chip."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_main

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py'))
PLATFORMS, STEPS = ('tpu', 'cuda'), ('train', 'eval')


# make test runs each file on one worker (--dist loadfile): computed once.
@pytest.fixture(scope='module')
def lowered(tmp_path_factory):
  out = tmp_path_factory.mktemp('accelerators') / 'result.json'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'accelerator_worker.py'),
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_lowers_for_tpu_and_gpu(lowered, name):
  result = lowered['configs'][name]
  assert 'error' not in result, result.get('error')
  assert sorted(result) == sorted(f'{p}/{s}' for p in PLATFORMS for s in STEPS)


def test_ragged_exports_hold_the_platform_kernels(lowered):
  ragged = lowered['ragged']
  for backend in ('auto', 'megablox'):
    for step in STEPS:
      assert ragged[backend][f'tpu/{step}']['grouped_matmul'].startswith('megablox'), backend
  for backend in ('auto', 'pallas_triton'):
    assert set(ragged[backend]['cuda/train']['kernels']) == {'dynmoe_triton_gmm',
                                                              'dynmoe_triton_tgmm'}
    assert ragged[backend]['cuda/eval']['kernels'] == ['dynmoe_triton_gmm']
  # a kernel lowered for the other platform leaves no kernel call: it would interpret
  assert ragged['megablox']['cuda/train']['kernels'] == []
  assert ragged['pallas_triton']['tpu/train']['kernels'] == []


def test_kernels_split_over_a_mesh_equal_xla(lowered):
  for backend, error in lowered['per_shard_relative_error'].items():
    assert error <= 1e-5, backend


def test_routing_groups_under_shard_map_a2a_equal_the_sort_path(lowered):
  got = lowered['grouped_expert_parallel']
  sort, a2a = got['sort'], got['shard_map_a2a']
  np.testing.assert_allclose(a2a['y'], sort['y'], rtol=1e-5, atol=1e-6)
  assert a2a['dropped'] == sort['dropped'] > 0
  assert a2a['loss'] == pytest.approx(sort['loss'], rel=1e-6)
  assert a2a['capacity'] == sort['capacity'] == 16  # 16 groups x 1 slot per expert


def test_dry_run_state_bytes_are_what_xla_passes_the_step(lowered):
  r = lowered['dry_run_lm_tpu_shrunk']
  counted = r['params'] + r['opt_state'] + r['other_state'] + r['batch_bytes']
  assert abs(r['xla_arguments'] - counted) <= 0.02 * r['xla_arguments'], r
  assert r['opt_state'] == pytest.approx(2 * r['params'], rel=0.01)  # Adam: two moments


def test_export_names_host_callbacks_and_float64():
  import jax
  import jax.numpy as jnp
  from dynmoe_jax.train import export
  step = jax.jit(lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct((3,),
                                                                               jnp.float32), x))
  with pytest.raises(export.ExportError, match=r"^c: the train step for tpu does not lower: "
                                               r".*host callbacks \['pure_callback'\]"):
    export.export_step(step, (jax.ShapeDtypeStruct((3,), jnp.float32),), 'tpu',
                       config_name='c', step='train')
  assert export.offending_ops('%1 = stablehlo.add %0 : tensor<4x8xf64>') == [
      'float64 values (tensor<4x8xf64>)']


def test_dry_run_refuses_a_10x_wider_lm_tpu_in_one_line(tmp_path):
  wider = ['--config.model.dim=7680', '--config.model.mlp_dim=20480',
           '--config.model.moe.hidden_dim=7680']
  proc = run_main(['--config=configs/lm_tpu.py', '--dry_run', '--target=v5e-8', *wider],
                  env={'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: lm_tpu.py does not fit a TPU v5e: the train state alone '
                         'needs'), last
  assert proc.stdout == ''


def test_dry_run_target_typo_is_one_line():
  proc = run_main(['--config=configs/tiny.py', '--dry_run', '--target=v9x'], timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --target='v9x': expected one of")


@pytest.mark.slow
def test_dry_run_of_lm_small_with_ragged_on_v5e_fits_and_names_megablox():
  proc = run_main(['--config=configs/lm_small.py', '--dry_run', '--target=v5e',
                   '--config.model.moe.dispatch_impl=ragged'], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert 'HBM: fits' in out
  for part in ('parameters', 'optimizer state', 'temporaries', 'attention', 'dense', 'expert',
               'roofline on TPU v5e', 'MFU'):
    assert part in out, part
  assert 'grouped-matmul kernel in the lowered step: megablox gmm/tgmm' in out


@pytest.mark.slow
def test_lm_tpu_as_shipped_fits_a_v5e_8_and_its_old_batch_does_not():
  proc = run_main(['--config=configs/lm_tpu.py', '--dry_run', '--target=v5e-8'], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "on 8 x TPU v5e (mesh {'data': 1, 'expert': 8, 'model': 1})" in proc.stdout
  assert 'of   16.000 GB HBM: fits' in proc.stdout
