"""`evaluate` end to end with every healthy-statistics rule (per_pixel, two_sided, quantile), with the
raw params (use_ema=False), and the zero-std error: metrics.json against scikit-learn on the z-maps
of `load_localizer`, and each rule's z-map against an independent numpy/scipy recomputation from
the method's field and the saved statistics."""
import shutil

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi
from sklearn import metrics as skm

from sano_jax import checkpointing, evaluate, rundir, train
from tests.helpers import split_slices, tiny_run_config


@pytest.fixture(scope='module')
def base(tmp_path_factory, tiny_run):
  """The shared tiny run (tests/conftest.py, never written to) and small in-memory splits of its
  data: every variant evaluates these images and the recomputations read the same ones."""
  config, workdir = tiny_run
  sources = split_slices(config, train=32, val=64, test=64)
  return tmp_path_factory.mktemp('rules'), workdir, sources


def _variant(base, name, **overrides):
  """A copy of the trained run whose config.json carries `overrides`, evaluated on the small
  splits (no bootstrap: no assertion reads it)."""
  root, workdir, sources = base
  wd = str(root / name)
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns('eval', 'inference*'))
  config = checkpointing.load_config(wd)
  for key, value in {'eval.bootstrap_runs': 0, **overrides}.items():
    block, field = key.split('.')
    config[block][field] = value
  checkpointing.save_config(config, wd)
  return config, wd, evaluate.evaluate(None, wd, **sources)


def _split(source):
  return (np.stack([e['image'] for e in source]).astype(np.float32) / 255.0,
          np.stack([e['mask'][..., 0] for e in source]) > 0)


def _anomaly_maps(wd, images, ema):
  """A = G_2 * mean_c |field| with scipy's gaussian filter (mode reflect), from the run's params."""
  _, method, params, _ = checkpointing.restore_for_inference(wd, ema=ema)
  field = jax.jit(method.field_fn(params))
  f = np.concatenate([np.asarray(field(2.0 * images[s:s + 64] - 1.0))
                      for s in range(0, len(images), 64)]).astype(np.float64)
  return np.stack([ndi.gaussian_filter(np.abs(x).mean(-1), 2.0, mode='reflect', truncate=4.0)
                   for x in f])


@pytest.fixture(scope='module')
def ema_maps(base):
  """The EMA params' anomaly maps of the test and validation images (the same for every rule)."""
  _, workdir, sources = base
  return tuple(_anomaly_maps(workdir, _split(sources[k])[0], ema=True)
               for k in ('test_source', 'val_source'))


def _localized(wd, images):
  localizer = rundir.load_localizer(wd)
  out = [localizer(images[s:s + 64]) for s in range(0, len(images), 64)]
  return (np.concatenate([np.asarray(z) for z, _ in out]).astype(np.float64),
          np.concatenate([np.asarray(m) for _, m in out]))


def _check_metrics(out, z, mask, y):
  assert abs(skm.roc_auc_score(y.ravel(), z.ravel()) - out['auroc']) < 1e-3
  assert abs(skm.average_precision_score(y.ravel(), z.ravel()) - out['auprc']) < 1e-3
  assert abs(skm.f1_score(y.ravel(), mask.ravel(), zero_division=1.0) - out['n_sigma']['dice']) < 1e-3


@pytest.mark.parametrize('rule', ['per_pixel', 'two_sided', 'quantile'])
def test_rule_end_to_end(base, ema_maps, rule):
  overrides = {'localize.two_sided': True} if rule == 'two_sided' else {'localize.stats': rule}
  config, wd, out = _variant(base, rule, **overrides)
  assert out['localization']['rule'] == rule
  images, y = _split(base[2]['test_source'])
  z, mask = _localized(wd, images)
  _check_metrics(out, z, mask, y)
  # The rule itself, recomputed from the field and the healthy maps of the validation images.
  a, healthy = ema_maps
  n = float(config.localize.n_sigma)
  if rule == 'per_pixel':
    want = (a - healthy.mean(0)) / healthy.std(0)
  elif rule == 'two_sided':
    want = np.abs(a - healthy.mean()) / healthy.std()
  else:  # z = A / std of the signed field; the mask: A above the (1 - fpr) healthy quantile
    stats = rundir.load(wd).stats
    want = a / float(stats.std)
    q = np.quantile(healthy, 1.0 - float(config.localize.target_fpr))
    assert abs(float(stats.quantile(1.0 - float(config.localize.target_fpr))) / q - 1) < 1e-2
    unsure = np.abs(a / q - 1) < 1e-2  # pixels within the histogram's resolution of q
    np.testing.assert_array_equal(mask[~unsure], (a > q)[~unsure])
  np.testing.assert_allclose(z, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max()))
  if rule != 'quantile':
    np.testing.assert_array_equal(mask, z > n)


def test_raw_params_end_to_end(base, ema_maps):
  config, wd, out = _variant(base, 'raw', **{'localize.use_ema': False})
  images, y = _split(base[2]['test_source'])
  z, mask = _localized(wd, images)
  _check_metrics(out, z, mask, y)
  raw = _anomaly_maps(wd, images, ema=False)
  stats = rundir.load(wd).stats
  np.testing.assert_allclose(z, raw / float(stats.std), rtol=2e-3, atol=1e-4)
  ema = ema_maps[0]
  assert np.abs(raw - ema).max() > 1e-3 * np.abs(ema).max()  # the two param sets differ


def test_constant_model_is_a_clear_error(tmp_path, textures_dir):
  # Warm-up from lr 0: the single step leaves the zero-initialised output layer at zero, so the
  # score is 0 everywhere and the healthy std is 0 (the EMA params too, whatever the EMA rate).
  # The shared run's settings otherwise: its compiled training step is read back.
  config = tiny_run_config(textures_dir, steps=1, **{'optim.warmup_steps': 50})
  wd = str(tmp_path / 'wd')
  train.train_and_evaluate(config, wd)
  sources = split_slices(config, train=8, val=8, test=8)
  with pytest.raises(ValueError, match=r"healthy std of the 'sano' field is 0\.0: the model is constant"):
    evaluate.evaluate(None, wd, **sources)
