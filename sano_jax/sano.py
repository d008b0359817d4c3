"""SANO's method (§2): a U-Net eps model trained by denoising score matching (eq. 1), localizing
with the score at a small t (`sano_jax.method_base.Method`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sano_jax import losses as losses_lib
from sano_jax import models
from sano_jax import multiscale
from sano_jax import score
from sano_jax import sde as sde_lib
from sano_jax.method_base import Method


class SANO(Method):
  """SANO: a U-Net eps model trained by denoising score matching (eq. 1); field = the score at t,
  s(x, t) = -eps_hat(x, t) / sigma(t), one forward pass (§2.2). t = config.localize.t."""
  name = 'sano'

  def __init__(self, config):
    super().__init__(config)
    self.model = models.create_model(config)
    self.sde = sde_lib.from_config(config)
    self._ts = multiscale.as_ts(config.localize.t)
    self.t = self._ts[0]
    # The training t: U(eps, 1) (the paper) or log-uniform on [t_sampling_min, 1] (sano_jax/losses.py).
    self.t_sampling = config.training.get('t_sampling', 'uniform')
    t_min = config.training.get('t_sampling_min', None)
    self.t_eps = float(config.sde.eps if t_min is None else t_min)
    losses_lib.check_t_sampling(self.t_sampling, self.t_eps)  # at creation, not at first trace
    self.likelihood_weighting = bool(config.sde.likelihood_weighting)
    m = config.model
    self._signature = {
        'nf': m.nf, 'ch_mult': list(m.ch_mult), 'num_res_blocks': m.num_res_blocks,
        'attn_resolutions': list(m.attn_resolutions), 'num_head_channels': m.num_head_channels,
        'resblock_updown': m.resblock_updown, 'scale_shift_norm': m.scale_shift_norm,
        'num_groups': m.num_groups}

  @staticmethod
  def downsampling(config) -> tuple[str, int]:
    return 'model', len(config.model.ch_mult) - 1

  def signature(self) -> dict:
    return {**super().signature(), **self._signature}

  def init(self, rng):
    # Eager, not jitted: each op compiles once per shape and process (XLA:CPU took ~30 s to compile
    # the whole jitted init, mostly its random-number kernels, for every new model).
    x = jnp.zeros((1,) + self.train_shape)
    return self.model.init(rng, x, jnp.ones((1,)))['params']

  def eps_fn(self, params, *, train: bool = False, dropout_rng=None):
    """(x, t) -> eps_hat(x, t) of the U-Net."""
    rngs = {'dropout': dropout_rng} if train and dropout_rng is not None else None
    return lambda x, t: self.model.apply({'params': params}, x, t, train=train, rngs=rngs)

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    loss = losses_lib.dsm_loss_per_example(
        self.eps_fn(params, train=train, dropout_rng=dropout_rng), self.sde, x, rng, ids,
        t_eps=self.t_eps, likelihood_weighting=self.likelihood_weighting,
        t_sampling=self.t_sampling)
    return {'loss': loss}

  @property
  def ts(self) -> tuple:
    return self._ts

  def field(self, params, x):
    """The score at t [B,H,W,C]; with a t-set, a list of K scores, one forward pass per t inside
    one compiled call (lax.map: the memory of one forward, not of a batch K times larger)."""
    if len(self._ts) == 1:
      return score.make_score_fn(self.model, params, self.sde, self.t)(x)
    s = jax.lax.map(lambda t: score.make_score_fn(self.model, params, self.sde, t)(x),
                    jnp.asarray(self._ts, jnp.float32))
    return [s[k] for k in range(len(self._ts))]
