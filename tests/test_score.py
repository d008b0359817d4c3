"""score.make_score_fn: s(x, t) = -eps_hat(x, t) / sigma(t), sign and scale against Gaussian data.

For data x0 ~ N(0, s^2 I) the VP-SDE marginal is x_t ~ N(0, (alpha^2 s^2 + sigma^2) I), so the true
score is -x_t / (alpha^2 s^2 + sigma^2), and the noise predictor that minimizes the denoising loss is
E[z | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2) (= -sigma * score). A "model" returning exactly that
must give back the analytic score. alpha and sigma come from the closed-form integral of
beta(t) = b_min + t (b_max - b_min) written out here, not from sano_jax.sde.

(Inside z = A / std the scale of the score cancels, and |score| hides its sign: only this test sees
them.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import stats as jstats

from sano_jax import score
from sano_jax.sde import VPSDE

B_MIN, B_MAX = 0.1, 20.0


def _alpha_sigma(t):
  """Closed form: log alpha(t) = -1/2 int_0^t beta = -1/2 (b_min t + (b_max - b_min) t^2 / 2)."""
  integral = B_MIN * t + 0.5 * (B_MAX - B_MIN) * t**2
  alpha = np.exp(-0.5 * integral)
  return alpha, np.sqrt(1.0 - alpha**2)


class OptimalEps:
  """The exact optimal noise predictor for x0 ~ N(0, s^2 I) (records how it is called)."""

  def __init__(self, s):
    self.s = s
    self.calls = []

  def apply(self, variables, x, t, train=False):
    self.calls.append((variables, t, train))
    t = jnp.asarray(t, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    integral = B_MIN * t + 0.5 * (B_MAX - B_MIN) * t**2
    alpha2 = jnp.exp(-integral)
    sigma = jnp.sqrt(-jnp.expm1(-integral))
    var = alpha2 * self.s**2 + sigma**2
    return (sigma / var).reshape(-1, 1, 1, 1) * x


@pytest.mark.parametrize('t', [1e-3, 0.01, 0.05, 0.3])
@pytest.mark.parametrize('s', [0.5, 2.0])
def test_score_of_gaussian_data(t, s):
  sde = VPSDE(beta_min=B_MIN, beta_max=B_MAX)
  model = OptimalEps(s)
  params = {'w': np.float32(1.0)}
  score_fn = score.make_score_fn(model, params, sde, t)
  alpha, sigma = _alpha_sigma(t)
  rng = np.random.default_rng(0)
  x0 = s * rng.standard_normal((3, 8, 8, 2))
  xt = (alpha * x0 + sigma * rng.standard_normal(x0.shape)).astype(np.float32)
  got = np.asarray(score_fn(jnp.asarray(xt)))
  var = alpha**2 * s**2 + sigma**2
  np.testing.assert_allclose(got, -xt / var, rtol=2e-4, atol=1e-6)
  # The same, from the log density of the marginal by autodiff: d/dx log N(x; 0, var).
  logp = lambda x: jnp.sum(jstats.norm.logpdf(x, 0.0, jnp.sqrt(var)))
  np.testing.assert_allclose(got, np.asarray(jax.grad(logp)(jnp.asarray(xt))), rtol=2e-4,
                             atol=1e-6)
  # The sign: the score points towards the data mean (0); for s < 1 it is steeper than N(0, 1).
  assert (got * xt <= 0).all()
  # The model was asked at the fixed t for every example, in eval mode, with the given params.
  variables, t_seen, train = model.calls[-1]
  assert variables == {'params': params} and train is False
  np.testing.assert_allclose(np.asarray(t_seen), np.full((3,), t, np.float32))


def test_score_scale_is_one_over_sigma():
  """A model predicting eps_hat = 1 everywhere: the score is -1 / sigma(t) exactly."""

  class Ones:
    def apply(self, variables, x, t, train=False):
      del variables, t, train
      return jnp.ones_like(x)

  sde = VPSDE(beta_min=B_MIN, beta_max=B_MAX)
  for t in (1e-4, 0.002, 0.1, 1.0):
    got = np.asarray(score.make_score_fn(Ones(), {}, sde, t)(jnp.zeros((2, 4, 4, 1))))
    _, sigma = _alpha_sigma(t)
    np.testing.assert_allclose(got, -1.0 / sigma, rtol=1e-4)


def test_score_fn_jits():
  sde = VPSDE(beta_min=B_MIN, beta_max=B_MAX)
  score_fn = score.make_score_fn(OptimalEps(1.0), {}, sde, 0.01)
  x = jnp.linspace(-1, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  np.testing.assert_allclose(jax.jit(score_fn)(x), score_fn(x), rtol=1e-6)
  # Data N(0, 1) stays N(0, 1) under the VP-SDE: the score is -x at every t.
  np.testing.assert_allclose(score_fn(x), -x, rtol=1e-4, atol=1e-6)
