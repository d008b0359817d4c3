"""The VP-SDE (eq. 2-3) against closed forms and the discrete DDPM schedule."""
import jax
import numpy as np
import pytest
from scipy import integrate

from sano_jax.sde import VPSDE


@pytest.fixture
def sde():
  return VPSDE(beta_min=0.1, beta_max=20.0, num_scales=1000)


def test_beta_is_linear(sde):
  t = np.linspace(0, 1, 11)
  np.testing.assert_allclose(sde.beta(t), 0.1 + t * 19.9, rtol=1e-12)


@pytest.mark.parametrize('t', [1e-5, 1e-3, 0.01, 0.1, 0.5, 1.0])
def test_mean_coeff_is_exp_of_minus_half_integral_of_beta(sde, t):
  integral, _ = integrate.quad(lambda s: 0.1 + s * 19.9, 0, t)
  np.testing.assert_allclose(float(sde.mean_coeff(t)), np.exp(-0.5 * integral), rtol=1e-5)
  # Variance preserving: alpha^2 + sigma^2 = 1, with sigma accurate at small t as well.
  np.testing.assert_allclose(float(sde.marginal_std(t)), np.sqrt(1 - np.exp(-integral)), rtol=1e-4)


def test_discrete_betas_are_ddpm_schedule(sde):
  b = sde.discrete_betas()
  assert b.shape == (1000,)
  np.testing.assert_allclose([b[0], b[-1]], [1e-4, 0.02], rtol=1e-12)
  np.testing.assert_allclose(np.diff(b), np.full(999, (0.02 - 1e-4) / 999), rtol=1e-9)


def test_continuous_std_matches_discrete_alphas_cumprod(sde):
  """sigma(i/N) ~ sqrt(1 - alphabar_i): the continuous SDE is the N -> inf limit of DDPM."""
  abar = sde.discrete_alphas_cumprod()
  i = np.arange(1, 1001)
  discrete = np.sqrt(1 - abar)
  continuous = np.asarray(sde.marginal_std(i / 1000.0))
  # Measured: max |diff| 1.3e-3, max relative 4.9% (at i=1), 0.8% by i=50.
  np.testing.assert_allclose(continuous, discrete, atol=2e-3, rtol=0)
  np.testing.assert_allclose(continuous, discrete, rtol=5e-2)
  np.testing.assert_allclose(continuous[49:], discrete[49:], rtol=1e-2)


def test_perturb_has_the_marginal_moments(sde):
  x0 = np.full((20000, 1), 0.7, np.float32)
  t = np.full((20000,), 0.3, np.float32)
  z = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  xt = np.asarray(sde.perturb(x0, t, z))
  se = float(sde.marginal_std(0.3))
  np.testing.assert_allclose(xt.mean(), 0.7 * float(sde.mean_coeff(0.3)), atol=4 * se / np.sqrt(20000))
  np.testing.assert_allclose(xt.std(), se, rtol=0.03)
