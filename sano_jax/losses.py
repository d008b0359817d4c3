"""Denoising score matching for the VP-SDE (SANO eq. 1).

With x(t) = alpha(t) x0 + sigma(t) z, the conditional score is grad log p_0t(x(t)|x0) = -z / sigma(t).
The model predicts the noise, eps_hat(x, t), and s(x, t) = -eps_hat / sigma(t). Per example,

    default:               l = mean_d (eps_hat - z)^2                  = lambda(t) |s + z/sigma|^2 / D,
                                                                          lambda(t) = sigma(t)^2
    likelihood weighting:  l = mean_d g(t)^2 (s + z/sigma)^2           (lambda(t) = g(t)^2 = beta(t),
                                                                          Song et al. 2021a)

with t ~ U(eps, 1). Both are eq. (1) (the 1/2 and the dimension D absorbed into the learning rate).
``t_sampling='log_uniform'`` draws log t ~ U(log t_min, 0) instead: the same objective under the
weighting lambda(t) p(t) with p(t) = 1 / (t log(1/t_min)) (any positive weighting has the true score
as its minimizer at every t), which spends the steps where localization reads the score (small t)
instead of spreading them evenly over [eps, 1].
Every example draws its t and z from its own key, fold_in(rng, example_id), so the loss of a batch does
not depend on how the batch is split over devices and hosts.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sano_jax.sde import VPSDE, _bcast

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [B,H,W,C], t [B]) -> eps_hat


T_SAMPLING = ('uniform', 'log_uniform')


def check_t_sampling(t_sampling: str, t_eps: float) -> None:
  """A clear error for an unknown training-t law or a smallest t outside (0, 1)."""
  if t_sampling not in T_SAMPLING:
    raise ValueError(f'training.t_sampling must be one of {T_SAMPLING}, got {t_sampling!r}')
  if not 0.0 < t_eps < 1.0:
    raise ValueError(f'the smallest training t (training.t_sampling_min, else sde.eps) must lie in '
                     f'(0, 1), got {t_eps}')


def sample_t_and_noise(rng: jax.Array, example_ids: jax.Array, shape, t_eps: float,
                       t_sampling: str = 'uniform'):
  """t_i ~ U(t_eps, 1) (or log t_i ~ U(log t_eps, 0): `t_sampling='log_uniform'`) and
  z_i ~ N(0, I) of `shape` [B, ...], each from fold_in(rng, example_ids[i])."""
  check_t_sampling(t_sampling, t_eps)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)
  lo, hi = (t_eps, 1.0) if t_sampling == 'uniform' else (float(np.log(t_eps)), 0.0)
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), minval=lo, maxval=hi))(keys)
  t = u if t_sampling == 'uniform' else jnp.exp(u)
  z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape[1:]))(keys)
  return t, z


def dsm_loss_per_example(eps_fn: EpsFn, sde: VPSDE, x0: jax.Array, rng: jax.Array,
                         example_ids: jax.Array, *, t_eps: float = 1e-5,
                         likelihood_weighting: bool = False,
                         t_sampling: str = 'uniform') -> jax.Array:
  """Eq. (1) per example [B] for clean images x0 [B,H,W,C] in [-1, 1]."""
  t, z = sample_t_and_noise(rng, example_ids, x0.shape, t_eps, t_sampling)
  x_t = sde.perturb(x0.astype(jnp.float32), t, z)
  eps_hat = eps_fn(x_t.astype(x0.dtype), t).astype(jnp.float32)
  sq = jnp.square(eps_hat - z)
  if likelihood_weighting:
    sq = sq * _bcast(sde.beta(t) / jnp.square(sde.marginal_std(t)), sq)
  return jnp.mean(sq.reshape(sq.shape[0], -1), axis=-1)
