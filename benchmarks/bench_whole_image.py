r"""Whole-image localization of a model trained on crops: one fully convolutional pass vs blended
tiles (`config.localize.tile_size`), img/s and peak memory (not a test).

  PYTHONPATH=. .venv/bin/python benchmarks/bench_whole_image.py --config=configs/demo.py \
      --size=1024 [--tile=64] [--overlap=16] [--batch=1] [--steps=3] [--out=FILE]

The model is the config's (trained on `data.crop_size`, default its image_size); it scores
`--size` x `--size` images with the program `rundir.load_localizer` builds (params and stats
as jit arguments). Run one size/tiling per process: peak RSS is a per-process maximum.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks import bench_localize
from benchmarks import common
from sano_jax import localization, methods, models


def run(config, *, size: int, tile: int | None, overlap: int, batch: int, steps: int) -> dict:
  config.data.crop_size = models.crop_size(config)  # the training crop stays the config's size
  config.data.image_size = size
  config.localize.tile_size, config.localize.tile_overlap = tile, overlap
  method = methods.create(config)
  params = jax.jit(method.init)(jax.random.PRNGKey(0))
  c = config.data.num_channels
  stats = bench_localize.fake_stats((size, size, c), float(config.localize.smoothing_sigma))
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (batch, size, size, c)), jnp.float32)
  lc = config.localize

  @jax.jit
  def localize_with(params, stats, images):
    return localization.localize(method.field_fn(params), images, stats, n_sigma=float(lc.n_sigma),
                                 smoothing_sigma=float(lc.smoothing_sigma),
                                 rule=localization._rule_from_config(lc))  # pylint: disable=protected-access

  compiled, compile_s, _ = common.compile_with_cost(localize_with, params, stats, images)
  timing = common.time_calls(lambda: compiled(params, stats, images), warmup=1, iters=steps)
  return {'bench': 'whole_image', 'machine': common.machine(), 'image_size': size,
          'crop_size': config.data.crop_size, 'tile_size': tile, 'tile_overlap': overlap,
          'batch_size': batch, 'nf': config.model.nf, 'compile_s': compile_s,
          'images_per_s': batch / timing['median_s'], 'ms_per_image': 1e3 * timing['median_s'] / batch,
          'peak_rss_mib': common.peak_rss_mib(), 'device_peak_mib': common.device_peak_mib()}


def main(argv):
  del argv
  result = run(_CONFIG.value, size=_SIZE.value, tile=_TILE.value, overlap=_OVERLAP.value,
               batch=_BATCH.value, steps=_STEPS.value)
  common.print_json(result, _OUT.value)


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
  _SIZE = flags.DEFINE_integer('size', 256, 'Side of the whole images scored.')
  _TILE = flags.DEFINE_integer('tile', None, 'Tile side (None: one fully convolutional pass).')
  _OVERLAP = flags.DEFINE_integer('overlap', 16, 'Tile overlap.')
  _BATCH = flags.DEFINE_integer('batch', 1, 'Images per call.')
  _STEPS = flags.DEFINE_integer('steps', 3, 'Timed calls.')
  _OUT = flags.DEFINE_string('out', None, 'Also append the JSON line to this file.')
  app.run(main)
