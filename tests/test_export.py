"""`python -m sano_jax.export` and `sano_jax.load_exported`: the artifact gives the live localizer's
outputs bit for bit, rejects damaged files clearly, and runs in an interpreter without flax.

The run directory is made without training (random params, stats fitted on random images), as in
test_predict: export only needs a checkpoint, a config and the inference bundle.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
import sano_jax
from sano_jax import checkpointing, export, score_stats, methods
from sano_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = (1, 3, 8)


def _images(b, seed):
  return np.random.default_rng(seed).uniform(0, 1, (b, 16, 16, 1)).astype(np.float32)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, artifact path): a tiny U-Net, random params, fitted stats, exported by the CLI."""
  from configs import tiny
  config = tiny.get_config()
  # One level (no down/up-sampling) with attention at 16 px: half of tiny's compile time.
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = (16,)
  root = tmp_path_factory.mktemp('export')
  wd = str(root / 'wd')
  checkpointing.save_config(config, wd)
  method = methods.create(config)
  # Random params of the right shapes without running the (slow, eager) init.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        jax.eval_shape(method.init, jax.random.PRNGKey(0)))
  store = checkpointing.CheckpointStore(wd)
  store.save_best(1, {'params': params, 'ema_params': params}, 0.0)
  store.close()
  batches = [rng.uniform(0.3, 0.7, (8, 16, 16, 1)).astype(np.float32) for _ in range(2)]
  stats = score_stats.fit_score_stats(method.field_fn(params), batches)
  rundir.save(wd, config=config, stats=stats, step=1)
  # N at the median z of the test images, so that the masks are neither empty nor full.
  z, _ = rundir.load_localizer(wd)(_images(8, 8))
  config.localize.n_sigma = float(np.median(z))
  rundir.save(wd, config=config, stats=stats, step=1)
  out = str(root / 'out' / 'tiny.sano')
  assert export.main([f'--workdir={wd}', f'--out={out}']) == 0
  return wd, out


@pytest.fixture(scope='module')
def live(run):
  """The live localizer, one for all tests (its compilations are cached per batch size)."""
  return rundir.load_localizer(run[0])


def test_matches_live_localizer_bit_for_bit(run, live):
  _, out = run
  loaded = sano_jax.load_exported(out)
  masks = []
  for b in BATCHES:
    x = _images(b, b)
    z0, m0 = live(x)
    z1, m1 = loaded(x)
    assert z1.shape == (b, 16, 16) and z1.dtype == np.float32 and m1.dtype == np.bool_
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z0), err_msg=f'z, batch {b}')
    np.testing.assert_array_equal(np.asarray(m1), np.asarray(m0), err_msg=f'mask, batch {b}')
    masks.append(np.asarray(m0).ravel())
  assert 0 < np.concatenate(masks).mean() < 1  # the masks are not trivially equal
  # uint8 is converted as the live localizer converts it.
  u8 = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
  for a, b in zip(loaded(u8), live(u8)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Under an outer jit it traces; the params become that jit's constants (as the live localizer's
  # do), which XLA may fold with other rounding: close, not bit for bit.
  x = _images(3, 3)
  z, m = jax.jit(loaded)(x)
  assert z.shape == (3, 16, 16) and m.dtype == np.bool_
  np.testing.assert_allclose(np.asarray(z), np.asarray(live(x)[0]), rtol=1e-5, atol=1e-6)


def test_metadata_records_config_code_and_platforms(run):
  wd, out = run
  assert os.listdir(os.path.dirname(out)) == ['tiny.sano']  # no temporary file left
  md = sano_jax.load_exported(out).metadata
  assert md['config'] == json.loads(rundir.load(wd).config.to_json_best_effort())
  assert md['config']['localize']['n_sigma'] != 3.0  # the config the localizer was exported with
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True, text=True)
  if head.returncode == 0:
    assert md['code_version'] == head.stdout.strip()
  else:
    assert md['code_version'] == f'sano_jax {sano_jax.__version__}'
  assert 'cpu' in md['platforms']
  assert set(md['platforms']) | set(md['platforms_failed']) == {'cpu', 'cuda', 'tpu'}
  assert md['input']['shape'] == ['b', 16, 16, 1]
  assert md['input']['dtypes'] == ['float32', 'uint8']
  assert md['outputs'] == {'z_map': {'shape': ['b', 16, 16], 'dtype': 'float32'},
                           'mask': {'shape': ['b', 16, 16], 'dtype': 'bool'}}
  assert md['payload_size'] + 16 < os.path.getsize(out)


def test_platforms_that_do_not_lower_are_left_out():
  # A primitive that lowers on cpu only stands for an op that some platform cannot lower.
  from jax.extend import core as jex
  from jax.interpreters import mlir
  prim = jex.Primitive('sano_test_cpu_only')
  prim.def_impl(lambda x: x)
  prim.def_abstract_eval(lambda x: x)
  mlir.register_lowering(prim, mlir.lower_fun(lambda x: x, multiple_results=False),
                         platform='cpu')
  fn = jax.jit(prim.bind)
  spec = (jax.ShapeDtypeStruct((2,), np.float32),)
  exported, failed = export._lower(fn, spec, ('cpu', 'cuda', 'tpu'))
  assert exported.platforms == ('cpu',) and sorted(failed) == ['cuda', 'tpu']
  with pytest.raises(ValueError, match='lowers for none'):
    export._lower(fn, spec, ('cuda',))


def _write(path, data):
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def test_damaged_files_are_clear_errors(run, tmp_path):
  _, out = run
  with open(out, 'rb') as f:
    data = f.read()
  _, header_len = export._PREFIX.unpack_from(data, len(export.MAGIC))
  payload_start = len(export.MAGIC) + export._PREFIX.size + header_len
  tampered = bytearray(data)
  tampered[payload_start + 1000] ^= 1
  cases = {
      'tampered': (bytes(tampered), 'sha256 mismatch'),
      'truncated': (data[:-100], 'truncated'),
      'truncated_header': (data[:payload_start - 50], 'truncated in the header'),
      'truncated_magic': (data[:5], 'truncated'),
      'empty': (b'', 'truncated'),
      'appended': (data + b'\0', 'unexpected bytes'),
      'wrong_magic': (b'NOTSANO!' + data[8:], 'wrong magic'),
      'future_version': (data[:8] + export._PREFIX.pack(99, header_len) + data[16:],
                         'format version 99'),
      'corrupt_header': (data[:16] + b'[' + data[17:], 'corrupt header'),
  }
  for name, (blob, message) in cases.items():
    path = _write(tmp_path / f'{name}.sano', blob)
    with pytest.raises(ValueError, match=message) as e:
      sano_jax.load_exported(path)
    assert path in str(e.value), name
  with pytest.raises(FileNotFoundError, match='sano_jax.export'):
    sano_jax.load_exported(str(tmp_path / 'missing.sano'))


def test_bad_inputs_and_cli_errors(run, tmp_path, capsys):
  _, out = run
  loaded = sano_jax.load_exported(out)
  with pytest.raises(ValueError, match='do not match'):
    loaded(np.zeros((2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match='rank 4|shape'):
    loaded(np.zeros((16, 16, 1), np.float32))
  with pytest.raises(ValueError, match='empty batch'):
    loaded(np.zeros((0, 16, 16, 1), np.float32))
  x = _images(2, 0)
  x[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match='non-finite'):
    loaded(x)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    loaded(2 * _images(2, 0) + 0.5)
  assert export.main([f'--workdir={tmp_path / "nothing"}', f'--out={tmp_path / "x.sano"}']) == 1
  assert 'not a sano-jax run directory' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x.sano')


def test_fresh_interpreter_without_flax(run, live, tmp_path):
  _, out = run
  x = _images(3, 3)
  np.save(tmp_path / 'x.npy', x)
  code = (
      'import sys, numpy as np, sano_jax\n'
      f'loc = sano_jax.load_exported({out!r})\n'
      f'z, m = loc(np.load({str(tmp_path / "x.npy")!r}))\n'
      f'np.savez({str(tmp_path / "y.npz")!r}, z=np.asarray(z), m=np.asarray(m))\n'
      "bad = [k for k in sys.modules if k.split('.')[0] == 'flax'"
      " or k.startswith('sano_jax.models') or k in ('sano_jax.localization', 'sano_jax.methods')]\n"
      "assert not bad, bad\n")
  # The parent's environment (backend, XLA_FLAGS): on CPU even the number of simulated devices
  # changes XLA's partitioning, and with it the last bit of the live localizer's own output.
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True,
                        text=True, env=env, timeout=helpers.subprocess_timeout())
  assert proc.returncode == 0, proc.stderr[-4000:]
  z0, m0 = live(x)
  with np.load(tmp_path / 'y.npz') as y:
    np.testing.assert_array_equal(y['z'], np.asarray(z0))
    np.testing.assert_array_equal(y['m'], np.asarray(m0))
