"""The AnoDDPM-style reconstruction baseline: jit, shapes, determinism, and the exact-model oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sano_jax import sde as sde_lib
from sano_jax.baselines import anoddpm
from sano_jax.models.unet import UNet

SDE = sde_lib.VPSDE()


def oracle_eps(s):
  """The exact eps model for data x0 ~ N(0, s^2) i.i.d.: x_t ~ N(0, a^2 s^2 + sigma^2), and
  E[eps | x_t] = sigma x_t / (a^2 s^2 + sigma^2)."""
  def eps_fn(x, t):
    a = SDE.mean_coeff(t)[:, None, None, None]
    sig = SDE.marginal_std(t)[:, None, None, None]
    return sig * x / (a**2 * s**2 + sig**2)
  return eps_fn


def test_unet_localizer_jits_with_shapes_and_is_deterministic():
  model = UNet(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_head_channels=8,
               dropout=0.1, num_groups=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1,)))['params']
  # Give the zero-initialised output convolution weights, so that eps_hat depends on the input.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: 0.1 * jax.random.normal(jax.random.PRNGKey(3), v.shape)
      if 'conv_out' in jax.tree_util.keystr(p) else v, params)
  localize = anoddpm.make_localizer(model, SDE, num_steps=3)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  a = localize(params, images, jax.random.PRNGKey(7))
  assert a.shape == (2, 16, 16) and a.dtype == jnp.float32
  assert np.all(np.isfinite(a)) and np.all(np.asarray(a) >= 0)
  np.testing.assert_array_equal(a, localize(params, images, jax.random.PRNGKey(7)))
  assert not np.allclose(a, localize(params, images, jax.random.PRNGKey(8)))


def test_one_step_is_the_closed_form_posterior_mean():
  """K = 1: x_rec = x0_hat = (x_t - sigma eps(x_t)) / alpha; with the oracle that is E[x0 | x_t]
  = alpha s^2 x_t / (alpha^2 s^2 + sigma^2), whatever the rng."""
  s, t0 = 0.5, 0.5
  x_t = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  rec = anoddpm.denoise(oracle_eps(s), SDE, x_t, jax.random.PRNGKey(1), t_start=t0, num_steps=1,
                        clip_denoised=False)
  a, sig = float(SDE.mean_coeff(t0)), float(SDE.marginal_std(t0))
  np.testing.assert_allclose(rec, a * s**2 * x_t / (a**2 * s**2 + sig**2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_steps', [1, 100])
def test_oracle_reconstruction_statistics(num_steps):
  """Gaussian data N(0, s^2) and the exact eps model. Many ancestral steps sample p(x0 | x_t):
  Var(x_rec) -> s^2 and E[x_rec x0] = Cov(E[x0|x_t], x0) = a^2 s^4 / (a^2 s^2 + sigma^2). One step
  returns the posterior mean, whose variance is that same a^2 s^4 / (a^2 s^2 + sigma^2) < s^2."""
  s, t0 = 0.5, 0.1
  x0 = s * jax.random.normal(jax.random.PRNGKey(0), (64, 32, 32, 1))
  rec = jax.jit(lambda x, r: anoddpm.reconstruct(oracle_eps(s), SDE, x, r, t_start=t0,
                                                 num_steps=num_steps, clip_denoised=False))(
                                                     x0, jax.random.PRNGKey(5))
  a2, sig2 = float(SDE.mean_coeff(t0))**2, float(SDE.marginal_std(t0))**2
  cov = a2 * s**4 / (a2 * s**2 + sig2)
  rec, x0 = np.asarray(rec, np.float64), np.asarray(x0, np.float64)
  np.testing.assert_allclose(np.mean(rec * x0), cov, rtol=0.03)
  np.testing.assert_allclose(np.var(rec), s**2 if num_steps > 1 else cov, rtol=0.03)


def test_anomaly_map_is_zero_for_a_perfect_reconstruction():
  """An eps model equal to the true noise, x_t - alpha x0 = sigma eps, reconstructs x exactly in
  one step; check A == 0 via the noised input of a constant image and a model that knows x0."""
  x0 = jnp.full((1, 8, 8, 3), 0.25)
  eps_fn = lambda x, t: (x - SDE.mean_coeff(t)[:, None, None, None] * (2 * x0 - 1)) / \
      SDE.marginal_std(t)[:, None, None, None]
  a = anoddpm.anomaly_map(eps_fn, SDE, x0, jax.random.PRNGKey(0), num_steps=1)
  np.testing.assert_allclose(a, 0.0, atol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match='num_steps'):
    anoddpm.denoise(oracle_eps(1.0), SDE, jnp.zeros((1, 4, 4, 1)), jax.random.PRNGKey(0),
                    num_steps=0)
