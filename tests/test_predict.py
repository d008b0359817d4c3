"""`python -m sano_jax.predict`: image files of any size/format -> masks and heatmaps of their size.

The run directory is made without training (random params, stats fitted on random images): the
predict path only needs a checkpoint, a config and the inference bundle.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sano_jax import checkpointing, score_stats, models, predict, score
from sano_jax import rundir
from sano_jax import sde as sde_lib
from tests.helpers import random_params


def _z_maps(workdir, images_u8):
  z, mask = rundir.load_localizer(workdir)(images_u8)
  return np.asarray(z), np.asarray(mask)


def _random_u8(seed, shape):
  return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from configs import tiny
  config = tiny.get_config()
  wd = str(tmp_path_factory.mktemp('predict') / 'wd')
  checkpointing.save_config(config, wd)
  model = models.create_model(config)
  params = random_params(config, seed=1)  # every weight random (init zeroes the output conv)
  store = checkpointing.CheckpointStore(wd)
  store.save_best(1, {'params': params, 'ema_params': params}, 0.0)
  store.close()
  score_fn = score.make_score_fn(model, params, sde_lib.from_config(config), config.localize.t[0])
  rng = np.random.default_rng(0)
  batches = [rng.uniform(0.3, 0.7, (8, 16, 16, 1)).astype(np.float32) for _ in range(2)]
  stats = score_stats.fit_score_stats(score_fn, batches)
  rundir.save(wd, config=config, stats=stats, step=1)
  # With N = 3 the random model flags no pixel at all (max z ~ 1), and two empty masks always
  # agree: put N at the median z of random images so that masks are neither empty nor full.
  z, _ = _z_maps(wd, _random_u8(10, (4, 16, 16, 1)))
  config.localize.n_sigma = float(np.median(z))
  rundir.save(wd, config=config, stats=stats, step=1)
  return wd


def _write_images(folder):
  folder.mkdir()
  rng = np.random.default_rng(0)
  sizes = {}
  Image.fromarray(rng.integers(0, 255, (20, 33), dtype=np.uint8), 'L').save(folder / 'gray.png')
  sizes['gray'] = (20, 33)
  Image.fromarray(rng.integers(0, 255, (41, 27, 3), dtype=np.uint8), 'RGB').save(folder / 'rgb.jpg')
  sizes['rgb'] = (41, 27)
  Image.fromarray(rng.integers(0, 255, (9, 12, 4), dtype=np.uint8), 'RGBA').save(folder / 'alpha.png')
  sizes['alpha'] = (9, 12)
  Image.fromarray(rng.integers(0, 65535, (18, 16), dtype=np.uint16)).save(folder / 'deep.tif')
  sizes['deep'] = (18, 16)
  return sizes


def _nearest_candidates(n_out, n_in):
  """Source indices of a nearest-neighbour resize n_in -> n_out (pixel centres aligned): (lo, hi),
  equal except at exact ties, where either neighbour is a correct answer."""
  c = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  lo = np.clip(np.ceil(c - 0.5 - 1e-9), 0, n_in - 1).astype(int)
  hi = np.clip(np.floor(c + 0.5 + 1e-9), 0, n_in - 1).astype(int)
  return lo, hi


def _model_scale_oracle(localizer, im, size=16):
  """The image's z-map and mask at the model's scale, computed the straightforward way: the whole
  image resized (short side = size, aspect kept), each pixel scored by the localizer on the window
  (of predict.window_offsets) whose centre is nearest, pixel by pixel."""
  from skimage import transform  # pylint: disable=g-import-not-at-top
  h, w = im.shape[:2]
  h2, w2 = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
  x = np.clip(transform.resize(im, (h2, w2), order=1, anti_aliasing=True, mode='edge',
                               preserve_range=True), 0, 1).astype(np.float32)
  offsets = predict.window_offsets(h2, w2, size)
  assert all(0 <= t <= h2 - size and 0 <= l <= w2 - size for t, l in offsets)
  maps = [tuple(np.asarray(a)[0] for a in localizer(x[None, t:t + size, l:l + size]))
          for t, l in offsets]
  z, m = np.zeros((h2, w2), np.float32), np.zeros((h2, w2), bool)
  for r in range(h2):
    for c in range(w2):
      d = [max(abs(r + 0.5 - t - size / 2), abs(c + 0.5 - l - size / 2)) for t, l in offsets]
      k = int(np.argmin(d))
      t, l = offsets[k]
      z[r, c], m[r, c] = maps[k][0][r - t, c - l], maps[k][1][r - t, c - l]
  return z, m, len(offsets)


def test_predict_writes_masks_of_original_size(workdir, tmp_path):
  """Every pixel of every image is scored: the masks are the model-scale masks of the whole image
  (windows where it is not square), upsampled by nearest neighbour to the image's size."""
  sizes = _write_images(tmp_path / 'in')
  out = tmp_path / 'out'
  results = predict.predict(workdir, str(tmp_path / 'in' / '*'), str(out), batch_size=3,
                            progress=False)
  assert len(results) == len(sizes)
  by_stem = {os.path.splitext(os.path.basename(r['path']))[0]: r for r in results}
  summary = json.loads((out / 'predictions.json').read_text())
  assert len(summary['images']) == len(sizes)
  n_sigma = float(rundir.read_manifest(workdir)['localize']['n_sigma'])  # the evaluated N
  assert summary['n_sigma'] == pytest.approx(n_sigma)
  localizer = rundir.load_localizer(workdir)
  for stem, (h, w) in sizes.items():
    im = predict.read_image(str(next((tmp_path / 'in').glob(stem + '.*'))), 1)
    z, small_mask, windows = _model_scale_oracle(localizer, im)
    assert 0 < small_mask.sum() < small_mask.size, (stem, small_mask.sum())
    with Image.open(out / f'{stem}_mask.png') as m:
      assert m.size == (w, h) and m.mode == 'L'
      got = np.asarray(m)
    assert set(np.unique(got)) <= {0, 255}
    got = got > 0
    (ylo, yhi), (xlo, xhi) = _nearest_candidates(h, z.shape[0]), _nearest_candidates(w, z.shape[1])
    allowed = [small_mask[np.ix_(ys, xs)] for ys in (ylo, yhi) for xs in (xlo, xhi)]
    wrong = ~np.any([got == a for a in allowed], axis=0)
    assert not wrong.any(), f'{stem}: {int(wrong.sum())} of {wrong.size} pixels differ'
    r = by_stem[stem]
    assert r['scored_at'] == {'height': z.shape[0], 'width': z.shape[1], 'windows': windows,
                              'geometry': 'square'}
    assert (r['height'], r['width']) == (h, w)
    assert r['anomalous_fraction'] == pytest.approx(got.mean(), abs=1e-12)
    assert r['max_z'] == pytest.approx(float(z.max()), rel=1e-5)
    with Image.open(out / f'{stem}_heatmap.png') as hm:
      assert hm.size == (w, h) and hm.mode == 'RGB'
  assert by_stem['gray']['scored_at']['windows'] > 1  # 20 x 33: the image is wider than a window
  assert [r['path'] for r in summary['images']] == [r['path'] for r in results]


def test_predict_matches_localizer_at_model_size(workdir, tmp_path):
  """An image already at the model's size: the mask and the z-map are exactly the localizer's."""
  (tmp_path / 'in').mkdir()
  img = _random_u8(3, (16, 16))
  Image.fromarray(img, 'L').save(tmp_path / 'in' / 'x.png')
  results = predict.predict(workdir, str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  z, mask = (np.asarray(a)[0] for a in rundir.load_localizer(workdir)(img[None, ..., None]))
  assert 0 < mask.sum() < mask.size  # neither test is about an empty (or full) mask
  got = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png')) > 0
  np.testing.assert_array_equal(got, mask)
  assert results[0]['anomalous_fraction'] == pytest.approx(mask.mean(), abs=1e-12)
  assert results[0]['max_z'] == pytest.approx(float(z.max()), rel=1e-5)
  # The heatmap is the overlay of exactly this z-map (up to uint8 rounding).
  n_sigma = float(rundir.read_manifest(workdir)['localize']['n_sigma'])  # the evaluated N
  expected = predict.heatmap_overlay(img[..., None] / 255.0, z, n_sigma).astype(int)
  heat = np.asarray(Image.open(tmp_path / 'out' / 'x_heatmap.png')).astype(int)
  assert np.abs(heat - expected).max() <= 1


def test_predict_errors(workdir, tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match='no image file matches'):
    predict.predict(workdir, str(tmp_path / 'nothing' / '*.jpg'), str(tmp_path / 'o'))
  assert predict.main([f'--workdir={workdir}', f'--images={tmp_path}/none*.png',
                       f'--out={tmp_path}/o']) == 1
  assert 'no image file matches' in capsys.readouterr().err
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'broken.jpg').write_bytes(b'this is not a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.predict(workdir, str(tmp_path / 'in' / '*.jpg'), str(tmp_path / 'o'), progress=False)
  # A run without score statistics.
  import shutil
  wd2 = str(tmp_path / 'nostats')
  shutil.copytree(workdir, wd2, ignore=shutil.ignore_patterns('inference*'))
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'in' / 'ok.png')
  with pytest.raises(FileNotFoundError, match='run_eval.py'):
    predict.predict(wd2, str(tmp_path / 'in' / 'ok.png'), str(tmp_path / 'o'))
  # --out among the inputs: refused before any work; an earlier prediction's files: listed.
  with pytest.raises(ValueError, match=r'--out=.*in is a folder of the input images'):
    predict.predict(workdir, str(tmp_path / 'in' / 'ok.png'), str(tmp_path / 'in'))
  assert not (tmp_path / 'in' / 'ok_mask.png').exists()


def test_predict_says_which_earlier_outputs_it_replaces(workdir, tmp_path, caplog):
  (tmp_path / 'in').mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'in' / 'ok.png')
  predict.predict(workdir, str(tmp_path / 'in' / 'ok.png'), str(tmp_path / 'o'), progress=False)
  with caplog.at_level('WARNING'):
    predict.predict(workdir, str(tmp_path / 'in' / 'ok.png'), str(tmp_path / 'o'), progress=False)
  assert 'replacing 3 file(s) of an earlier prediction' in caplog.text
  assert 'predictions.json, ok_mask.png, ok_heatmap.png' in caplog.text


def test_read_image_conversions(tmp_path):
  rgba = np.zeros((4, 5, 4), np.uint8)
  rgba[..., 3] = 0  # fully transparent: composited over white
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 't.png')
  np.testing.assert_allclose(predict.read_image(str(tmp_path / 't.png'), 3), 1.0)
  # 16-bit: scaled by 65535 (a divide-by-255-then-clip would give 1 everywhere but 0).
  deep = np.array([[0, 257, 32768], [65535, 16384, 49151]], np.uint16)
  Image.fromarray(deep).save(tmp_path / 'd.png')
  got = predict.read_image(str(tmp_path / 'd.png'), 1)
  assert got.shape == (2, 3, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[..., 0], deep / 65535.0, atol=0.5 / 255 + 1e-6)
  assert abs(float(got[0, 2, 0]) - 0.5) <= 1 / 255
  # Colour to gray: ITU-R 601-2 luma, L = R 299/1000 + G 587/1000 + B 114/1000 (rounded to 8 bit).
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                  [[10, 200, 77], [250, 128, 3], [31, 62, 240]]], np.uint8)
  Image.fromarray(rgb, 'RGB').save(tmp_path / 'r.png')
  g = predict.read_image(str(tmp_path / 'r.png'), 1)
  assert g.shape == (2, 3, 1)
  luma = rgb.astype(np.float64) @ np.array([299, 587, 114]) / 1000
  np.testing.assert_allclose(g[..., 0] * 255, luma, atol=0.5 + 1e-4)
  # Gray to RGB: three equal channels.
  c3 = predict.read_image(str(tmp_path / 'd.png'), 3)
  assert c3.shape == (2, 3, 3)
  np.testing.assert_array_equal(c3, np.repeat(got, 3, axis=-1))
  with pytest.raises(ValueError, match='channels'):
    predict.read_image(str(tmp_path / 'r.png'), 2)


def test_stretched_datasets_are_scored_stretched_and_the_others_whole_at_their_scale():
  """11k Hands stored each photo stretched to a square: predict stretches too (one window); the
  other datasets kept the central square at scale S / short side: predict keeps the aspect ratio
  and covers the long side with windows, at most half a window apart."""
  from sano_jax.datasets import images as images_lib  # pylint: disable=g-import-not-at-top
  assert images_lib.stored_geometry('hands11k/256') == 'stretch'
  assert images_lib.stored_geometry('folder') == images_lib.stored_geometry(
      'sano_textures/brick') == 'square'
  im = np.random.default_rng(0).uniform(size=(20, 33, 1)).astype(np.float32)
  assert predict._at_model_scale(im, 16, 'stretch').shape == (16, 16, 1)  # pylint: disable=protected-access
  wide = predict._at_model_scale(im, 16, 'square')  # pylint: disable=protected-access
  assert wide.shape == (16, 26, 1)
  offs = predict.window_offsets(16, 26, 16)
  lefts = [l for _, l in offs]
  assert lefts[0] == 0 and lefts[-1] == 10 and max(np.diff(lefts)) <= 8
