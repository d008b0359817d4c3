"""Anomaly maps from score fields (SANO §2.2): A = G_sigma * mean_c |s_c|, and the smoothed
feature maps of the multiscale density (`sano_jax.multiscale`).

The gaussian filter has scipy.ndimage.gaussian_filter's semantics (mode='reflect', truncate=4.0),
written in JAX so that it runs inside jit: sigma is static, the taps a static loop that XLA fuses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sano_jax import multiscale


def as_fields(fields) -> list:
  """A field [B,H,W,C] or a list of K fields (one per t) -> the list."""
  return list(fields) if isinstance(fields, (list, tuple)) else [fields]


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
