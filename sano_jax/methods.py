"""The anomaly-localization methods behind one interface (`config.method`).

A method supplies three pure pieces; training, checkpoints, healthy statistics, thresholds,
metrics, figures, predict and `load_localizer` are shared and never branch on the method:

  init(rng) -> params                      a pytree (a dict of sub-networks where a method has several)
  losses(params, x, ids, rng, *, train, dropout_rng) -> {name: [B]}
                                           per-example terms for images x [B,H,W,C] in [-1, 1];
                                           'loss' is minimised, 'select' (default: 'loss') picks the
                                           best checkpoint on validation data. Example i draws its
                                           randomness from fold_in(rng, ids[i]), so a batch's loss
                                           does not depend on how it is split over devices.
  field(params, x) -> [B,H,W,C]            the per-pixel deviation whose channel-mean magnitude is the
                                           anomaly map, A = G_sigma * mean_c |field| (SANO §2.2): the
                                           score s(x, t) for SANO, the residual x - x_hat for the
                                           reconstruction baselines.

The thresholds of `sano_jax.localization` (N sigma of the signed healthy field, per-pixel, two-sided,
quantile) only see `field`, so every method gets the label-free threshold. A method with several
networks trained by different objectives (AnoVAEGAN's discriminator) returns their gradients from
ONE 'loss' through stop_gradient (each network's gradient is that of its own objective) and names an
optimizer per sub-network in `optimizer_groups`.

Methods: 'sano' (here), 'anoddpm' (`baselines/anoddpm.py`), 'ae', 'vae', 'cevae', 'vqvae',
'anovaegan' (`baselines/autoencoders.py`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sano_jax import losses as losses_lib
from sano_jax import models
from sano_jax import multiscale
from sano_jax import score
from sano_jax import sde as sde_lib
from sano_jax import tiling

METHODS = ('sano', 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm')


class Method:
  """Base class: holds the image shape; subclasses define init, losses, field, signature."""
  name = 'base'

  def __init__(self, config):
    size, crop, c = (int(config.data.image_size), models.crop_size(config),
                     int(config.data.num_channels))
    self.image_shape = (size, size, c)  # the stored images, scored whole (statistics, localize)
    self.train_shape = (crop, crop, c)  # the random crops training sees (config.data.crop_size)
    lc = config.get('localize', {})
    self.tile = (lc.get('tile_size'), int(lc.get('tile_overlap', 0) or 0))

  def init(self, rng: jax.Array) -> Any:
    raise NotImplementedError

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    raise NotImplementedError

  def field(self, params, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  @property
  def ts(self) -> tuple:
    """The values of t the field is taken at (one entry, unused, for methods without t)."""
    return (None,)

  def signature(self) -> dict:
    """The config values a checkpoint's shapes depend on (checked when a workdir is reused)."""
    h, _, c = self.image_shape
    sig = {'method': self.name, 'image_size': h, 'num_channels': c}
    if self.train_shape != self.image_shape:
      sig['crop_size'] = self.train_shape[0]
    return sig

  def optimizer_groups(self) -> tuple[Callable[[Any], Any], dict] | None:
    """None (one optimizer for all params, `config.optim`), or (labels_fn, {label: optim config})
    where labels_fn(params) gives each leaf's label (optax.multi_transform)."""
    return None

  def field_fn(self, params) -> Callable[[jax.Array], jax.Array]:
    """x [B,H,W,C] in [-1, 1] -> field, params bound: the `score_fn` of `localization.localize`.

    The whole image in one pass, or over blended tiles with `config.localize.tile_size`
    (`sano_jax/tiling.py`)."""
    return tiling.tiled(lambda x: self.field(params, x), *self.tile)


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


def check_name(name: str) -> str:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}: config.method must be one of {", ".join(METHODS)}')
  return name


def method_name(config) -> str:
  """config.method, 'sano' for configs (and workdirs) written before methods existed."""
  return check_name(str(config.get('method', 'sano')))


def create(config) -> Method:
  """The method `config.method` selects, built from its own config block."""
  name = method_name(config)
  if name == 'sano':
    return SANO(config)
  if name == 'anoddpm':
    from sano_jax.baselines import anoddpm  # pylint: disable=g-import-not-at-top
    return anoddpm.AnoDDPM(config)
  from sano_jax.baselines import autoencoders  # pylint: disable=g-import-not-at-top
  return autoencoders.create(name, config)
