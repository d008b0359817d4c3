"""A reconstruction-based diffusion localizer after AnoDDPM (Wyatt et al. 2022), with SANO's eps model.

Where SANO reads the anomaly off ONE forward pass (the score at a small t), AnoDDPM noises the image
part-way, x(t0) = alpha(t0) x + sigma(t0) z (t0 = 0.5 here, gaussian noise instead of simplex noise),
denoises it back to t = 0 with K ancestral (DDPM) steps of the same noise-predicting model, and maps

    A(x) = G_sigma * mean_c |x - x_rec|,      x in [-1, 1].

It costs K forward passes per image; `benchmarks/bench_localize.py` measures the ratio.

The ancestral step from t to s < t on the uniform grid t_k = t0 k / K is DDPM's posterior step with
x0 replaced by its estimate x0_hat = (x_t - sigma_t eps_hat) / alpha_t (optionally clipped to
[-1, 1]):

    x_s = (alpha_ts sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_ts^2 / sigma_t^2) x0_hat
          + (sigma_ts sigma_s / sigma_t) z,        alpha_ts = alpha_t / alpha_s,
                                                   sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,

so the last step (s = 0) returns x0_hat itself. Everything is jittable: the K steps are a
`lax.fori_loop`, K static.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sano_jax import anomaly_maps
from sano_jax.sano import SANO
from sano_jax.sde import VPSDE

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B,H,W,C], t [B]) -> eps_hat


def make_eps_fn(model, params) -> EpsFn:
  """The U-Net's noise prediction at continuous t (eval mode, no dropout)."""
  return lambda x, t: model.apply({'params': params}, x, t, train=False)


def _normal(rng, shape, shared: bool):
  """N(0, I) of `shape` [B, ...]; shared: one draw for the whole batch, so that each example's
  reconstruction does not depend on its position in the batch (deterministic localization)."""
  if shared:
    return jnp.broadcast_to(jax.random.normal(rng, (1,) + tuple(shape[1:]), jnp.float32), shape)
  return jax.random.normal(rng, shape, jnp.float32)


def noise_to(sde: VPSDE, x0: jax.Array, rng: jax.Array, t_start: float = 0.5, *,
             shared_noise: bool = False) -> jax.Array:
  """x(t0) = alpha(t0) x0 + sigma(t0) z, z ~ N(0, I)."""
  t = jnp.float32(t_start)
  z = _normal(rng, x0.shape, shared_noise)
  return sde.mean_coeff(t) * x0.astype(jnp.float32) + sde.marginal_std(t) * z


def denoise(eps_fn: EpsFn, sde: VPSDE, x_t: jax.Array, rng: jax.Array, *, t_start: float = 0.5,
            num_steps: int = 50, clip_denoised: bool = True, shared_noise: bool = False) -> jax.Array:
  """K = num_steps ancestral steps from x(t_start) down to t = 0 (the last one returns x0_hat)."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if not 0.0 < t_start <= sde.T:
    raise ValueError(f't_start must lie in (0, {sde.T}], got {t_start}')
  b = x_t.shape[0]
  dt = float(t_start) / num_steps

  def body(i, x):
    k = num_steps - i
    t = k * dt
    s = (k - 1) * dt
    log_a_t, log_a_s = sde.log_mean_coeff(t), sde.log_mean_coeff(s)
    a_t, a_s = jnp.exp(log_a_t), jnp.exp(log_a_s)
    var_t, var_s = -jnp.expm1(2.0 * log_a_t), -jnp.expm1(2.0 * log_a_s)
    var_ts = -jnp.expm1(2.0 * (log_a_t - log_a_s))  # 1 - alpha_ts^2
    # sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2 = 1 - alpha_ts^2 for the VP-SDE.
    eps = eps_fn(x, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)
    x0_hat = (x - jnp.sqrt(var_t) * eps) / a_t
    if clip_denoised:
      x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    mean = (jnp.exp(log_a_t - log_a_s) * var_s / var_t) * x + (a_s * var_ts / var_t) * x0_hat
    std = jnp.sqrt(var_ts * var_s / var_t)
    z = _normal(jax.random.fold_in(rng, i), x.shape, shared_noise)
    return mean + std * z

  return jax.lax.fori_loop(0, num_steps, body, x_t.astype(jnp.float32))


def reconstruct(eps_fn: EpsFn, sde: VPSDE, x0: jax.Array, rng: jax.Array, *, t_start: float = 0.5,
                num_steps: int = 50, clip_denoised: bool = True,
                shared_noise: bool = False) -> jax.Array:
  """x0 [B,H,W,C] in [-1, 1] -> its reconstruction after noising to t_start and K steps back."""
  noise_rng, loop_rng = jax.random.split(rng)
  x_t = noise_to(sde, x0, noise_rng, t_start, shared_noise=shared_noise)
  return denoise(eps_fn, sde, x_t, loop_rng, t_start=t_start, num_steps=num_steps,
                 clip_denoised=clip_denoised, shared_noise=shared_noise)


def anomaly_map(eps_fn: EpsFn, sde: VPSDE, images: jax.Array, rng: jax.Array, *,
                t_start: float = 0.5, num_steps: int = 50, smoothing_sigma: float = 2.0,
                clip_denoised: bool = True) -> jax.Array:
  """images [B,H,W,C] in [0, 1] -> A = G_sigma * mean_c |x - x_rec| [B,H,W] float32 (x = 2 img - 1)."""
  x = 2.0 * images.astype(jnp.float32) - 1.0
  x_rec = reconstruct(eps_fn, sde, x, rng, t_start=t_start, num_steps=num_steps,
                      clip_denoised=clip_denoised)
  return anomaly_maps.anomaly_map(x - x_rec, smoothing_sigma)


def make_localizer(model, sde: VPSDE, *, t_start: float = 0.5, num_steps: int = 50,
                   smoothing_sigma: float = 2.0, clip_denoised: bool = True):
  """jit((params, images [B,H,W,C] in [0,1], rng) -> A [B,H,W]); params are arguments, not constants."""

  @jax.jit
  def localize(params, images, rng):
    return anomaly_map(make_eps_fn(model, params), sde, images, rng, t_start=t_start,
                       num_steps=num_steps, smoothing_sigma=smoothing_sigma,
                       clip_denoised=clip_denoised)
  return localize


class AnoDDPM(SANO):
  """config.method='anoddpm': SANO's U-Net, trained exactly like SANO (eq. 1), localizing by
  reconstruction: field = x - x_rec, x_rec from `reconstruct` (config.anoddpm.{t_start, num_steps},
  a fixed key and one noise draw shared by the batch, so the map is deterministic per image)."""
  name = 'anoddpm'
  reuses_model_of = 'sano'  # the same U-Net trained with the same loss

  def __init__(self, config):
    super().__init__(config)
    c = config.anoddpm
    self.t_start, self.num_steps = float(c.t_start), int(c.num_steps)
    self.clip_denoised, self.seed = bool(c.clip_denoised), int(c.seed)

  @property
  def ts(self) -> tuple:
    return (None,)  # localizes by reconstruction from t_start, not by the score at localize.t

  def field(self, params, x):
    x = x.astype(jnp.float32)
    x_rec = reconstruct(self.eps_fn(params), self.sde, x, jax.random.PRNGKey(self.seed),
                        t_start=self.t_start, num_steps=self.num_steps,
                        clip_denoised=self.clip_denoised, shared_noise=True)
    return x - x_rec


METHODS = {AnoDDPM.name: AnoDDPM}  # read by sano_jax/methods.py
