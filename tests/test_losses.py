"""Denoising score matching (eq. 1) against the closed form for gaussian data.

For x0 ~ N(0, s^2 I): x(t) ~ N(0, v(t) I), v = alpha^2 s^2 + sigma^2, the true score is -x/v and the
ideal noise prediction eps*(x, t) = sigma x / v. Its per-dimension loss is E_t[alpha^2 s^2 / v]
(default weighting) and E_t[beta/sigma^2 * alpha^2 s^2 / v] (likelihood weighting).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from sano_jax import losses
from sano_jax.sde import VPSDE

SDE = VPSDE()
S = 0.5  # data std


def true_eps(x, t):
  a, sig = SDE.mean_coeff(t)[:, None], SDE.marginal_std(t)[:, None]
  return sig * x / (a**2 * S**2 + sig**2)


def analytic_loss(t_eps, likelihood_weighting, t_sampling='uniform'):
  """E_t[w(t) alpha^2 s^2 / v] under the training t's density p(t): 1 / (1 - t_eps) on [t_eps, 1]
  (uniform) or 1 / (t log(1 / t_eps)) (log-uniform)."""
  def integrand(t):
    a2 = float(SDE.mean_coeff(t)) ** 2
    s2 = float(SDE.marginal_std(t)) ** 2
    w = float(SDE.beta(t)) / s2 if likelihood_weighting else 1.0
    p = 1.0 / (1.0 - t_eps) if t_sampling == 'uniform' else 1.0 / (t * np.log(1.0 / t_eps))
    return p * w * a2 * S**2 / (a2 * S**2 + s2)
  value, _ = integrate.quad(integrand, t_eps, 1.0, limit=200, points=[t_eps * 10, 0.01, 0.1])
  return value


def per_example(eps_fn, t_eps, lw, n=20000, d=16, seed=0, t_sampling='uniform'):
  x0 = S * jax.random.normal(jax.random.PRNGKey(seed), (n, d))
  fn = jax.jit(lambda r: losses.dsm_loss_per_example(eps_fn, SDE, x0, r, jnp.arange(n), t_eps=t_eps,
                                                     likelihood_weighting=lw,
                                                     t_sampling=t_sampling))
  return np.asarray(fn(jax.random.PRNGKey(seed + 1)))


@pytest.mark.parametrize('t_eps,lw,t_sampling', [
    (1e-5, False, 'uniform'), (1e-2, True, 'uniform'), (1e-3, False, 'log_uniform'),
    (1e-2, True, 'log_uniform')])
def test_loss_of_true_score_equals_analytic_value(t_eps, lw, t_sampling):
  l = per_example(true_eps, t_eps, lw, t_sampling=t_sampling)
  se = l.std() / np.sqrt(l.size)
  expected = analytic_loss(t_eps, lw, t_sampling)
  assert abs(l.mean() - expected) < 4 * se, (l.mean(), expected, se)


T_CDFS = {'uniform': lambda t: (t - 1e-3) / (1.0 - 1e-3),  # on [1e-3, 1]
          'log_uniform': lambda t: np.log(t / 1e-3) / np.log(1.0 / 1e-3)}


@pytest.mark.parametrize('t_sampling', sorted(T_CDFS))
def test_training_t_follows_its_distribution(t_sampling):
  """Kolmogorov-Smirnov against the closed-form CDF on [1e-3, 1]; the other CDF is rejected."""
  t, _ = jax.jit(lambda r: losses.sample_t_and_noise(r, jnp.arange(5000), (5000, 2), 1e-3,
                                                     t_sampling))(jax.random.PRNGKey(0))
  t = np.asarray(t, np.float64)
  assert 1e-3 <= t.min() and t.max() <= 1.0
  assert stats.kstest(t, T_CDFS[t_sampling]).pvalue > 1e-3
  other = 'log_uniform' if t_sampling == 'uniform' else 'uniform'
  assert stats.kstest(t, T_CDFS[other]).pvalue < 1e-6


def test_bad_t_sampling_is_a_clear_error():
  with pytest.raises(ValueError, match='t_sampling'):
    losses.sample_t_and_noise(jax.random.PRNGKey(0), jnp.arange(2), (2, 1), 1e-3, 'normal')
  with pytest.raises(ValueError, match='smallest training t'):
    losses.sample_t_and_noise(jax.random.PRNGKey(0), jnp.arange(2), (2, 1), 0.0, 'log_uniform')


@pytest.mark.parametrize('perturb', [
    lambda e, x, t: 1.1 * e, lambda e, x, t: 0.9 * e, lambda e, x, t: e + 0.05,
    lambda e, x, t: e + 0.1 * jnp.sin(3 * x)])
@pytest.mark.parametrize('lw', [False, True])
def test_true_score_beats_any_perturbed_score(perturb, lw):
  l_true = per_example(true_eps, 1e-2, lw)
  l_pert = per_example(lambda x, t: perturb(true_eps(x, t), x, t), 1e-2, lw)
  # Same rng: common random numbers, so the difference is the perturbation's squared error.
  diff = l_pert - l_true
  assert diff.mean() > 4 * diff.std() / np.sqrt(diff.size)


def test_noise_is_independent_of_batch_split():
  """Example i's t and z depend only on (rng, i): splitting a batch does not change its loss."""
  x0 = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 1))
  rng = jax.random.PRNGKey(3)
  full = losses.dsm_loss_per_example(true_eps_img, SDE, x0, rng, jnp.arange(8))
  halves = [losses.dsm_loss_per_example(true_eps_img, SDE, x0[i:i + 4], rng, jnp.arange(i, i + 4))
            for i in (0, 4)]
  np.testing.assert_allclose(full, np.concatenate(halves), rtol=1e-6)


def true_eps_img(x, t):
  return true_eps(x.reshape(x.shape[0], -1), t).reshape(x.shape)
