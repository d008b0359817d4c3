"""Tests of sano_jax.localization: the filter vs scipy, streaming stats vs numpy, localize."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

import sano_jax
from sano_jax import localization as L, anomaly_maps as AM, score_stats as SS

S2 = 0.3**2


def gauss_score(x):
  """Score of N(0, s^2): -x / s^2."""
  return -x / S2


@pytest.mark.parametrize('shape', [(16, 16), (9, 23), (3, 2), (1, 1), (1, 7), (40, 5)])
@pytest.mark.parametrize('sigma', [0.0, 0.5, 1.0, 2.0, 3.7])
def test_gaussian_filter_matches_scipy(shape, sigma):
  x = np.random.default_rng(0).normal(size=(2,) + shape)
  ref = np.stack([ndi.gaussian_filter(xi, sigma) if sigma else xi for xi in x])
  got = jax.jit(functools.partial(AM.gaussian_filter2d, sigma=sigma))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_gaussian_filter_rejects_negative_sigma():
  with pytest.raises(ValueError, match='sigma'):
    AM.gaussian_filter2d(jnp.zeros((4, 4)), -1.0)


def _batches(rng, n_batches=4, b=3, shape=(8, 6, 3)):
  out = []
  for i in range(n_batches):
    x = rng.uniform(size=(b,) + shape).astype(np.float32)
    valid = np.ones(b, bool)
    if i == n_batches - 1:
      valid[1:] = False
      x[1:] = np.nan  # garbage in padding must not leak
    out.append((x, valid))
  return out


def test_streaming_stats_match_numpy():
  rng = np.random.default_rng(1)
  batches = _batches(rng)
  stats = SS.fit_score_stats(gauss_score, batches, smoothing_sigma=1.0)
  imgs = np.concatenate([x[v] for x, v in batches]).astype(np.float64)
  scores = -(2 * imgs - 1) / S2
  maps = np.stack([ndi.gaussian_filter(np.abs(s).mean(-1), 1.0) for s in scores])
  assert float(stats.count) == scores.size and float(stats.n_images) == len(imgs)
  np.testing.assert_allclose(float(stats.mean), scores.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(stats.std), scores.std(), rtol=1e-5)
  np.testing.assert_allclose(stats.pixel_mean, maps.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.pixel_std, maps.std(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(stats.map_mean), maps.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(stats.map_std), maps.std(), rtol=1e-5)
  assert int(stats.hist.sum()) == maps.size
  for q in (0.5, 0.99):  # same bin as the exact quantile: 4e-4 relative
    np.testing.assert_allclose(float(stats.quantile(q)), np.quantile(maps, q, method='inverted_cdf'),
                               rtol=1e-3)


def test_merge_stats_equals_single_stream():
  rng = np.random.default_rng(2)
  batches = _batches(rng, n_batches=4)
  whole = SS.fit_score_stats(gauss_score, batches)
  a = SS.fit_score_stats(gauss_score, batches[:2])
  b = SS.fit_score_stats(gauss_score, batches[2:])
  m = SS.merge_stats(a, b)
  for k in ('count', 'mean', 'm2', 'n_images', 'pixel_mean', 'pixel_m2', 'map_mean', 'map_m2'):
    np.testing.assert_allclose(getattr(m, k), getattr(whole, k), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m.hist, whole.hist)


def test_save_load_roundtrip():
  from sano_jax import rundir  # pylint: disable=g-import-not-at-top
  stats = SS.fit_score_stats(gauss_score, _batches(np.random.default_rng(3)), smoothing_sigma=1.5)
  back = rundir.stats_from_bytes(rundir.stats_bytes(stats), 'the test')
  assert back.image_shape == stats.image_shape and back.smoothing_sigma == 1.5
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='the test is not a readable .npz'):
    rundir.stats_from_bytes(b'PK\x03\x04 truncated', 'the test')


class TinyScore(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Conv(x.shape[-1], (3, 3))(h)


@pytest.fixture(scope='module')
def setup():
  rng = np.random.default_rng(4)
  model = TinyScore()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 10, 3)))
  score_fn = lambda x: model.apply(params, x)
  healthy = [(rng.uniform(size=(4, 12, 10, 3)).astype(np.float32), np.ones(4, bool))
             for _ in range(3)]
  stats = SS.fit_score_stats(score_fn, healthy)
  images = rng.uniform(size=(5, 12, 10, 3)).astype(np.float32)
  return score_fn, stats, images


def test_localize_definition(setup):
  score_fn, stats, images = setup
  z, mask = L.localize(score_fn, images, stats)
  scores = np.asarray(score_fn(2 * jnp.asarray(images) - 1), np.float64)
  ref = np.stack([ndi.gaussian_filter(np.abs(s).mean(-1), 2.0) for s in scores]) / float(stats.std)
  assert z.shape == (5, 12, 10) and z.dtype == jnp.float32 and mask.dtype == jnp.bool_
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, np.asarray(z) > 3.0)
  # uint8 images are scaled by 1/255.
  u8 = (images * 255).round().astype(np.uint8)
  z8, _ = L.localize(score_fn, u8, stats)
  z8_ref, _ = L.localize(score_fn, u8.astype(np.float32) / 255, stats)
  np.testing.assert_allclose(z8, z8_ref, rtol=1e-6)
  assert sano_jax.localize is L.localize


@pytest.mark.parametrize('rule', L.RULES)
def test_localize_jit_vmap_pmap(setup, rule):
  score_fn, stats, images = setup
  if rule in L.DENSITY_RULES:  # the density rules take MultiStats: the same stream, with one t
    step = jax.jit(SS.make_stats_step(score_fn))
    multi = SS.init_multi_stats(stats.image_shape, (0.01,))
    for i in range(0, len(images), 2):
      multi = step(multi, images[i:i + 2], jnp.ones(len(images[i:i + 2]), bool))
    stats = multi
  f = functools.partial(L.localize, score_fn, stats=stats, n_sigma=1.0, rule=rule)
  z, mask = f(images)
  zj, mj = jax.jit(f)(images)
  np.testing.assert_allclose(zj, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mj, mask)
  stacked = np.stack([images, images[::-1]])  # vmap over a leading axis of image batches
  zv, mv = jax.vmap(f)(stacked)
  np.testing.assert_allclose(zv[0], z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(zv[1], z[::-1], rtol=1e-5, atol=1e-5)
  n = jax.local_device_count()
  zp, mp = jax.pmap(f)(np.stack([images] * n))
  np.testing.assert_allclose(zp[0], z, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mp[0], mask)


def test_localize_stats_as_traced_argument(setup):
  score_fn, stats, images = setup
  f = jax.jit(lambda im, st: L.localize(score_fn, im, st, rule='quantile'))
  z, m = f(images, stats)
  z0, m0 = L.localize(score_fn, images, stats, rule='quantile')
  np.testing.assert_allclose(z, z0, rtol=1e-5)
  np.testing.assert_array_equal(m, m0)


def test_rules(setup):
  score_fn, stats, images = setup
  a = np.asarray(L.localize(score_fn, images, stats, n_sigma=0.0)[0]) * float(stats.std)
  z, _ = L.localize(score_fn, images, stats, rule='per_pixel')
  np.testing.assert_allclose(z, (a - stats.pixel_mean) / stats.pixel_std, rtol=1e-4, atol=1e-4)
  z, _ = L.localize(score_fn, images, stats, rule='two_sided')
  np.testing.assert_allclose(z, np.abs(a - stats.map_mean) / stats.map_std, rtol=1e-4, atol=1e-4)
  _, m = L.localize(score_fn, images, stats, rule='quantile', target_fpr=0.05)
  np.testing.assert_array_equal(m, a > float(stats.quantile(0.95)))


def test_localize_bad_inputs(setup):
  score_fn, stats, images = setup
  loc = functools.partial(L.localize, score_fn, stats=stats)
  with pytest.raises(ValueError, match='rank'):
    jax.jit(loc)(images[0])
  with pytest.raises(ValueError, match='channels'):
    loc(images[..., :1])
  with pytest.raises(ValueError, match='size'):
    loc(images[:, :8])
  with pytest.raises(ValueError, match='empty batch'):
    loc(images[:0])
  with pytest.raises(ValueError, match='dtype'):
    loc(images.astype(np.int32))
  with pytest.raises(ValueError, match='rule'):
    loc(images, rule='nope')
  with pytest.raises(ValueError, match='smoothing'):
    loc(images, rule='per_pixel', smoothing_sigma=1.0)
  bad = images.copy()
  bad[0, 3, 3, 0] = np.nan
  with pytest.raises(ValueError, match='non-finite'):
    loc(bad)  # eager: checked on the host
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    loc(images * 2)
  z, m = jax.jit(loc)(bad)  # under jit: documented NaN propagation, mask False there
  assert np.isnan(z[0, 3, 3]) and not m[0, 3, 3] and np.isfinite(z[1:]).all()
  with pytest.raises(ValueError, match='no batches'):
    SS.fit_score_stats(gauss_score, [])


def test_rule_from_config():
  import ml_collections
  lc = ml_collections.ConfigDict(dict(stats='global', two_sided=True))
  assert L.rule_from_config(lc) == 'two_sided'
  lc.stats = 'per_pixel'
  with pytest.raises(ValueError, match="two_sided=True needs localize.stats='global'"):
    L.rule_from_config(lc)
  lc.two_sided = False
  assert L.rule_from_config(lc) == 'per_pixel'
