"""Anomaly localization with scores (SANO §2.2).

One forward pass of the score model at a small t gives s(x) ~ grad_x log p(x). The anomaly map is

    A(x) = G_sigma * mean_c |s(x)_c|                        (mean over colour channels, gaussian filter)

and the paper's rule flags pixels whose map exceeds N standard deviations of the healthy score
distribution (signed scores, all pixels and channels pooled):

    z(x) = A(x) / std_healthy(s),     mask = z > N.

Options (``rule=``): ``'per_pixel'`` (Genc et al.: z = (A - mean_ij) / std_ij over healthy images),
``'two_sided'`` (z = |A - mean(A_healthy)| / std(A_healthy)) and ``'quantile'`` (mask = A > the
(1 - target_fpr) quantile of the healthy A; z stays A / std).

Everything here is pure JAX with static shapes: ``localize`` and ``update_stats`` are jit/vmap/pmap
safe (no host callbacks). ``ScoreStats`` is fitted by streaming (parallel Welford / Chan et al.
merges), never holding all healthy scores in memory.

NaN / inf handling: inside jit a non-finite input pixel makes the z-map NaN in its gaussian
neighbourhood (and the mask False there, since NaN > N is False). Called eagerly (concrete arrays),
``localize`` runs ``check_images`` first and raises ValueError on non-finite or out-of-range input.
"""
from __future__ import annotations

from typing import Callable, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sano_jax import multiscale
from sano_jax.image_checks import check_images  # pylint: disable=unused-import  (public here too)

ScoreFn = Callable[[jax.Array], jax.Array]

RULES = ('global', 'per_pixel', 'two_sided', 'quantile', 'density', 'density_mean')
DENSITY_RULES = ('density', 'density_mean')  # need MultiStats
TARGET_FPR = 1e-3  # the 'quantile' rule's healthy false-positive rate unless configured
_STD_FLOOR = 1e-12

# --------------------------------------------------------------------------------------------
# Gaussian filter (scipy.ndimage.gaussian_filter semantics, mode='reflect', truncate=4.0).
# --------------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """w_k = exp(-k^2 / (2 sigma^2)) / sum, k = -r..r, r = int(truncate * sigma + 0.5) (as scipy)."""
  radius = int(truncate * float(sigma) + 0.5)
  k = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 / float(sigma)**2 * k**2)
  return w / w.sum()


def _reflect_indices(n: int, radius: int) -> np.ndarray:
  """Indices of scipy's 'reflect' (half-sample symmetric, d c b a | a b c d | d c b a) padding.

  The extension is periodic with period 2n, so images smaller than the radius reflect repeatedly.
  """
  i = np.arange(-radius, n + radius)
  m = np.mod(i, 2 * n)
  return np.where(m >= n, 2 * n - 1 - m, m)


def gaussian_filter1d(x: jax.Array, sigma: float, axis: int, truncate: float = 4.0) -> jax.Array:
  """1-D gaussian correlation along `axis` with reflect boundaries; sigma static, 0 = identity."""
  if sigma < 0:
    raise ValueError(f'smoothing sigma must be >= 0, got {sigma}')
  if sigma == 0:
    return x
  w = gaussian_kernel1d(sigma, truncate)
  radius = (len(w) - 1) // 2
  axis = axis % x.ndim
  n = x.shape[axis]
  xp = jnp.take(x, jnp.asarray(_reflect_indices(n, radius)), axis=axis)
  # Static loop over the 2r+1 taps (not over pixels): elementwise, fused by XLA, exact float32.
  out = None
  for k, wk in enumerate(w):
    term = jax.lax.slice_in_dim(xp, k, k + n, axis=axis) * jnp.asarray(wk, x.dtype)
    out = term if out is None else out + term
  return out


def gaussian_filter2d(x: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
  """Separable gaussian filter over the last two axes of x [..., H, W] (scipy order: H then W)."""
  x = gaussian_filter1d(x, sigma, axis=-2, truncate=truncate)
  return gaussian_filter1d(x, sigma, axis=-1, truncate=truncate)


def raw_map(scores: jax.Array) -> jax.Array:
  """a = mean_c |s_c|, the anomaly map before smoothing: scores [B,H,W,C] -> [B,H,W] float32."""
  return jnp.mean(jnp.abs(scores.astype(jnp.float32)), axis=-1)


def anomaly_map(scores: jax.Array, smoothing_sigma: float = 2.0) -> jax.Array:
  """A = G_sigma * mean_c |s_c|   (SANO §2.2): scores [B,H,W,C] -> [B,H,W] float32."""
  return gaussian_filter2d(raw_map(scores), smoothing_sigma)


def density_feature_maps(raw_maps, smoothing_sigma: float,
                         scales=multiscale.DENSITY_SCALES) -> list[jax.Array]:
  """The density rule's K * S maps [B,H,W] from K raw maps a_k: G_{f sigma} * a_k for each t
  (outer) and scale factor f in `scales` (inner), the order of `multiscale.feature_index`."""
  return [gaussian_filter2d(a, float(f) * float(smoothing_sigma)) for a in raw_maps for f in scales]


def channel_feature_maps(field: jax.Array, smoothing_sigma: float,
                         scales=multiscale.DENSITY_SCALES) -> list[jax.Array]:
  """The one-t density's C * S maps [B,H,W] from one field [B,H,W,C]: `density_feature_maps` of
  each colour channel's |s_c| in place of the channel mean (C = 1: the same maps)."""
  a = jnp.abs(field.astype(jnp.float32))
  return density_feature_maps([a[..., c] for c in range(a.shape[-1])], smoothing_sigma, scales)


# --------------------------------------------------------------------------------------------
# Healthy score statistics, fitted by streaming.
# --------------------------------------------------------------------------------------------


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
  def score_mean(self) -> jax.Array:
    return self.mean

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
                     density_scales=multiscale.DENSITY_SCALES) -> MultiStats:
  """Empty MultiStats for images (H, W, C) and t-set `ts` ((None,): a method without t, one field;
  stored as t = 1.0)."""
  ts = (1.0,) if tuple(ts) == (None,) else multiscale.as_ts(ts)
  scales = tuple(float(f) for f in density_scales)
  one = init_stats(image_shape, num_bins, smoothing_sigma=smoothing_sigma)
  h, w, c = one.image_shape
  return MultiStats(per_t=(one,) * len(ts),
                    density=multiscale.init_density(h, w, len(ts) * len(scales)),
                    channel_density=(multiscale.init_density(h, w, len(scales) * c),) * len(ts),
                    ts=ts, density_scales=scales)


def update_multi_stats(stats: MultiStats, fields, valid=None) -> MultiStats:
  """Merges one batch of K fields [B,H,W,C] (one per t) into `stats`."""
  fields = _as_fields(fields)
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


def _as_fields(fields) -> list:
  return list(fields) if isinstance(fields, (list, tuple)) else [fields]


def _to_float_images(images) -> jax.Array:
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
    x = 2.0 * _to_float_images(images) - 1.0
    scores = score_fn(x)
    if isinstance(stats, MultiStats):
      return update_multi_stats(stats, scores, valid)
    scores = _as_fields(scores)[0]
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
      density = multiscale.DensityStats(
          **{k: jnp.asarray(f[f'density.{k}']) for k in ('n', 'mean', 'comoment')})
      scales = tuple(float(v) for v in f['density_scales']) if 'density_scales' in f else (1.0,)
      if density.mean.shape[-1] != len(ts) * len(scales):
        raise ValueError(f'the density has {density.mean.shape[-1]} features for {len(ts)} t x '
                         f'{len(scales)} scales')
      colour = None  # format 3 (before the per-channel density): the t's marginal of `density`
      if int(f.get('format_version', 3)) >= 4:
        colour = tuple(multiscale.DensityStats(
            **{k: jnp.asarray(f[f't{i}.channel_density.{k}']) for k in ('n', 'mean', 'comoment')})
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


# --------------------------------------------------------------------------------------------
# Localization.
# --------------------------------------------------------------------------------------------


def _check_shapes(images, stats: ScoreStats):
  if images.ndim != 4:
    raise ValueError(f'images must be [B,H,W,C] (rank 4), got rank {images.ndim} '
                     f'(shape {images.shape})')
  b, h, w, c = images.shape
  if b == 0:
    raise ValueError('empty batch: images has batch size 0')
  sh, sw, sc = stats.image_shape
  if c != sc:
    raise ValueError(f'images have {c} channels, the stats were fitted on {sc}')
  if (h, w) != (sh, sw):
    raise ValueError(f'image size {h}x{w} differs from the stats image size {sh}x{sw}')


def localize(score_fn: ScoreFn, images: jax.Array, stats, *, n_sigma: float = 3.0,
             smoothing_sigma: float = 2.0, rule: str = 'global',
             target_fpr: float = TARGET_FPR) -> tuple[jax.Array, jax.Array]:
  """images [B,H,W,C] in [0,1] (float, or uint8 scaled by 1/255) -> (z_map [B,H,W] f32, mask bool).

  z = G_sigma * mean_c |s(2 images - 1)| / std_healthy; mask = z > n_sigma (SANO §2.2).
  rule: 'global' (the paper), 'per_pixel' (z = (A - mean_ij)/std_ij), 'two_sided'
  (z = |A - mean A_healthy| / std A_healthy), 'quantile' (mask = A > quantile_{1-target_fpr}(A_healthy),
  z = A / std), 'density' and 'density_mean' (`sano_jax.multiscale`). With MultiStats (a t-set), score_fn
  returns one field per t and every rule but 'quantile' applies (module docstring of multiscale).
  Pure; jit/vmap/pmap safe with score_fn closed over. Shape errors raise ValueError at
  trace time; eagerly (concrete input) `check_images` also rejects NaN/inf and out-of-range values.
  """
  if rule not in RULES:
    raise ValueError(f'unknown rule {rule!r}; expected one of {RULES}')
  if not isinstance(images, jax.core.Tracer):
    check_images(images)
  images = _to_float_images(images)
  _check_shapes(images, stats)
  if ((rule != 'global' or isinstance(stats, MultiStats))
      and float(smoothing_sigma) != float(stats.smoothing_sigma)):
    raise ValueError(f'rule {rule!r} compares with healthy anomaly maps smoothed with sigma='
                     f'{stats.smoothing_sigma}, but smoothing_sigma={smoothing_sigma}')
  fields = _as_fields(score_fn(2.0 * images - 1.0))
  multi = isinstance(stats, MultiStats)
  if len(fields) != (len(stats.ts) if multi else 1):
    raise ValueError(f'score_fn returned {len(fields)} field(s) but the stats hold '
                     f'{len(stats.ts) if multi else 1} value(s) of t: fit the stats with the same '
                     't-set as the localizer')
  for f in fields:
    if f.shape != images.shape:
      raise ValueError(f'score_fn returned shape {f.shape}, expected {images.shape}')
  if multi:
    if rule == 'quantile':
      raise ValueError("rule 'quantile' takes one t; with a t-set use 'density' or a z rule")
    z = combine(stats, fields, rule)
    return z, z > n_sigma
  if rule in DENSITY_RULES:
    raise ValueError(f"rule {rule!r} needs MultiStats (init_multi_stats / a t-set)")
  a = anomaly_map(fields[0], smoothing_sigma)
  z = _zmap(a, stats, rule)
  if rule == 'quantile':
    mask = a > stats.quantile(1.0 - target_fpr)
  else:
    mask = z > n_sigma
  return z.astype(jnp.float32), mask


def combine(stats: MultiStats, fields, rule: str) -> jax.Array:
  """One z-map [B,H,W] from the K fields [B,H,W,C] of a t-set: the density z (`sano_jax.multiscale`;
  over several t of the channel-mean raw maps a_k = mean_c |s_k|, at one t of each channel's
  |s_c|), the mean over t of each t's own one-t density z ('density_mean'), or the mean over t of
  each t's z against its own healthy stats, each on its smoothed map A_k = G_sigma * a_k."""
  sigma, scales = stats.smoothing_sigma, stats.density_scales
  fields = _as_fields(fields)
  if rule == 'density_mean':
    return jnp.mean(jnp.stack([combine(stats.select((k,)), [f], 'density')
                               for k, f in enumerate(fields)]), axis=0)
  if rule == 'density' and len(fields) == 1 and stats.channel_density is not None:
    features = channel_feature_maps(fields[0], sigma, scales)
    z = gaussian_filter2d(multiscale.density_z(stats.channel_density[0], features), sigma)
  elif rule == 'density':
    features = density_feature_maps([raw_map(f) for f in fields], sigma, scales)
    z = gaussian_filter2d(multiscale.density_z(stats.density, features), sigma)
  else:
    z = jnp.mean(jnp.stack([_zmap(gaussian_filter2d(raw_map(f), sigma), st, rule)
                            for f, st in zip(fields, stats.per_t)]), axis=0)
  return z.astype(jnp.float32)


def _zmap(a, stats: ScoreStats, rule: str) -> jax.Array:
  """One t's z-map from its anomaly map A [B,H,W] (module docstring)."""
  if rule == 'per_pixel':
    return (a - stats.pixel_mean) / jnp.maximum(stats.pixel_std, _STD_FLOOR)
  if rule == 'two_sided':
    return jnp.abs(a - stats.map_mean) / jnp.maximum(stats.map_std, _STD_FLOOR)
  return a / stats.std


def settings(lc) -> dict:
  """The keyword arguments of `localize` from a config's localize block: n_sigma,
  smoothing_sigma, rule (from stats and two_sided) and target_fpr, as floats and a str."""
  return {'n_sigma': float(lc.n_sigma), 'smoothing_sigma': float(lc.smoothing_sigma),
          'rule': rule_from_config(lc), 'target_fpr': float(lc.get('target_fpr', TARGET_FPR))}


def rule_from_config(lc) -> str:
  kind = lc.get('stats', 'global')
  if lc.get('two_sided', False):
    if kind != 'global':
      raise ValueError(f"localize.two_sided=True needs localize.stats='global' (got {kind!r}): "
                       'the two-sided rule uses the healthy anomaly map\'s global mean and std')
    return 'two_sided'
  return kind
