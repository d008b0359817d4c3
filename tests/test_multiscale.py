"""Multi-t maps and the multiscale density rule against independent oracles (numpy, scipy.stats)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from sano_jax import localization as L, anomaly_maps as AM, score_stats as SS, methods, multiscale as M, score

import helpers


def _log(a, centred):
  """The density's features in numpy: log a; centred: minus each image's median over its pixels
  (per k)."""
  u = np.log(np.asarray(a, np.float64))
  return u - np.median(u, axis=(1, 2), keepdims=True) if centred else u


@pytest.mark.parametrize('centred', [False, True])
def test_density_stats_stream_like_the_batch_oracle_in_bounded_memory(centred):
  rng = np.random.default_rng(0)
  k, n = 3, 23
  maps = [rng.uniform(0.05, 2.0, (n, 6, 5)).astype(np.float32) for _ in range(k)]
  d = M.init_density(6, 5, k, centred)
  size = sum(x.size for x in jax.tree.leaves(d))
  step = jax.jit(M.update_density)
  for i in range(0, n, 4):  # uneven batches, the last one padded
    chunk = [m[i:i + 4] for m in maps]
    valid = np.ones(4, bool)
    if len(chunk[0]) < 4:
      valid[len(chunk[0]):] = False
      chunk = [np.concatenate([c, np.ones((4 - len(c), 6, 5), np.float32)]) for c in chunk]
    d = step(d, chunk, valid)
    assert sum(x.size for x in jax.tree.leaves(d)) == size  # state does not grow with images
  u = _log(np.stack(maps, -1), centred)
  mu = u.mean(0)
  cov = np.einsum('nhwk,nhwl->hwkl', u - mu, u - mu) / n
  assert float(d.n) == n
  np.testing.assert_allclose(d.mean, mu, atol=1e-5)
  np.testing.assert_allclose(np.asarray(d.comoment) / n, cov, atol=1e-5)
  # Merging two halves equals streaming all (associative: per-device stats can be combined).
  a = M.update_density(M.init_density(6, 5, k, centred), [m[:10] for m in maps])
  b = M.update_density(M.init_density(6, 5, k, centred), [m[10:] for m in maps])
  ab = M.merge_density(a, b)
  np.testing.assert_allclose(ab.mean, mu, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ab.comoment) / n, cov, atol=1e-5)
  sub = M.sub_density(ab, (0, 2))
  np.testing.assert_allclose(np.asarray(sub.comoment) / n, cov[..., [0, 2]][..., [0, 2], :],
                             atol=1e-5)


@pytest.mark.parametrize('k, centred', [(1, False), (2, True), (5, False), (5, True)])
def test_density_z_is_the_normal_deviate_of_the_chi2_mahalanobis(k, centred):
  rng = np.random.default_rng(k)
  n = 50
  maps = [rng.uniform(0.1, 3.0, (n, 4, 4)).astype(np.float32) for _ in range(k)]
  d = M.update_density(M.init_density(4, 4, k, centred), maps)
  new = [rng.uniform(0.05, 6.0, (3, 4, 4)).astype(np.float32) for _ in range(k)]
  z = np.asarray(jax.jit(M.density_z)(d, new))
  # Oracle: numpy covariance (+ the same ridge), Mahalanobis, scipy's chi2 and normal.
  u = _log(np.stack(maps, -1), centred)
  v = _log(np.stack(new, -1), centred) - u.mean(0)
  cov = np.einsum('nhwk,nhwl->hwkl', u - u.mean(0), u - u.mean(0)) / n
  tr = np.trace(cov, axis1=-2, axis2=-1)[..., None, None]
  cov = cov + (1e-3 * tr / k + 1e-12) * np.eye(k)
  d2 = np.einsum('bhwk,hwkl,bhwl->bhw', v, np.linalg.inv(cov), v)
  ref = sps.norm.isf(sps.chi2.sf(d2, k))
  ok = np.isfinite(ref) & (ref > -4)  # the lower tail (p -> 1) is clipped, and irrelevant
  np.testing.assert_allclose(z[ok], ref[ok], rtol=2e-3, atol=2e-3)
  # The whitening computed once beforehand gives the same z; an update drops it (stale otherwise).
  w = M.with_whitening(d)
  np.testing.assert_allclose(jax.jit(M.density_z)(w, new), z, rtol=1e-5, atol=1e-5)
  assert d.whiten is None and M.update_density(w, new).whiten is None
  assert M.sub_density(w, tuple(range(k))).whiten is w.whiten  # all of it: kept


def test_density_z_ignores_a_gain_of_the_whole_map_but_not_of_a_region():
  """Centring per image: a photo whose |score| is c times larger everywhere (contrast, focus) gets
  the same z-map; the same gain on a region only is an anomaly there."""
  rng = np.random.default_rng(3)
  k = 3
  maps = [rng.uniform(0.5, 2.0, (40, 8, 8)).astype(np.float32) for _ in range(k)]
  d = M.update_density(M.init_density(8, 8, k, centred=True), maps)
  new = [rng.uniform(0.5, 2.0, (2, 8, 8)).astype(np.float32) for _ in range(k)]
  z = jax.jit(M.density_z)
  np.testing.assert_allclose(z(d, [3.0 * m for m in new]), z(d, new), rtol=1e-4, atol=1e-4)
  plain = M.update_density(M.init_density(8, 8, k), maps)  # not centred: the gain IS an anomaly
  assert float(np.mean(z(plain, [3.0 * m for m in new]) - z(plain, new))) > 1.0
  with pytest.raises(ValueError, match='centred=True with one fitted with centred=False'):
    M.merge_density(d, plain)
  region = [m.copy() for m in new]
  for m in region:
    m[:, :3, :3] *= 6.0
  inside = np.asarray(z(d, region))[:, :3, :3] - np.asarray(z(d, new))[:, :3, :3]
  assert inside.mean() > 1.0


@pytest.mark.parametrize('k', [1, 2, 3, 4, 9, 12, 15, 21])
def test_log_chi2_sf_is_scipys_and_the_far_tail_stays_finite(k):
  x = np.concatenate([[0.0, 1e-6], np.logspace(-3, 5, 81)]).astype(np.float32)
  log_sf = np.asarray(M._log_chi2_sf(jnp.asarray(x), k))  # pylint: disable=protected-access
  ref = sps.chi2.logsf(x.astype(np.float64), k)  # -inf where float64 underflows (x > ~1500)
  seen = np.isfinite(ref)
  np.testing.assert_allclose(log_sf[seen], ref[seen], rtol=1e-5, atol=1e-6)
  z = -M._ndtri_from_log(jnp.asarray(log_sf))  # pylint: disable=protected-access
  step = np.diff(np.asarray(z))  # z flat only where P rounds to 1 (the clip), rising in the tail
  assert np.all(np.isfinite(z)) and np.all(step >= 0) and np.all(step[x[1:] > k] > 0)
  seen &= ref < np.log1p(-1e-4)  # nearer 1, float32 cannot resolve 1 - P (z -> its clip)
  np.testing.assert_allclose(z[seen], sps.norm.isf(np.exp(ref[seen])), rtol=1e-3, atol=1e-3)


def test_t_set_parsing():
  assert M.as_ts(0.02) == (0.02,)
  assert M.as_ts([0.02, 0.1]) == (0.02, 0.1)
  for bad in ([], [0.0], [0.1, 0.1], [1.5]):
    with pytest.raises(ValueError, match='localize.t'):
      M.as_ts(bad)


@pytest.fixture(scope='module')
def sano_multi():
  config = helpers.tiny_config()
  config.localize.t = (0.01, 0.1, 0.4)
  method = methods.create(config)
  params = method.init(jax.random.PRNGKey(0))
  # Perturb the zero-initialised output layer so the score is not identically zero.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  return config, method, params


def test_sano_field_at_a_t_set_equals_one_call_per_t(sano_multi):
  _, method, params = sano_multi
  x = jax.random.uniform(jax.random.PRNGKey(2), (3,) + method.image_shape) * 2 - 1
  fields = jax.jit(method.field)(params, x)
  assert len(fields) == 3
  for t, f in zip(method.ts, fields):
    ref = score.make_score_fn(method.model, params, method.sde, t)(x)
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def _density_oracle(fn, healthy, images, sigma, per_channel=False, centred=False):
  """The density z-map in numpy/scipy: features log G_{f sigma} * mean_c |s_k| (f = 1/2, 1, 2) per
  image (per_channel: log G_{f sigma} * |s_kc| for every channel c instead of the mean; centred:
  minus each image's median), a Gaussian per pixel over the healthy images (population
  covariance + the module's ridge), z = Phi^-1(1 - chi2_D.sf(d^2)), then G_sigma * z."""
  from scipy import ndimage, stats as st  # pylint: disable=g-import-not-at-top
  def features(x):
    fields = [np.abs(np.asarray(f, np.float64)) for f in AM.as_fields(fn(2 * jnp.asarray(x) - 1))]  # pylint: disable=protected-access
    raw = ([f[..., c] for f in fields for c in range(f.shape[-1])] if per_channel
           else [f.mean(-1) for f in fields])
    return _log(np.stack([ndimage.gaussian_filter(a, (0, f * sigma, f * sigma))
                          for a in raw for f in (0.5, 1.0, 2.0)], -1), centred)
  u, v = features(healthy), features(images)
  d = u.shape[-1]
  mu = u.mean(0)
  cov = np.einsum('nhwk,nhwl->hwkl', u - mu, u - mu) / len(u)
  cov += (1e-3 * np.trace(cov, axis1=-2, axis2=-1)[..., None, None] / d + 1e-12) * np.eye(d)
  r = v - mu
  d2 = np.einsum('bhwk,bhwk->bhw', r, np.linalg.solve(cov[None], r[..., None])[..., 0])
  z = st.norm.isf(st.chi2.sf(d2, d))
  return ndimage.gaussian_filter(z, (0, sigma, sigma))


def test_localize_with_a_t_set_jits_and_matches_the_per_t_oracle(sano_multi, tmp_path):
  _, method, params = sano_multi
  fn = method.field_fn(params)
  healthy = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (12,) + method.image_shape))
  stats = SS.init_multi_stats(method.image_shape, method.ts)
  step = jax.jit(SS.make_stats_step(fn))
  for i in range(0, 12, 4):
    stats = step(stats, healthy[i:i + 4], jnp.ones(4, bool))
  loaded = SS.stats_from_arrays(SS.stats_to_arrays(stats))
  assert isinstance(loaded, SS.MultiStats) and loaded.ts == method.ts
  jax.tree.map(np.testing.assert_array_equal, loaded, stats)

  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (2,) + method.image_shape))
  fields = fn(2 * jnp.asarray(images) - 1)
  maps = [AM.anomaly_map(f) for f in fields]
  for rule in ('global', 'per_pixel', 'two_sided', 'density'):
    z, mask = jax.jit(lambda im, st, rule=rule: L.localize(fn, im, st, rule=rule))(images, stats)
    if rule == 'density':
      ref = _density_oracle(fn, healthy, images, sigma=2.0)
    else:  # each t against its own single-t stats, averaged
      ref = np.mean([L._zmap(a, st, rule) for a, st in zip(maps, stats.per_t)], axis=0)  # pylint: disable=protected-access
    tol = 1e-4 if rule == 'density' else 1e-5  # float32 inverses of 9x9 covariances vs float64
    np.testing.assert_allclose(z, ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(mask, np.asarray(z) > 3.0)
  # Centred densities: the flag is fitted into the stats, saved with them, and scoring follows it.
  centred = SS.init_multi_stats(method.image_shape, method.ts, centred_density=True)
  for i in range(0, 12, 4):
    centred = step(centred, healthy[i:i + 4], jnp.ones(4, bool))
  centred = SS.stats_from_arrays(SS.stats_to_arrays(centred))
  assert centred.density.centred and all(d.centred for d in centred.channel_density)
  z, _ = jax.jit(lambda im, st: L.localize(fn, im, st, rule='density'))(images, centred)
  np.testing.assert_allclose(z, _density_oracle(fn, healthy, images, sigma=2.0, centred=True),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='quantile'):
    L.localize(fn, images, stats, rule='quantile')
  with pytest.raises(ValueError, match='field'):  # one field against stats of three t
    L.localize(lambda x: fields[0], images, stats)
  single = SS.init_stats(method.image_shape)
  with pytest.raises(ValueError, match='density'):
    L.localize(lambda x: fields[0], images, single, rule='density')


@pytest.mark.parametrize('channels', [3, 1])
def test_density_at_one_t_models_each_colour_channel(channels, tmp_path):
  """At ONE t the density's features are each channel's log maps (3 scales x C), not their mean:
  the jitted z equals the per-channel numpy oracle (on grayscale, the channel-mean one), the stats
  of one t selected from a t-set equal those fitted at that t alone, 'density_mean' over the t-set
  is the mean of the two t's oracles, and statistics saved before
  the per-channel density (format 3) fall back to the channel-mean marginal."""
  shape = (12, 12, channels)
  # Two smooth nonlinear "score fields" (one per t) whose channels differ; the density logic does
  # not need a trained model.
  fn = lambda x: (jnp.sin(4.0 * x) + 0.1 * x, x**2 * jnp.cos(3.0 * x) + 0.05)
  one_t = lambda x: fn(x)[1]  # the second t alone
  healthy = np.asarray(jax.random.uniform(jax.random.PRNGKey(5), (48,) + shape))
  stats = jax.jit(SS.make_stats_step(fn))(SS.init_multi_stats(shape, (0.01, 0.1)),
                                          healthy, jnp.ones(48, bool))
  alone = jax.jit(SS.make_stats_step(one_t))(SS.init_multi_stats(shape, (0.1,)),
                                             healthy, jnp.ones(48, bool))
  selected = stats.select((1,))
  assert selected.channel_density[0].mean.shape[-1] == 3 * channels
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               selected.channel_density, alone.channel_density)
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (2,) + shape))
  z, _ = jax.jit(lambda im, st: L.localize(one_t, im, st, rule='density'))(images, alone)
  ref = _density_oracle(one_t, healthy, images, sigma=2.0, per_channel=True)
  np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)
  # 'density_mean' over the t-set: the mean of each t's own per-channel density z.
  z_mean, mask = jax.jit(lambda im, st: L.localize(fn, im, st, rule='density_mean'))(images, stats)
  ref_mean = np.mean([_density_oracle(lambda x, k=k: fn(x)[k], healthy, images, sigma=2.0,
                                      per_channel=True) for k in (0, 1)], axis=0)
  np.testing.assert_allclose(z_mean, ref_mean, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(mask, np.asarray(z_mean) > 3.0)
  with pytest.raises(ValueError, match='density_mean.*MultiStats'):
    L.localize(one_t, images, SS.init_stats(shape), rule='density_mean')
  mean_ref = _density_oracle(one_t, healthy, images, sigma=2.0)
  if channels > 1:  # the channels carry information their mean drops
    assert np.abs(ref - mean_ref).max() > 0.1
  else:
    np.testing.assert_allclose(ref, mean_ref)

  jax.tree.map(np.testing.assert_array_equal, SS.stats_from_arrays(SS.stats_to_arrays(alone)), alone)
  arrays = {k: v for k, v in SS.stats_to_arrays(alone).items() if 'channel_density' not in k}
  arrays['format_version'] = np.int64(3)
  old = SS.stats_from_arrays(arrays)
  assert old.channel_density is None
  np.testing.assert_allclose(L.localize(one_t, images, old, rule='density')[0], mean_ref,
                             rtol=1e-4, atol=1e-4)


def test_cholesky_and_lower_inverse_match_numpy_under_jit():
  """The density's LAPACK-free Cholesky factor and triangular inverse (jitted) against numpy's, on
  random SPD matrices (one near-singular), and the whitened distances of a [64,32,32,15] batch
  (the size at which a lax.fori_loop version returned wrong values on XLA:CPU)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 7, 12))
  a = np.einsum('...kn,...ln->...kl', x, x) / 12 + 1e-2 * np.eye(7)
  a[0, 0] = np.outer(x[0, 0, :, 0], x[0, 0, :, 0]) + 1e-4 * np.eye(7)  # rank 1 + a small ridge
  l = np.asarray(jax.jit(M.cholesky)(a.astype(np.float32)))
  ref = np.linalg.cholesky(a)
  np.testing.assert_allclose(l, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
  assert np.all(np.triu(l, 1) == 0)
  w = np.asarray(jax.jit(M.lower_inverse)(jnp.asarray(ref, jnp.float32)))
  np.testing.assert_allclose(w, np.linalg.inv(ref), rtol=1e-3, atol=1e-3 * np.abs(w).max())

  k = 15
  x = rng.standard_normal((32, 32, k, 40))
  cov = np.einsum('...kn,...ln->...kl', x, x) / 40
  u = rng.standard_normal((64, 32, 32, k))
  whiten = jax.jit(lambda c: M.lower_inverse(M.cholesky(c)))(jnp.asarray(cov, jnp.float32))
  d2 = np.asarray(jnp.sum(jnp.einsum('hwkl,bhwl->bhwk', whiten, jnp.asarray(u, jnp.float32))**2, -1))
  ref = np.einsum('bhwk,bhwk->bhw', u, np.linalg.solve(cov[None], u[..., None])[..., 0])
  np.testing.assert_allclose(d2, ref, rtol=1e-3)


def test_density_scales_round_trip_and_a_mismatch_is_a_clear_error(tmp_path):
  """The saved statistics keep the density's scales; a file whose feature count does not match
  t x scales, and one saved before the scales (read as (1.0,)), are handled explicitly."""
  stats = SS.init_multi_stats((6, 5, 1), (0.1, 0.2), smoothing_sigma=1.5)
  assert stats.density_scales == M.DENSITY_SCALES and stats.density.mean.shape[-1] == 6
  arrays = SS.stats_to_arrays(stats)
  assert SS.stats_from_arrays(arrays).density_scales == M.DENSITY_SCALES
  arrays['density_scales'] = np.asarray([1.0, 2.0])  # 2 t x 2 scales != 6 features
  with pytest.raises(ValueError, match=r'not a readable ScoreStats file.*6 features for 2 t x 2'):
    SS.stats_from_arrays(arrays)
  rgb = SS.init_multi_stats((6, 5, 3), (0.1, 0.2), smoothing_sigma=1.5)
  arrays = SS.stats_to_arrays(rgb)
  arrays['t1.channel_density.mean'] = np.zeros((6, 5, 4), np.float32)  # 3 scales x 3 channels = 9
  with pytest.raises(ValueError, match=r'not a readable ScoreStats.*does not have 9 features'):
    SS.stats_from_arrays(arrays)
  old = SS.init_multi_stats((6, 5, 1), (0.1, 0.2), density_scales=(1.0,))
  arrays = {k: v for k, v in SS.stats_to_arrays(old).items() if k != 'density_scales'}
  assert SS.stats_from_arrays(arrays).density_scales == (1.0,)
  # The centring flag: one bool, absent (older files) = not centred, anything else is refused.
  arrays = SS.stats_to_arrays(SS.init_multi_stats((6, 5, 1), (0.1, 0.2), centred_density=True))
  assert SS.stats_from_arrays(arrays).density.centred
  assert not SS.stats_from_arrays({k: v for k, v in arrays.items()
                                   if k != 'density_centred'}).density.centred
  for bad in (np.asarray([True, False]), np.float64(1.0)):
    arrays['density_centred'] = bad
    with pytest.raises(ValueError, match='density_centred must be one bool'):
      SS.stats_from_arrays(arrays)
