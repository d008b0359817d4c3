"""Anomaly localization with scores (SANO §2.2).

One forward pass of the score model at a small t gives s(x) ~ grad_x log p(x). The anomaly map is

    A(x) = G_sigma * mean_c |s(x)_c|                        (mean over colour channels, gaussian filter)

and the paper's rule flags pixels whose map exceeds N standard deviations of the healthy score
distribution (signed scores, all pixels and channels pooled):

    z(x) = A(x) / std_healthy(s),     mask = z > N.

Options (``rule=``): ``'per_pixel'`` (Genc et al.: z = (A - mean_ij) / std_ij over healthy images),
``'two_sided'`` (z = |A - mean(A_healthy)| / std(A_healthy)) and ``'quantile'`` (mask = A > the
(1 - target_fpr) quantile of the healthy A; z stays A / std).

Everything here is pure JAX with static shapes: ``localize`` is jit/vmap/pmap safe (no host
callbacks). The maps are `sano_jax.anomaly_maps`'s, the healthy statistics (``ScoreStats``,
``MultiStats``) `sano_jax.score_stats`'s.

NaN / inf handling: inside jit a non-finite input pixel makes the z-map NaN in its gaussian
neighbourhood (and the mask False there, since NaN > N is False). Called eagerly (concrete arrays),
``localize`` runs ``check_images`` first and raises ValueError on non-finite or out-of-range input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sano_jax import multiscale
from sano_jax.anomaly_maps import anomaly_map, as_fields, channel_feature_maps, gaussian_filter2d
from sano_jax.anomaly_maps import density_feature_maps, raw_map
from sano_jax.image_checks import check_images  # pylint: disable=unused-import  (public here too)
from sano_jax.score_stats import MultiStats, ScoreFn, ScoreStats, to_float_images

RULES = ('global', 'per_pixel', 'two_sided', 'quantile', 'density', 'density_mean')
DENSITY_RULES = ('density', 'density_mean')  # need MultiStats
TARGET_FPR = 1e-3  # the 'quantile' rule's healthy false-positive rate unless configured
_STD_FLOOR = 1e-12


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
  images = to_float_images(images)
  _check_shapes(images, stats)
  if ((rule != 'global' or isinstance(stats, MultiStats))
      and float(smoothing_sigma) != float(stats.smoothing_sigma)):
    raise ValueError(f'rule {rule!r} compares with healthy anomaly maps smoothed with sigma='
                     f'{stats.smoothing_sigma}, but smoothing_sigma={smoothing_sigma}')
  fields = as_fields(score_fn(2.0 * images - 1.0))
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
  fields = as_fields(fields)
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
