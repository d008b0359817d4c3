"""The interface every anomaly-localization method implements (`Method`).

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

Methods: 'sano' (`sano_jax/sano.py`), 'anoddpm' (`baselines/anoddpm.py`), 'ae', 'vae', 'cevae',
'vqvae', 'anovaegan' (`baselines/autoencoders.py`); `sano_jax/methods.py` is their registry. A new
method subclasses `Method` in sano_jax/baselines/ and is named in the registry.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from sano_jax import intensity
from sano_jax import models
from sano_jax import tiling


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
    # config.data.normalize (absent from configs written before it: 'none'); `network_input`.
    self.normalize = intensity.check_mode(config.data.get('normalize', 'none'))

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
    if self.normalize != 'none':  # a model trained on standardized inputs scores only those
      sig['normalize'] = self.normalize
    return sig

  # The method whose trained checkpoints this one uses as they are (same model, same loss), so a
  # comparison may copy that run instead of training the same model twice; None: its own.
  reuses_model_of: str | None = None

  @staticmethod
  def learning_rates(config) -> dict:
    """{config field: learning rate} of every optimizer the method trains with (each must be > 0)."""
    return {'optim.lr': config.optim.lr}

  @staticmethod
  def downsampling(config) -> tuple[str, int]:
    """(the config block of the network, its number of 2x downsamplings): image and crop sizes
    must be divisible by 2^levels."""
    raise NotImplementedError

  def optimizer_groups(self) -> tuple[Callable[[Any], Any], dict] | None:
    """None (one optimizer for all params, `config.optim`), or (labels_fn, {label: optim config})
    where labels_fn(params) gives each leaf's label (optax.multi_transform)."""
    return None

  def network_input(self, x: jax.Array) -> jax.Array:
    """What the networks see of images x [B,H,W,C] in [-1, 1]: x, or each image standardized
    (`config.data.normalize`, `sano_jax/intensity.py`). Training (`train.py`: `losses` of
    network_input(batch)) and `field_fn` both go through it."""
    return intensity.standardize(x, self.normalize)

  def field_fn(self, params) -> Callable[[jax.Array], jax.Array]:
    """x [B,H,W,C] in [-1, 1] -> field, params bound: the `score_fn` of `localization.localize`.

    The whole image in one pass, or over blended tiles with `config.localize.tile_size`
    (`sano_jax/tiling.py`); each pass's input goes through `network_input` (a tile is
    standardized on its own, as a training crop is)."""
    return tiling.tiled(lambda x: self.field(params, self.network_input(x)), *self.tile)
