"""Healthy score statistics (SANO §2.2), fitted by streaming: never all healthy scores in memory.

`ScoreStats` (one t): the moments of the signed healthy scores (the paper's std), of the anomaly
map per pixel position (the per-pixel rule, Genc et al.) and pooled (the two-sided rule), and a
log-spaced histogram of the map (the quantile rule). `MultiStats` (a t-set): one ScoreStats per t
and the Gaussians of the log-maps (`sano_jax.multiscale`). Updates are parallel Welford / Chan et
al. merges, pure and jit/pmap safe; `stats_to_arrays` / `stats_from_arrays` give the arrays an
.npz holds (sano_jax/rundir.py writes them).
"""
from __future__ import annotations

from typing import Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sano_jax import multiscale
from sano_jax.anomaly_maps import anomaly_map, as_fields, channel_feature_maps, gaussian_filter2d
from sano_jax.anomaly_maps import density_feature_maps, raw_map

ScoreFn = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class ScoreStats:
  """Streaming moments of healthy scores (a pytree; static metadata in its aux data).

  count/mean/m2: signed scores pooled over images, pixels and channels (the paper's std, §2.2).
  n_images/pixel_mean/pixel_m2 [H,W]: the anomaly map per pixel position over images (Genc et al.).
  map_count/map_mean/map_m2: the anomaly map pooled over pixels (two-sided rule).
  hist [num_bins] int32: anomaly-map values in log-spaced bins over [hist_lo, hist_hi] (values
  outside go to the end bins), for the quantile (target false-positive rate) rule.
  """
  count: jax.Array
  mean: jax.Array
  m2: jax.Array
  n_images: jax.Array
  pixel_mean: jax.Array
  pixel_m2: jax.Array
  map_count: jax.Array
  map_mean: jax.Array
  map_m2: jax.Array
  hist: jax.Array
  image_shape: tuple = flax.struct.field(pytree_node=False, default=(0, 0, 0))
  smoothing_sigma: float = flax.struct.field(pytree_node=False, default=2.0)
  hist_lo: float = flax.struct.field(pytree_node=False, default=1e-6)
  hist_hi: float = flax.struct.field(pytree_node=False, default=1e6)

  @property
  def std(self) -> jax.Array:
    """Population std of the signed healthy scores, sqrt(M2 / n)."""
    return jnp.sqrt(self.m2 / self.count)

  @property
  def pixel_std(self) -> jax.Array:
    """Per-pixel std over images of the healthy anomaly map [H,W]."""
    return jnp.sqrt(self.pixel_m2 / self.n_images)

  @property
  def map_std(self) -> jax.Array:
    """Std of the healthy anomaly map, all pixels pooled."""
    return jnp.sqrt(self.map_m2 / self.map_count)

  def quantile(self, q) -> jax.Array:
    """q-quantile of the healthy anomaly map from the histogram (log-linear within a bin)."""
    return _hist_quantile(self.hist, q, self.hist_lo, self.hist_hi)


def init_stats(image_shape, num_bins: int = 2**16, *, smoothing_sigma: float = 2.0,
               hist_range: tuple[float, float] = (1e-6, 1e6)) -> ScoreStats:
  """Empty stats for images of shape (H, W, C)."""
  if len(image_shape) != 3:
    raise ValueError(f'image_shape must be (H, W, C), got {image_shape}')
  lo, hi = float(hist_range[0]), float(hist_range[1])
  if not 0 < lo < hi:
    raise ValueError(f'hist_range must satisfy 0 < lo < hi, got {hist_range}')
  h, w, _ = image_shape
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return ScoreStats(count=z(), mean=z(), m2=z(), n_images=z(), pixel_mean=z(h, w),
                    pixel_m2=z(h, w), map_count=z(), map_mean=z(), map_m2=z(),
                    hist=jnp.zeros((num_bins,), jnp.int32),
                    image_shape=tuple(int(s) for s in image_shape),
                    smoothing_sigma=float(smoothing_sigma), hist_lo=lo, hist_hi=hi)


def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
  """Chan et al.: n = na + nb, mean = ma + d nb/n, M2 = M2a + M2b + d^2 na nb / n, d = mb - ma."""
  n = n_a + n_b
  safe_n = jnp.where(n > 0, n, 1.0)
  delta = mean_b - mean_a
  mean = mean_a + delta * (n_b / safe_n)
  m2 = m2_a + m2_b + delta**2 * (n_a * n_b / safe_n)
  return n, mean, m2


def _moments(x, w, axis):
  """Two-pass (n, mean, M2) of x weighted by the 0/1 mask w along `axis`."""
  n = jnp.sum(w, axis=axis)
  xw = jnp.where(w > 0, x, 0.0)
  mean = jnp.sum(xw, axis=axis) / jnp.where(n > 0, n, 1.0)
  d = jnp.where(w > 0, x - jnp.expand_dims(mean, axis), 0.0)
  return n, mean, jnp.sum(d * d, axis=axis)


def _combine_groups(n, mean, m2):
  """Exact pooled moments of k groups (axis 0): M2 = sum M2_i + sum n_i (m_i - m)^2."""
  tot = jnp.sum(n, axis=0)
  m = jnp.sum(n * mean, axis=0) / jnp.where(tot > 0, tot, 1.0)
  return tot, m, jnp.sum(m2, axis=0) + jnp.sum(n * (mean - m)**2, axis=0)


def _hist_index(values, num_bins, lo, hi):
  """Log-spaced bin index of values (clipped to the end bins; 0 and negatives go to bin 0)."""
  llo, lhi = np.log(lo), np.log(hi)
  logv = jnp.log(jnp.maximum(values, lo * 1e-3))
  idx = jnp.floor((logv - llo) * (num_bins / (lhi - llo)))
  return jnp.clip(jnp.nan_to_num(idx, nan=0.0), 0, num_bins - 1).astype(jnp.int32)


def _hist_quantile(hist, q, lo, hi):
  nb = hist.shape[0]
  h = hist.astype(jnp.float32)
  cdf = jnp.cumsum(h)
  target = jnp.asarray(q, jnp.float32) * cdf[-1]
  k = jnp.clip(jnp.searchsorted(cdf, target, side='left'), 0, nb - 1)
  before = jnp.where(k > 0, cdf[jnp.maximum(k - 1, 0)], 0.0)
  frac = jnp.clip((target - before) / jnp.maximum(h[k], 1.0), 0.0, 1.0)
  llo, lhi = np.log(lo), np.log(hi)
  return jnp.exp(llo + (k + frac) * ((lhi - llo) / nb))


def update_stats(stats: ScoreStats, scores: jax.Array, anomaly_maps: jax.Array,
                 valid: jax.Array | None = None) -> ScoreStats:
  """Merges one batch (scores [B,H,W,C], anomaly_maps [B,H,W], valid [B] bool) into `stats`.

  Batch moments are computed per image (two-pass), pooled exactly over the batch, then merged with
  the running moments by Chan et al.'s parallel update; padded examples (valid=False) are ignored.
  Jit-able; associative, so per-device stats can be combined with `merge_stats`.
  """
  b, h, w, c = scores.shape
  if (h, w, c) != tuple(stats.image_shape):
    raise ValueError(f'scores of shape {scores.shape} do not match stats.image_shape '
                     f'{stats.image_shape}')
  if anomaly_maps.shape != (b, h, w):
    raise ValueError(f'anomaly_maps shape {anomaly_maps.shape} != {(b, h, w)}')
  valid = jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)
  vf = valid.astype(jnp.float32)
  s = scores.astype(jnp.float32)
  a = anomaly_maps.astype(jnp.float32)

  # Signed scores, all pixels and channels pooled.
  wi = jnp.broadcast_to(vf[:, None, None, None], s.shape).reshape(b, -1)
  ni, mi, m2i = _moments(s.reshape(b, -1), wi, axis=1)
  count, mean, m2 = _chan_merge(stats.count, stats.mean, stats.m2, *_combine_groups(ni, mi, m2i))

  # Per-pixel anomaly-map moments over images.
  wp = jnp.broadcast_to(vf[:, None, None], a.shape)
  n_img, pmean, pm2 = _chan_merge(stats.n_images, stats.pixel_mean, stats.pixel_m2,
                                  *_moments(a, wp, axis=0))
  n_img = jnp.max(n_img) if n_img.ndim else n_img

  # Pooled anomaly-map moments.
  na, ma, m2a = _moments(a.reshape(b, -1), wp.reshape(b, -1), axis=1)
  map_count, map_mean, map_m2 = _chan_merge(stats.map_count, stats.map_mean, stats.map_m2,
                                            *_combine_groups(na, ma, m2a))

  nb = stats.hist.shape[0]
  idx = _hist_index(a, nb, stats.hist_lo, stats.hist_hi).reshape(-1)
  hist = stats.hist.at[idx].add(wp.reshape(-1).astype(jnp.int32))
  return stats.replace(count=count, mean=mean, m2=m2, n_images=n_img, pixel_mean=pmean,
                       pixel_m2=pm2, map_count=map_count, map_mean=map_mean, map_m2=map_m2,
                       hist=hist)


def merge_stats(a, b):
  """The stats of the union of two streams (e.g. per-device stats after pmap): ScoreStats by
  Chan et al.'s merge of each moment and the sum of the histograms; MultiStats per t and the
  log-map Gaussian (`multiscale.merge_density`)."""
  if isinstance(a, MultiStats) != isinstance(b, MultiStats):
    raise ValueError(f'cannot merge {type(a).__name__} with {type(b).__name__}')
  if isinstance(a, MultiStats):
    if (tuple(a.ts), a.density_scales) != (tuple(b.ts), b.density_scales):
      raise ValueError(f'cannot merge MultiStats of t={a.ts} (density scales {a.density_scales}) '
                       f'with t={b.ts} (density scales {b.density_scales})')
    # Dropping the per-channel density when one side lacks it would silently change the rule.
    if (a.channel_density is None) != (b.channel_density is None):
      raise ValueError('cannot merge MultiStats with per-channel densities with MultiStats '
                       'saved before them (format 3): refit the old statistics')
    colour = None if a.channel_density is None else tuple(
        multiscale.merge_density(x, y) for x, y in zip(a.channel_density, b.channel_density))
    return MultiStats(per_t=tuple(merge_stats(x, y) for x, y in zip(a.per_t, b.per_t)),
                      density=multiscale.merge_density(a.density, b.density),
                      channel_density=colour, ts=a.ts, density_scales=a.density_scales)
  if (a.image_shape, a.hist.shape) != (b.image_shape, b.hist.shape):
    raise ValueError(f'cannot merge ScoreStats of images {a.image_shape} ({a.hist.shape[0]} bins) '
                     f'with {b.image_shape} ({b.hist.shape[0]} bins)')
  count, mean, m2 = _chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2)
  n_img, pmean, pm2 = _chan_merge(a.n_images, a.pixel_mean, a.pixel_m2,
                                  b.n_images, b.pixel_mean, b.pixel_m2)
  mc, mm, mm2 = _chan_merge(a.map_count, a.map_mean, a.map_m2, b.map_count, b.map_mean, b.map_m2)
  return a.replace(count=count, mean=mean, m2=m2, n_images=a.n_images + b.n_images,
                   pixel_mean=pmean, pixel_m2=pm2, map_count=mc, map_mean=mm, map_m2=mm2,
                   hist=a.hist + b.hist)


def finalize(stats):
  """Checks that the stats (ScoreStats or MultiStats) saw data; derived quantities are properties."""
  first = stats.per_t[0] if isinstance(stats, MultiStats) else stats
  if float(first.count) <= 0:
    raise ValueError('ScoreStats saw no valid healthy images; cannot compute the std')
  return stats


@flax.struct.dataclass
class MultiStats:
  """Healthy statistics at several t (`sano_jax.multiscale`): one ScoreStats per t, the per-pixel
  Gaussian of the channel-mean log anomaly maps over all of them (the 'density' rule over a t-set),
  and per t the Gaussian of each colour channel's log maps (the 'density' rule at one t; None in
  statistics saved before it, which then use the t's marginal of `density`)."""
  per_t: tuple
  density: multiscale.DensityStats
  channel_density: tuple | None
  ts: tuple = flax.struct.field(pytree_node=False, default=())
  # The density's smoothing scales (x smoothing_sigma); (1.0,) in statistics saved before them.
  density_scales: tuple = flax.struct.field(pytree_node=False, default=(1.0,))

  @property
  def image_shape(self) -> tuple:
    return self.per_t[0].image_shape

  @property
  def smoothing_sigma(self) -> float:
    return self.per_t[0].smoothing_sigma

  @property
  def std(self) -> jax.Array:
    """The first t's healthy std (for logs; each t keeps its own)."""
    return self.per_t[0].std

  @property
  def n_images(self) -> jax.Array:
    return self.per_t[0].n_images

  @property
  def count(self) -> jax.Array:
    return self.per_t[0].count

  def select(self, index) -> 'MultiStats':
    """The stats of a subset of the t-set (by position)."""
    index = tuple(int(i) for i in index)
    return MultiStats(per_t=tuple(self.per_t[i] for i in index),
                      density=multiscale.sub_density(self.density, index,
                                                     len(self.density_scales)),
                      channel_density=(None if self.channel_density is None else
                                       tuple(self.channel_density[i] for i in index)),
                      ts=tuple(self.ts[i] for i in index), density_scales=self.density_scales)


def init_multi_stats(image_shape, ts, num_bins: int = 2**16, *, smoothing_sigma: float = 2.0,
                     density_scales=multiscale.DENSITY_SCALES,
                     centred_density: bool = False) -> MultiStats:
  """Empty MultiStats for images (H, W, C) and t-set `ts` ((None,): a method without t, one field;
  stored as t = 1.0); centred_density: the densities' log maps centred per image
  (`multiscale.log_features`)."""
  ts = (1.0,) if tuple(ts) == (None,) else multiscale.as_ts(ts)
  scales = tuple(float(f) for f in density_scales)
  one = init_stats(image_shape, num_bins, smoothing_sigma=smoothing_sigma)
  h, w, c = one.image_shape
  return MultiStats(per_t=(one,) * len(ts),
                    density=multiscale.init_density(h, w, len(ts) * len(scales), centred_density),
                    channel_density=(multiscale.init_density(h, w, len(scales) * c,
                                                             centred_density),) * len(ts),
                    ts=ts, density_scales=scales)


def whitened(stats):
  """MultiStats with every density's whitening computed once (`multiscale.with_whitening`), so the
  programs that score with them skip it; ScoreStats as they are."""
  if not isinstance(stats, MultiStats):
    return stats
  colour = stats.channel_density
  return stats.replace(density=multiscale.with_whitening(stats.density),
                       channel_density=(None if colour is None else
                                        tuple(multiscale.with_whitening(d) for d in colour)))


def update_multi_stats(stats: MultiStats, fields, valid=None) -> MultiStats:
  """Merges one batch of K fields [B,H,W,C] (one per t) into `stats`."""
  fields = as_fields(fields)
  if len(fields) != len(stats.ts):
    raise ValueError(f'got {len(fields)} fields for {len(stats.ts)} values of t')
  raw = [raw_map(f) for f in fields]
  maps = [gaussian_filter2d(a, stats.smoothing_sigma) for a in raw]
  per_t = tuple(update_stats(s, f, a, valid) for s, f, a in zip(stats.per_t, fields, maps))
  sigma, scales = stats.smoothing_sigma, stats.density_scales
  features = density_feature_maps(raw, sigma, scales)
  colour = tuple(multiscale.update_density(d, channel_feature_maps(f, sigma, scales), valid)
                 for d, f in zip(stats.channel_density, fields))
  return MultiStats(per_t=per_t, density=multiscale.update_density(stats.density, features, valid),
                    channel_density=colour, ts=stats.ts, density_scales=stats.density_scales)


def to_float_images(images) -> jax.Array:
  """uint8 -> /255; floats -> float32; other integer or bool dtypes are rejected."""
  dtype = jnp.result_type(images)
  if dtype == jnp.uint8:
    return jnp.asarray(images, jnp.float32) / 255.0
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'images must be float in [0, 1] or uint8 in [0, 255], got dtype {dtype}')
  return jnp.asarray(images).astype(jnp.float32)


def make_stats_step(score_fn: ScoreFn, smoothing_sigma: float = 2.0):
  """(stats, images [B,H,W,C] in [0,1], valid [B]) -> stats, with one forward pass of score_fn."""

  def step(stats, images, valid):
    x = 2.0 * to_float_images(images) - 1.0
    scores = score_fn(x)
    if isinstance(stats, MultiStats):
      return update_multi_stats(stats, scores, valid)
    scores = as_fields(scores)[0]
    return update_stats(stats, scores, anomaly_map(scores, smoothing_sigma), valid)

  return step


def fit_score_stats(score_fn: ScoreFn, batches: Iterable, *, smoothing_sigma: float = 2.0,
                    num_bins: int = 2**16,
                    hist_range: tuple[float, float] = (1e-6, 1e6)) -> ScoreStats:
  """Streams healthy batches (images [B,H,W,C] in [0,1] or uint8, valid [B]) through a jitted update.

  Each item of `batches` is `(images, valid)` or just `images` (all valid). Only the moments and
  the histogram are kept, never the scores.
  """
  step = jax.jit(make_stats_step(score_fn, smoothing_sigma))
  stats = None
  for item in batches:
    images, valid = (item if isinstance(item, (tuple, list)) else (item, None))
    images = jnp.asarray(images)
    if images.ndim != 4:
      raise ValueError(f'batches must hold images [B,H,W,C], got shape {images.shape}')
    if valid is None:
      valid = np.ones((images.shape[0],), bool)
    if stats is None:
      stats = init_stats(images.shape[1:], num_bins, smoothing_sigma=smoothing_sigma,
                         hist_range=hist_range)
    stats = step(stats, images, jnp.asarray(valid, bool))
  if stats is None:
    raise ValueError('fit_score_stats got no batches')
  return finalize(stats)


_ARRAY_FIELDS = ('count', 'mean', 'm2', 'n_images', 'pixel_mean', 'pixel_m2', 'map_count',
                 'map_mean', 'map_m2', 'hist')


def stats_to_arrays(stats) -> dict:
  """ScoreStats or MultiStats as {name: numpy array}, the contents of an .npz (`stats_from_arrays`
  reads them back; sano_jax/rundir.py writes them into the run directory)."""
  if isinstance(stats, MultiStats):
    first = stats.per_t[0]
    arrays = {f't{i}.{k}': np.asarray(getattr(st, k))
              for i, st in enumerate(stats.per_t) for k in _ARRAY_FIELDS}
    arrays.update({f'density.{k}': np.asarray(getattr(stats.density, k))
                   for k in ('n', 'mean', 'comoment')})
    arrays.update({f't{i}.channel_density.{k}': np.asarray(getattr(d, k))
                   for i, d in enumerate(stats.channel_density or ())
                   for k in ('n', 'mean', 'comoment')})
    arrays.update(ts=np.asarray(stats.ts, np.float64),
                  density_scales=np.asarray(stats.density_scales, np.float64),
                  density_centred=np.bool_(stats.density.centred),
                  format_version=np.int64(4 if stats.channel_density is not None else 3))
  else:
    first = stats
    arrays = {k: np.asarray(getattr(stats, k)) for k in _ARRAY_FIELDS}
    arrays.update(format_version=np.int64(1))
  arrays.update(image_shape=np.asarray(first.image_shape, np.int64),
                smoothing_sigma=np.float64(first.smoothing_sigma),
                hist_lo=np.float64(first.hist_lo), hist_hi=np.float64(first.hist_hi))
  return arrays


def stats_from_arrays(f: dict, where: str = 'the statistics'):
  """The ScoreStats or MultiStats of `stats_to_arrays`'s arrays; a ValueError naming `where` when
  they are incomplete or inconsistent."""
  try:
    ts = tuple(float(v) for v in f['ts']) if 'ts' in f else None
    arrays = ([f't{i}.{k}' for i in range(len(ts)) for k in _ARRAY_FIELDS]
              + [f'density.{k}' for k in ('n', 'mean', 'comoment')]) if ts else list(_ARRAY_FIELDS)
    missing = [k for k in arrays + ['image_shape', 'smoothing_sigma', 'hist_lo', 'hist_hi']
               if k not in f]
    if missing:
      raise ValueError(f'missing {missing}')
    meta = dict(image_shape=tuple(int(s) for s in f['image_shape']),
                smoothing_sigma=float(f['smoothing_sigma']), hist_lo=float(f['hist_lo']),
                hist_hi=float(f['hist_hi']))
    if ts:
      per_t = tuple(ScoreStats(**{k: jnp.asarray(f[f't{i}.{k}']) for k in _ARRAY_FIELDS}, **meta)
                    for i in range(len(ts)))
      centred = np.asarray(f.get('density_centred', False))  # older files: not centred
      if centred.shape or centred.dtype != np.bool_:
        raise ValueError(f'density_centred must be one bool, got {centred.dtype} of shape '
                         f'{centred.shape}')
      centred = bool(centred)
      density = multiscale.DensityStats(
          **{k: jnp.asarray(f[f'density.{k}']) for k in ('n', 'mean', 'comoment')}, centred=centred)
      scales = tuple(float(v) for v in f['density_scales']) if 'density_scales' in f else (1.0,)
      if density.mean.shape[-1] != len(ts) * len(scales):
        raise ValueError(f'the density has {density.mean.shape[-1]} features for {len(ts)} t x '
                         f'{len(scales)} scales')
      colour = None  # format 3 (before the per-channel density): the t's marginal of `density`
      if int(f.get('format_version', 3)) >= 4:
        colour = tuple(multiscale.DensityStats(
            **{k: jnp.asarray(f[f't{i}.channel_density.{k}']) for k in ('n', 'mean', 'comoment')},
            centred=centred)
                       for i in range(len(ts)))
        want = len(scales) * meta['image_shape'][-1]
        if any(d.mean.shape[-1] != want for d in colour):
          raise ValueError(f'a per-channel density does not have {want} features '
                           f'({len(scales)} scales x {meta["image_shape"][-1]} channels)')
      return MultiStats(per_t=per_t, density=density, channel_density=colour, ts=ts,
                        density_scales=scales)
    return ScoreStats(**{k: jnp.asarray(f[k]) for k in _ARRAY_FIELDS}, **meta)
  except (ValueError, KeyError) as e:
    raise ValueError(f'{where} is not a readable ScoreStats file ({e}); rerun run_eval.py to fit '
                     'the healthy statistics again') from e
