"""Anomaly maps at several t, and the multiscale density rule (Mahmood et al. 2021, arXiv 2010.13132).

With t = (t_1..t_K), each t gives its own anomaly map A_k = G_sigma * mean_c |s(x, t_k)| (SANO §2.2).
Two ways to turn the K maps into one z-map:

* ``rule='density'``: at each pixel position (i, j) the feature vector u_ij holds the log anomaly
  map of every t at three smoothing scales, u = (log G_{f sigma} * a_k : k = 1..K, f in
  DENSITY_SCALES) with a_k = mean_c |s(x, t_k)| the raw map, and is modelled on healthy images by a
  Gaussian N(mu_ij, Sigma_ij) (mean and full covariance over images, streamed); a pixel's
  Mahalanobis distance d^2 = (u - mu)^T Sigma^-1 (u - mu) is chi^2_D-distributed (D = 3K) under
  the model, and is reported as the equivalent one-sided normal deviate

      z = Phi^-1(1 - P(chi^2_D > d^2))        (so that "N sigma" keeps its meaning for any D).

  Deviations in either direction count (a region whose score is too SMALL, a smooth patch on grass,
  is as anomalous as one whose score is too large), and the covariance across t and scale lets the
  rule see a change in how the score varies with t and with the neighbourhood's size, not only its
  size. `localization.combine` then smooths z with G_sigma like the maps (pooling per-pixel
  evidence over a region: on the embedded grass/gravel data AUROC 0.72 -> 0.80 and 0.77 -> 0.84
  with sigma = 2). The three scales (sigma/2, sigma, 2 sigma) instead of sigma alone: on the four
  embedded variants' demo models (t = 0.02..0.4, sigma = 2; benchmarks/calibration_oracle.py),
  test AUROC grass 0.795 -> 0.843, gravel 0.835 -> 0.867, brick 0.898 -> 0.937, retina 0.59 -> 0.59.
* Centred features (``config.localize.density_centred``, a choice of the calibration): each
  feature minus its median over the image, u_ij - median_ij(u), per image and feature. |s| scales
  with an image's contrast and sharpness, which vary between photos (illumination, focus): in log
  space that is an additive offset of the whole map, and the median removes it (the median, not
  the mean, so that an anomaly does not move it). It pays on photos and costs on textures whose
  crops differ in level for real (docs/results.md; evaluated runs with centring forced on, the
  same choice otherwise): KolektorSDD 0.778 -> 0.812, retina 0.954 -> 0.949, grass 0.882 -> 0.879,
  gravel 0.893 -> 0.868. So it is the calibration's choice, not a default: it takes the centred
  density on KolektorSDD (0.812) and the plain one on gravel (0.893).
* ``rule='density'`` at ONE t: the same Gaussian, but over each colour channel's log map,
  u = (log G_{f sigma} * |s_c(x, t)| : f in DENSITY_SCALES, c = 1..C), D = 3C (grayscale: the
  t's marginal of the t-set density). The paper averages |s| over channels; on the RGB retina
  variant the channels' joint deviation ranks far better (demo model, stats on the validation split,
  test AUROC at t = 0.01, sigma 2: 0.946 against 0.79 for the channel mean and 0.84-0.90 for the
  z rules). Over a t-set the channel mean stays (3KC features per pixel, up to 63 on RGB, are too
  many for a few hundred healthy images: 0.91 at t = 0.005..0.05 with channels).
* ``rule='density_mean'`` over a t-set: z = mean_k z_k of each t's one-t density z above (D = 3C
  each; the same statistics, no new ones). Between the two: every t keeps its colour channels and
  its own small Gaussian, and averaging K such deviates cancels the noise the joint 3K-dimensional
  Gaussian fits to a few hundred images. On the grass demo model (sigma 2, t = 0.005..0.4): test
  AUROC 0.856 against 0.838 for the joint density and 0.836 for the best single t.
* any single-t rule (``global``, ``per_pixel``, ``two_sided``): each t gets its own healthy
  statistics and z = mean_k z_k. The mean (not the max) keeps the healthy z-maps' scale, so N
  means about the same as for one t, and averages out the per-t noise.

Everything is streamed (Chan et al. merges of the mean and co-moment), jit/vmap/pmap safe.
"""
from __future__ import annotations

from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special as scipy_special

_LOG_FLOOR = 1e-12
_RIDGE = 1e-3  # Sigma + ridge * tr(Sigma) / K * I: a singular direction (K > #images) stays finite
DENSITY_SCALES = (0.5, 1.0, 2.0)  # the density's smoothing scales, in units of smoothing_sigma


def as_ts(t) -> tuple[float, ...]:
  """config.localize.t (a float or a sequence of floats) -> a non-empty tuple of floats in (0, 1]."""
  ts = tuple(float(v) for v in (t if isinstance(t, (list, tuple)) else (t,)))
  if not ts:
    raise ValueError('localize.t is empty: give one t or a list of t in (0, 1]')
  bad = [v for v in ts if not 0.0 < v <= 1.0]
  if bad:
    raise ValueError(f'localize.t must lie in (0, 1], got {bad}')
  if len(set(ts)) != len(ts):
    raise ValueError(f'localize.t has repeated values: {ts}')
  return ts


def set_t(config, ts) -> None:
  """config.localize.t = ts, also over a config whose t was read as a float (an old config.json)."""
  with config.unlocked():
    del config.localize['t']
    config.localize.t = tuple(float(t) for t in ts)


@flax.struct.dataclass
class DensityStats:
  """Streaming per-pixel Gaussian of u = log anomaly maps over the t-set.

  n: images seen; mean [H,W,K]; comoment [H,W,K,K] = sum over images of (u - mean)(u - mean)^T.
  centred: whether u is centred on each image's median (`log_features`); fixed when the stats
  are made, so that fitting and scoring cannot disagree.
  whiten: None, or W = L^-1 [H,W,K,K] with Sigma = L L^T, computed once by `with_whitening`
  (derived from n and comoment, never saved; every update or selection drops it).
  """
  n: jax.Array
  mean: jax.Array
  comoment: jax.Array
  centred: bool = flax.struct.field(pytree_node=False, default=False)
  whiten: jax.Array | None = None

  @property
  def covariance(self) -> jax.Array:
    """Population covariance [H,W,K,K] with a small ridge (relative to its trace)."""
    return _covariance(self.comoment, self.n)


def _covariance(comoment: jax.Array, n: jax.Array) -> jax.Array:
  k = comoment.shape[-1]
  cov = comoment / jnp.maximum(n, 1.0)
  tr = jnp.trace(cov, axis1=-2, axis2=-1)[..., None, None]
  return cov + (_RIDGE * tr / k + _LOG_FLOOR) * jnp.eye(k, dtype=cov.dtype)


# One program per feature count K (shared by every density of that size in the process).
_whitening = jax.jit(lambda comoment, n: lower_inverse(cholesky(_covariance(comoment, n))))


def with_whitening(stats: DensityStats) -> DensityStats:
  """The stats with their whitening W = L^-1 computed now, so that `density_z` (and every program
  that scores with them) skips the Cholesky factor and its inverse. Why: those unrolled K x K ops
  were most of the compile time of the calibration's z-map programs (benchmarks/README.md)."""
  return stats.replace(whiten=_whitening(stats.comoment, stats.n))


def init_density(height: int, width: int, num_t: int, centred: bool = False) -> DensityStats:
  return DensityStats(n=jnp.zeros((), jnp.float32), mean=jnp.zeros((height, width, num_t)),
                      comoment=jnp.zeros((height, width, num_t, num_t)), centred=bool(centred))


def log_features(maps: Sequence[jax.Array], centred: bool = False) -> jax.Array:
  """K maps [B,H,W] -> u [B,H,W,K] = log max(A_k, floor); centred: minus its own median over
  the image (per image and k; module docstring)."""
  u = jnp.log(jnp.maximum(jnp.stack([m.astype(jnp.float32) for m in maps], -1), _LOG_FLOOR))
  return u - jnp.median(u, axis=(1, 2), keepdims=True) if centred else u


def update_density(stats: DensityStats, maps: Sequence[jax.Array],
                   valid: jax.Array | None = None) -> DensityStats:
  """Merges one batch of K maps [B,H,W] (valid [B] bool) by Chan et al.'s update:
  n = na + nb, mean = ma + d nb / n, C = Ca + Cb + d d^T na nb / n, d = mb - ma."""
  u = log_features(maps, stats.centred)
  b = u.shape[0]
  w = (jnp.ones((b,), bool) if valid is None else jnp.asarray(valid, bool)).astype(jnp.float32)
  nb = jnp.sum(w)
  mb = jnp.einsum('b,bhwk->hwk', w, u) / jnp.maximum(nb, 1.0)
  du = (u - mb) * w[:, None, None, None]
  cb = jnp.einsum('bhwk,bhwl->hwkl', du, du)
  return _merge(stats, nb, mb, cb)


def _merge(a: DensityStats, nb, mb, cb) -> DensityStats:
  n = a.n + nb
  safe = jnp.maximum(n, 1.0)
  d = mb - a.mean
  mean = a.mean + d * (nb / safe)
  com = a.comoment + cb + jnp.einsum('hwk,hwl->hwkl', d, d) * (a.n * nb / safe)
  return DensityStats(n=n, mean=mean, comoment=com, centred=a.centred)


def merge_density(a: DensityStats, b: DensityStats) -> DensityStats:
  """The density stats of the union of two streams (fitted the same way)."""
  if a.centred != b.centred:
    raise ValueError(f'cannot merge a density fitted with centred={a.centred} with one fitted '
                     f'with centred={b.centred}')
  return _merge(a, b.n, b.mean, b.comoment)


def density_z(stats: DensityStats, maps: Sequence[jax.Array]) -> jax.Array:
  """z [B,H,W]: Mahalanobis d^2 of log maps under the healthy Gaussian, as a one-sided normal
  deviate z = -Phi^-1(P(chi^2_K > d^2)) (so z > 3 has the false-positive rate of 3 sigma)."""
  u = log_features(maps, stats.centred) - stats.mean
  k = u.shape[-1]
  whiten = stats.whiten  # W = L^-1 [H,W,K,K], Sigma^-1 = W^T W
  if whiten is None:
    whiten = lower_inverse(cholesky(stats.covariance))
  d2 = jnp.sum(jnp.square(jnp.einsum('hwkl,bhwl->bhwk', whiten, u)), axis=-1)  # |W u|^2
  log_p = _log_chi2_sf(jnp.maximum(d2, 0.0), k)
  return -_ndtri_from_log(log_p)


# A Cholesky factor and the inverse of a triangular matrix in plain array ops, unrolled over the K
# rows and columns (K is small: 3 scales x at most 7 t), on the [H,W,K,K] statistics only (the
# batch meets them in one einsum). Not LAPACK: XLA:CPU runs independent LAPACK custom calls
# concurrently on its intra-op pool, and several batched inverses in one program (the calibration's
# density candidates) deadlocked there (jax 0.10.2, 2 cores: every pool thread waiting in
# ParallelBatchMap). Not a lax.fori_loop over in-place updates either: on XLA:CPU such a loop
# returned wrong values for a [64,32,32,15] batch (right ones for [4,32,32,15]);
# tests/test_multiscale.py checks both against numpy at that size.


def cholesky(a: jax.Array) -> jax.Array:
  """Lower L with L L^T = a for symmetric positive definite a [..., K, K] (Cholesky-Banachiewicz
  by columns: L_jj = sqrt(a_jj - sum_k<j L_jk^2), L_ij = (a_ij - sum_k<j L_ik L_jk) / L_jj)."""
  k = a.shape[-1]
  rows = jnp.arange(k)
  cols = []  # cols[j] = L[..., :, j]
  for j in range(k):
    aj = a[..., :, j]
    if cols:
      prev = jnp.stack(cols, axis=-1)  # L[..., :, :j]
      lj = prev[..., j, :]  # L[..., j, :j]
      aj = aj - jnp.einsum('...ik,...k->...i', prev, lj)
    diag = jnp.sqrt(jnp.maximum(aj[..., j], 1e-30))
    below = jnp.where(rows > j, aj / diag[..., None], 0.0)
    cols.append(jnp.where(rows == j, diag[..., None], below))
  return jnp.stack(cols, axis=-1)


def lower_inverse(l: jax.Array) -> jax.Array:
  """L^-1 for lower-triangular l [..., K, K] by forward substitution, row by row:
  row_i(L^-1) = (e_i - sum_k<i L_ik row_k(L^-1)) / L_ii."""
  k = l.shape[-1]
  eye = jnp.eye(k, dtype=l.dtype)
  rows = []
  for i in range(k):
    r = jnp.broadcast_to(eye[i], l.shape[:-2] + (k,))
    if rows:
      r = r - jnp.einsum('...k,...kl->...l', l[..., i, :i], jnp.stack(rows, axis=-2))
    rows.append(r / l[..., i, i][..., None])
  return jnp.stack(rows, axis=-2)


def _log_chi2_sf(x: jax.Array, k: int) -> jax.Array:
  """log P(chi^2_k > x) in closed form (k a static int), accurate far into the tail. With y = x/2:
  k = 2m: P = e^-y sum_{i<m} y^i / i!; k = 2m+1: P = erfc(sqrt y) + e^-y sum_{i=1..m}
  y^(i-1/2) / Gamma(i+1/2) (Abramowitz & Stegun 26.4.4-5); every term positive, summed in logs.
  Not jax's gammaincc: its series and continued fraction were ~0.5 s of compile time per call
  (ten calls in each of the calibration's z-map programs)."""
  y = 0.5 * jnp.maximum(x, 0.0)
  log_y = jnp.log(jnp.maximum(y, 1e-30))
  powers = np.arange(k // 2) + (1.0 if k % 2 == 0 else 1.5)  # each term: y^(p-1) / Gamma(p)
  terms = [(p - 1.0) * log_y - float(scipy_special.gammaln(p)) - y for p in powers]
  if k % 2:
    terms.append(np.log(2.0) + jax.scipy.special.log_ndtr(-jnp.sqrt(2.0 * y)))  # log erfc(sqrt y)
  return jax.nn.logsumexp(jnp.stack(terms), axis=0)


def _ndtri_from_log(log_p: jax.Array) -> jax.Array:
  """Phi^-1(p) from log p: exact through ndtri where p is representable, else the tail asymptote
  Phi^-1(p) ~ -sqrt(-2 log p - log(-2 log p) - log(2 pi))."""
  p = jnp.exp(log_p)
  direct = jax.scipy.special.ndtri(jnp.clip(p, 1e-37, 1.0 - 1e-7))
  l = -2.0 * log_p
  asym = -jnp.sqrt(jnp.maximum(l - jnp.log(jnp.maximum(l, 1e-6)) - np.log(2 * np.pi), 0.0))
  return jnp.where(p > 1e-30, direct, asym)


def feature_index(t_index: Sequence[int], num_scales: int) -> tuple[int, ...]:
  """Positions in the feature vector of the features of the t's at `t_index` (t-major)."""
  return tuple(int(k) * num_scales + j for k in t_index for j in range(num_scales))


def sub_density(stats: DensityStats, index: Sequence[int], num_scales: int = 1) -> DensityStats:
  """The marginal Gaussian of a subset of the t-set (sub-blocks of the mean and co-moment): the
  features of the t's at `index`, each with its `num_scales` smoothing scales."""
  idx = np.asarray(feature_index(index, num_scales), np.int32)
  if np.array_equal(idx, np.arange(stats.mean.shape[-1])):
    return stats  # all of it (keeps a whitening)
  return DensityStats(n=stats.n, mean=stats.mean[..., idx],
                      comoment=stats.comoment[..., idx[:, None], idx[None, :]],
                      centred=stats.centred)
