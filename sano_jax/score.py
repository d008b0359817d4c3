"""From the noise-predicting model to the score of the data: s(x, t) = -eps_hat(x, t) / sigma(t)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sano_jax.sde import VPSDE


def make_score_fn(model, params, sde: VPSDE, t: float) -> Callable[[jax.Array], jax.Array]:
  """score_fn(x [B,H,W,C] in [-1,1]) -> s_theta(x, t) [B,H,W,C] at a fixed small t (SANO §2.2)."""
  sigma = sde.marginal_std(jnp.float32(t))

  def score_fn(x):
    t_vec = jnp.full((x.shape[0],), t, jnp.float32)
    return -model.apply({'params': params}, x, t_vec, train=False) / sigma
  return score_fn
