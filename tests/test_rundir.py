"""The run directory's inference bundle (sano_jax/rundir.py): each way the files of a run could pair
wrongly is a clear error, and what loads computes what the evaluation computed.

Run directories with random params (tests.helpers.random_run_dir): no training."""
import json
import os
import shutil

import numpy as np
import pytest

from sano_jax import checkpointing, files, localization, score_stats, methods, rundir, train
from tests.helpers import random_run_dir, tiny_config

S = 16


def _model_field(params):
  return methods.create(tiny_config()).field_fn(params)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return random_run_dir(str(tmp_path_factory.mktemp('rundir') / 'run'), tiny_config())


@pytest.fixture
def wd(run_dir, tmp_path):
  dst = str(tmp_path / 'run')
  shutil.copytree(run_dir, dst)
  return dst


def _images(n=2, seed=0):
  return np.random.default_rng(seed).uniform(0.2, 0.8, (n, S, S, 1)).astype(np.float32)


def _edit_manifest(wd, edit):
  path = os.path.join(wd, rundir.MANIFEST)
  with open(path) as f:
    m = json.load(f)
  edit(m)
  with open(path, 'w') as f:
    json.dump(m, f)


def test_stale_statistics_after_training_went_on_are_an_error(wd):
  """Training resumed after run_eval.py saved a better checkpoint: the statistics belong to the old
  one, and load_localizer says so instead of pairing them with the new params."""
  params = rundir.load(wd).params
  store = checkpointing.CheckpointStore(wd)
  store.save_best(5, {'params': params, 'ema_params': params}, -1.0)  # a better validation loss
  store.close()
  with pytest.raises(ValueError, match=r'fitted with the checkpoint of step 1, but the checkpoint '
                     r".*is now step 5 .*rerun run_eval\.py --workdir="):
    rundir.load_localizer(wd)


def test_a_t_changed_at_evaluation_is_what_inference_uses(tmp_path):
  """run_eval.py --config.localize.t=0.05 without calibration: config.json keeps t = 0.02, and the
  bundle's t (the one its statistics were fitted at) is what load_localizer localizes with: the
  same z as localize() at t = 0.05 with those statistics, not the map at config.json's t."""
  config = tiny_config()
  wd = random_run_dir(str(tmp_path / 'run'), config, field=_model_field)
  bundle = rundir.load(wd)
  at = lambda t: methods.create(rundir.with_localize(bundle.config, {**bundle.manifest['localize'],
                                                                     't': [t]}))
  evaluated = tiny_config(**{'localize.t': (0.05,)})  # the evaluation's config
  stats = score_stats.fit_score_stats(at(0.05).field_fn(bundle.params), [_images(4, seed=1)])
  rundir.save(wd, config=evaluated, stats=stats, step=1)
  assert tuple(checkpointing.load_config(wd).localize.t) == (0.02,)
  z, _ = rundir.load_localizer(wd)(_images())
  want, _ = localization.localize(at(0.05).field_fn(bundle.params), _images(), stats)
  other, _ = localization.localize(at(0.02).field_fn(bundle.params), _images(), stats)
  np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(other) - np.asarray(want)).max() > 1e-3


def test_statistics_at_another_t_set_than_the_manifest_are_an_error(wd):
  """Statistics and settings of different t: refused when written, and when read (a manifest
  edited by hand to another t)."""
  with pytest.raises(ValueError, match=r'statistics at t=\[0\.02, 0\.1\], but the config '
                     r'localizes at t=\[0\.02\]'):
    rundir.save(wd, config=tiny_config(), stats=_fitted_multi(), step=1)
  rundir.save(wd, config=tiny_config(**{'localize.t': (0.02, 0.1)}), stats=_fitted_multi(), step=1)
  assert rundir.load(wd).method.ts == (0.02, 0.1)
  _edit_manifest(wd, lambda m: m['localize'].__setitem__('t', [0.01]))
  with pytest.raises(ValueError, match=r'stats-.*\.npz holds statistics at t=\[0\.02, 0\.1\], '
                     r'but .*inference\.json localizes at t=\[0\.01\].*rerun run_eval\.py'):
    rundir.load(wd)


def _fitted_multi():
  stats = score_stats.init_multi_stats((S, S, 1), (0.02, 0.1))
  step = score_stats.make_stats_step(lambda x: [-x, 0.5 * x])
  return score_stats.finalize(step(stats, _images(4), np.ones(4, bool)))


def test_a_workdir_of_other_data_does_not_resume(wd):
  with pytest.raises(ValueError, match=r"holds a run trained on other data \(data\.dataset: run "
                     r"'in-memory' vs config 'textures/brick'\)"):
    train.train_and_evaluate(tiny_config(**{'data.dataset': 'textures/brick'}), wd,
                             train_source=[0], val_source=[0])
  with pytest.raises(ValueError, match=r"data\.root: run None vs config '/data/bottle'"):
    train.train_and_evaluate(tiny_config(**{'data.root': '/data/bottle'}), wd, train_source=[0],
                             val_source=[0])


@pytest.mark.parametrize('field, value, message', [
    ('n_sigma', float('nan'), r'localize\.n_sigma=nan is not a finite number'),
    ('n_sigma', None, r'localize\.n_sigma=None is not a finite number'),
    ('stats', 'bogus', r"localize\.stats='bogus' is not one of"),
    ('t', [0.0], r'localize\.t=\[0\.0\] is not a non-empty list of t in \(0, 1\]'),
    ('smoothing_sigma', 'two', r"localize\.smoothing_sigma='two' is not a finite number"),
])
def test_a_damaged_or_edited_settings_record_is_an_error(wd, field, value, message):
  _edit_manifest(wd, lambda m: m['localize'].__setitem__(field, value))
  with pytest.raises(ValueError, match=message + r'.*rerun run_eval\.py'):
    rundir.load_localizer(wd)


def test_a_bundle_of_an_older_version_says_to_evaluate_again(wd):
  _edit_manifest(wd, lambda m: m.__setitem__('version', rundir.VERSION - 1))
  with pytest.raises(ValueError, match=rf'version={rundir.VERSION - 1}: the bundle was made by an '
                     r'older sano-jax .*rerun run_eval\.py'):
    rundir.load(wd)


def test_a_calibration_record_that_is_not_the_applied_one_is_an_error(wd):
  _edit_manifest(wd, lambda m: m.__setitem__('calibration', {'t': [0.01], 'rule': 'per_pixel',
                                                             'n_sigma': 3.0}))
  with pytest.raises(ValueError, match=r"calibration=.* is not the calibration that set the "
                     r"localize block \(\{'n_sigma': 3\.0, 'rule': 'global'\}\)"):
    rundir.load(wd)


def test_a_truncated_manifest_is_an_error(wd):
  path = os.path.join(wd, rundir.MANIFEST)
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text[:len(text) // 2])
  with pytest.raises(ValueError, match=r'inference\.json is not valid JSON'):
    rundir.load(wd)


def test_a_kill_between_the_statistics_and_the_manifest_leaves_the_previous_bundle(
    wd, monkeypatch):
  """The evaluation writes the new statistics part, then is killed before the manifest: the
  previous bundle still loads (same maps), and the next complete save deletes the orphan part."""
  before = rundir.load_localizer(wd)(_images())
  old_manifest = rundir.read_manifest(wd)
  real = files.atomic_write_json

  def killed(path, obj, **kw):
    if str(path).endswith(rundir.MANIFEST):
      raise KeyboardInterrupt('killed')
    return real(path, obj, **kw)
  monkeypatch.setattr(files, 'atomic_write_json', killed)
  other = score_stats.fit_score_stats(lambda x: -2.0 * x, [_images(4, seed=3)])
  with pytest.raises(KeyboardInterrupt):
    rundir.save(wd, config=tiny_config(**{'localize.n_sigma': 1.5}), stats=other, step=1)
  monkeypatch.setattr(files, 'atomic_write_json', real)
  assert len(os.listdir(os.path.join(wd, rundir.PARTS_DIR))) == 2  # the new part is there
  assert rundir.read_manifest(wd) == old_manifest
  after = rundir.load_localizer(wd)(_images())
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
  rundir.save(wd, config=tiny_config(), stats=other, step=1)
  assert len(os.listdir(os.path.join(wd, rundir.PARTS_DIR))) == 1


def test_a_workdir_of_the_layout_before_the_bundle_says_what_to_run(wd):
  os.remove(os.path.join(wd, rundir.MANIFEST))
  with open(os.path.join(wd, 'score_stats.npz'), 'wb') as f:
    f.write(b'old')
  with pytest.raises(FileNotFoundError, match=r'it holds score_stats\.npz from before the bundle '
                     r'format; rerun run_eval\.py --workdir='):
    rundir.load(wd)


def test_the_localizer_jits_and_matches_localize_with_the_bundle(tmp_path):
  """load_localizer = localize(method field, bundle stats, bundle settings), eagerly (host checks
  first) and under an outer jit."""
  import jax  # pylint: disable=g-import-not-at-top
  wd = random_run_dir(str(tmp_path / 'run'), tiny_config(), field=_model_field)
  bundle = rundir.load(wd)
  loc = rundir.localizer(bundle)
  images = _images(3)
  want = localization.localize(bundle.method.field_fn(bundle.params), images, bundle.stats,
                               **localization.settings(bundle.config.localize))
  for got in (loc(images), jax.jit(loc)(images)):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
  images[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match='non-finite'):
    loc(images)
