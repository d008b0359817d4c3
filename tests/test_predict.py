"""`python -m sano_jax.predict`: image files of any size/format -> masks and heatmaps of their size.

The run directory is made without training (random params, stats fitted on random images): the
predict path only needs a checkpoint, a config and score_stats.npz.
"""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from sano_jax import checkpointing, localization, models, predict, score
from sano_jax import sde as sde_lib


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  from configs import tiny
  config = tiny.get_config()
  wd = str(tmp_path_factory.mktemp('predict') / 'wd')
  checkpointing.save_config(config, wd)
  model = models.create_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32),
                               np.ones((1,), np.float32))['params']
  # The output convolution starts at zero (no noise predicted, zero scores): perturb every weight.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  store = checkpointing.CheckpointStore(wd)
  store.save_best(1, {'params': params, 'ema_params': params}, 0.0)
  store.close()
  score_fn = score.make_score_fn(model, params, sde_lib.from_config(config), config.localize.t)
  rng = np.random.default_rng(0)
  batches = [rng.uniform(0.3, 0.7, (8, 16, 16, 1)).astype(np.float32) for _ in range(2)]
  stats = localization.fit_score_stats(score_fn, batches)
  localization.save_stats(stats, os.path.join(wd, 'score_stats.npz'))
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


def test_predict_writes_masks_of_original_size(workdir, tmp_path):
  sizes = _write_images(tmp_path / 'in')
  out = tmp_path / 'out'
  results = predict.predict(workdir, str(tmp_path / 'in' / '*'), str(out), batch_size=3,
                            progress=False)
  assert len(results) == len(sizes)
  for stem, (h, w) in sizes.items():
    with Image.open(out / f'{stem}_mask.png') as m:
      assert m.size == (w, h) and m.mode == 'L'
      assert set(np.unique(np.asarray(m))) <= {0, 255}
    with Image.open(out / f'{stem}_heatmap.png') as hm:
      assert hm.size == (w, h) and hm.mode == 'RGB'
  summary = json.loads((out / 'predictions.json').read_text())
  assert len(summary['images']) == len(sizes)
  assert all(np.isfinite(r['max_z']) for r in summary['images'])


def test_predict_matches_localizer_at_model_size(workdir, tmp_path):
  """An image already at the model's size: the mask is exactly the localizer's."""
  (tmp_path / 'in').mkdir()
  img = np.random.default_rng(3).integers(0, 255, (16, 16), dtype=np.uint8)
  Image.fromarray(img, 'L').save(tmp_path / 'in' / 'x.png')
  predict.predict(workdir, str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  _, mask = localization.load_localizer(workdir)(img[None, ..., None])
  got = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png')) > 0
  np.testing.assert_array_equal(got, np.asarray(mask)[0])


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
  shutil.copytree(workdir, wd2, ignore=shutil.ignore_patterns('score_stats.npz'))
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'in' / 'ok.png')
  with pytest.raises(FileNotFoundError, match='run_eval.py'):
    predict.predict(wd2, str(tmp_path / 'in' / 'ok.png'), str(tmp_path / 'o'))


def test_read_image_conversions(tmp_path):
  rgba = np.zeros((4, 5, 4), np.uint8)
  rgba[..., 3] = 0  # fully transparent: composited over white
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 't.png')
  np.testing.assert_allclose(predict.read_image(str(tmp_path / 't.png'), 3), 1.0)
  Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / 'd.png')
  np.testing.assert_allclose(predict.read_image(str(tmp_path / 'd.png'), 1), 1.0)
  rgb = np.zeros((3, 3, 3), np.uint8)
  rgb[..., 0] = 255
  Image.fromarray(rgb, 'RGB').save(tmp_path / 'r.png')
  g = predict.read_image(str(tmp_path / 'r.png'), 1)
  assert g.shape == (3, 3, 1) and 0.2 < g.mean() < 0.4  # ITU-R 601 luma of pure red
  with pytest.raises(ValueError, match='channels'):
    predict.read_image(str(tmp_path / 'r.png'), 2)
