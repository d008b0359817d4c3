"""The variance-preserving SDE of SANO eq. (2)-(3) (Song et al. 2021, Ho et al. 2020).

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,   beta(t) = b_min + t (b_max - b_min),   t in [0, 1].

Its transition kernel is gaussian: x(t) | x(0) ~ N(alpha(t) x(0), sigma(t)^2 I) with

    log alpha(t) = -1/4 t^2 (b_max - b_min) - 1/2 t b_min,     sigma(t)^2 = 1 - alpha(t)^2.

With N discrete steps, DDPM's betas are beta_i = (b_min + (b_max - b_min) i/(N-1)) / N, i.e. 1e-4..0.02
for N = 1000 (the paper's choice), and sigma(i/N) approximates sqrt(1 - prod_{j<=i}(1 - beta_j)).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """VP-SDE with a linear beta schedule (paper eq. 3)."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  num_scales: int = 1000
  T: float = 1.0

  def beta(self, t):
    """beta(t) = b_min + t (b_max - b_min)   (eq. 3)."""
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_mean_coeff(self, t):
    """log alpha(t) = -1/2 int_0^t beta(s) ds."""
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def mean_coeff(self, t):
    """alpha(t): the marginal mean of x(t) is alpha(t) x(0)."""
    return jnp.exp(self.log_mean_coeff(t))

  def marginal_std(self, t):
    """sigma(t) = sqrt(1 - alpha(t)^2), computed stably for small t."""
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_mean_coeff(t)))

  def perturb(self, x0, t, noise):
    """x(t) = alpha(t) x0 + sigma(t) noise, t of shape [B]."""
    return _bcast(self.mean_coeff(t), x0) * x0 + _bcast(self.marginal_std(t), x0) * noise

  def discrete_betas(self) -> np.ndarray:
    """DDPM's betas for `num_scales` steps: linear from b_min/N to b_max/N (1e-4..0.02 at N=1000)."""
    n = self.num_scales
    return np.linspace(self.beta_min / n, self.beta_max / n, n)

  def discrete_alphas_cumprod(self) -> np.ndarray:
    """alphabar_i = prod_{j<=i} (1 - beta_j)."""
    return np.cumprod(1.0 - self.discrete_betas())


def _bcast(v, x):
  """Broadcast a per-example vector [B] against x [B, ...]."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def from_config(config) -> VPSDE:
  """The SDE of `config.sde`."""
  return VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max,
               num_scales=config.sde.num_scales)
