"""Synthetic anomalies of the label-free calibration (sano_jax.synthetic): each kind changes exactly
its masked region, deterministically in the seed; the crack kind is a thin connected line; the
configured kinds are checked."""
import numpy as np
import pytest
from scipy import ndimage

from sano_jax import synthetic
from tests.helpers import tiny_run_config


def test_synthesize_changes_exactly_the_masked_region():
  rng = np.random.default_rng(0)
  images = rng.uniform(0.2, 0.8, (10, 24, 20, 3)).astype(np.float32)
  out, masks, kinds = synthetic.synthetic_set(images, seed=1)
  assert out.shape == images.shape and masks.shape == (10, 24, 20) and masks.dtype == bool
  assert set(kinds) == set(synthetic.KINDS)
  for a, b, m in zip(out, images, masks):
    assert 24 // 4 * (20 // 4) * 0.7 <= m.sum() <= 12 * 10  # sides in [S/4, S/2] (ellipse: ~pi/4)
    assert np.array_equal(a[~m], b[~m])  # nothing changes outside the mask
    assert np.abs(a[m] - b[m]).max() > 0  # and something changes inside
  blurred, m = synthetic.synthesize(images[0], images[1], np.random.default_rng(0), 'blur')
  assert np.array_equal(blurred[~m], images[0][~m]) and blurred[m].std() < images[0][m].std()
  with pytest.raises(ValueError, match='unknown synthetic anomaly kind'):
    synthetic.synthesize(images[0], images[1], np.random.default_rng(0), 'rain')
  again, masks2, _ = synthetic.synthetic_set(images, seed=1)
  assert np.array_equal(again, out) and np.array_equal(masks2, masks)  # deterministic in the seed


def test_several_draws_give_each_image_other_kinds_and_keep_the_first_draw():
  rng = np.random.default_rng(4)
  images = rng.uniform(0.2, 0.8, (6, 16, 16, 1)).astype(np.float32)
  one, one_masks, one_kinds = synthetic.synthetic_set(images, seed=5)
  out, masks, kinds = synthetic.synthetic_set(images, seed=5, draws=3)
  assert out.shape == (18, 16, 16, 1) and masks.shape == (18, 16, 16) and len(kinds) == 18
  # Draw 0 is the one-draw set; the later draws are new anomalies of the same images.
  assert np.array_equal(out[:6], one) and np.array_equal(masks[:6], one_masks)
  assert kinds[:6] == one_kinds
  for r in (1, 2):
    assert not np.array_equal(masks[6 * r:6 * r + 6], one_masks)
    for i in range(6):
      assert np.array_equal(out[6 * r + i][~masks[6 * r + i]], images[i][~masks[6 * r + i]])
  per_image = [{kinds[6 * r + i] for r in range(3)} for i in range(6)]
  assert all(len(k) == 3 for k in per_image)  # another kind each draw (4 kinds cycle)


def test_a_synthetic_crack_is_a_thin_connected_line_of_shifted_intensity():
  rng = np.random.default_rng(3)
  images = rng.uniform(0.3, 0.7, (8, 64, 48, 1)).astype(np.float32)
  out, masks, kinds = synthetic.synthetic_set(images, seed=2, kinds_cycle=('crack',))
  assert kinds == ['crack'] * 8
  for a, b, m in zip(out, images, masks):
    assert np.array_equal(a[~m], b[~m])
    assert np.abs(a[m] - b[m]).mean() > 0.1  # 1.5-3 image stds (~0.12) away
    # Thin: eroding by the widest allowed half-width leaves nothing; long: a bounding box side of
    # at least S/16 px; one 8-connected piece (the walk may leave the image only at its end).
    assert not ndimage.binary_erosion(m, iterations=2).any()
    ys, xs = np.nonzero(m)
    assert max(np.ptp(ys), np.ptp(xs)) >= 48 // 16
    assert ndimage.label(m, structure=np.ones((3, 3)))[1] == 1
  config = tiny_run_config('unused')
  config.localize.synthetic_kinds = ('crack,noise',)  # as a command-line override arrives
  assert synthetic.kinds_of(config) == ('crack', 'noise')
  config.localize.synthetic_kinds = ('crack', 'rain')
  with pytest.raises(ValueError, match=r"synthetic_kinds: unknown kind\(s\) \['rain'\]"):
    synthetic.kinds_of(config)
