"""The evaluation's healthy passes: the statistics of the method's field on the validation split
(`ScoreStats` / `MultiStats`, SANO §2.2) and the trivial baseline's mean training intensity."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sano_jax import anomaly_maps
from sano_jax import eval_batches
from sano_jax import gather
from sano_jax import localization
from sano_jax import methods as methods_lib
from sano_jax import score_stats
from sano_jax import sharding

MIN_IMAGES_PER_PIXEL = 2  # validation images the per_pixel rule needs (a std per pixel)


def needs_multi_stats(method: methods_lib.Method, config) -> bool:
  """A t-set, or the density rule: MultiStats; else the paper's ScoreStats."""
  rule = localization.rule_from_config(config.localize)
  return len(method.ts) > 1 or rule in localization.DENSITY_RULES


def fit_stats(method: methods_lib.Method, params, config, source, mesh):
  """Streams the healthy `source` through a jitted update of `ScoreStats` (the statistics of the
  method's field: SANO's score, a baseline's residual). Each device keeps the stats of its own rows
  of every batch (no collective); `gather.merge_device_stats` then merges all devices of all
  processes in a
  fixed order, so the result depends on the devices and the per-device batch, not on the hosts."""
  lc = config.localize
  sigma = float(lc.smoothing_sigma)
  if len(source) == 0:
    raise ValueError('cannot fit the score statistics: the healthy validation split '
                     f'({config.data.validation_split!r} of {config.data.dataset!r}) is empty')
  rule = localization.rule_from_config(lc)
  if rule == 'per_pixel' and len(source) < MIN_IMAGES_PER_PIXEL:
    raise ValueError(f'the per_pixel rule estimates a healthy std at every pixel, from the '
                     f'validation images: {config.data.validation_split!r} of '
                     f'{config.data.dataset!r} holds {len(source)}, it needs at least '
                     f'{MIN_IMAGES_PER_PIXEL} (one image gives a std of 0, floored at 1e-12: '
                     "every pixel flagged). Add healthy images or use --config.localize.stats=global.")

  def local(stats, params, images, valid):  # one device: its stats [1, ...] and rows [b, ...]
    one = jax.tree.map(lambda x: x[0], stats)
    one = score_stats.make_stats_step(method.field_fn(params), sigma)(one, images, valid)
    return jax.tree.map(lambda x: x[None], one)

  axis = P(sharding.AXIS)
  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(axis, P(), axis, axis), out_specs=axis))
  h = w = int(config.data.image_size)
  shape = (h, w, int(config.data.num_channels))
  if needs_multi_stats(method, config):
    stats = score_stats.init_multi_stats(
        shape, method.ts, smoothing_sigma=sigma,
        centred_density=bool(config.localize.get('density_centred', False)))
  else:
    stats = score_stats.init_stats(shape, smoothing_sigma=sigma)
  ndev = mesh.devices.size
  stats = jax.device_put(jax.tree.map(lambda x: np.stack([np.asarray(x)] * ndev), stats),
                         NamedSharding(mesh, axis))
  params = sharding.replicate(params, mesh)
  for batch in eval_batches.progress(eval_batches.batches(source, config, mesh), eval_batches.num_batches(source, config),
                         'score stats (validation)'):
    arrays = sharding.shard_batch({'image': eval_batches.unit_images(batch), 'valid': batch['valid']}, mesh)
    stats = step(stats, params, arrays['image'], arrays['valid'])
  stats = gather.merge_device_stats(jax.device_get(stats))
  try:
    stats = score_stats.finalize(stats)
  except ValueError as e:
    raise ValueError(f'cannot fit the score statistics on the validation split: {e}') from e
  std = float(stats.std)
  if not (math.isfinite(std) and std > 0):
    raise ValueError(f'the healthy std of the {method.name!r} field is {std}: the model is constant '
                     '(untrained? a perfect reconstruction?) or produced NaN; cannot normalise the '
                     'anomaly maps')
  return stats


def mean_intensity(config, source, mesh) -> np.ndarray:
  """Per-channel mean intensity in [0, 1] of the (healthy) training split: each image's channel
  sums (float64, on the host) of every process, added in image-index order, / the pixel count."""
  index, sums, pixels = [], [], 0
  for batch in eval_batches.progress(eval_batches.batches(source, config, mesh), eval_batches.num_batches(source, config),
                         'baseline mean (train)'):
    valid = eval_batches.flat(batch['valid'])
    x = eval_batches.flat(eval_batches.unit_images(batch))[valid]
    sums.append(x.reshape(x.shape[0], -1, x.shape[-1]).sum(axis=1, dtype=np.float64))
    index.append(eval_batches.flat(batch['index'])[valid])
    pixels = x.shape[1] * x.shape[2]
  parts = gather.gather_from_processes((np.concatenate(index), np.concatenate(sums)), 'train_mean')
  index, sums = (np.concatenate(a) for a in zip(*parts))
  if index.size == 0:
    raise ValueError('the training split is empty: cannot compute the baseline mean intensity')
  return sums[np.argsort(index, kind='stable')].sum(axis=0) / (index.size * pixels)


def baseline_map(images, mean, smoothing_sigma: float):
  """G_sigma * mean_c |x - mean| for images [B, H, W, C] in [0, 1] (the trivial baseline)."""
  a = jnp.mean(jnp.abs(images - mean), axis=-1)
  return anomaly_maps.gaussian_filter2d(a, smoothing_sigma)
