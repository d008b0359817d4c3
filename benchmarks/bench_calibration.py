r"""The label-free calibration's wall time, first call (tracing and compiling included) and again.

  PYTHONPATH=. .venv/bin/python benchmarks/bench_calibration.py --workdir=RUN [--out=FILE] \
      [--min_synthetic_images=0]
  PYTHONPATH=. .venv/bin/python benchmarks/bench_calibration.py --config=configs/demo.py \
      [--images=64] [--config.data.image_size=64]

With --workdir: `calibration.calibrate` on the run's validation split (its best params), as
`run_eval.py` calls it. Without: `calibration.choose` with the config's model at its initial
params on smooth random images (the time does not depend on what the model learned). The first
call pays for tracing and compiling every candidate's z-map program; the second reuses them (a
later evaluation in the same process). Prints one JSON line: seconds of each call, candidates,
images, peak RSS.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags
from scipy import ndimage

from benchmarks import common
from sano_jax import calibration, checkpointing, input_pipeline, methods


def _smooth_images(n: int, size: int, channels: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  x = ndimage.gaussian_filter(rng.normal(size=(n, size, size, channels)), (0, 2, 2, 0))
  x = (x - x.min()) / (x.max() - x.min())
  return x.astype(np.float32)


def main(argv):
  del argv
  out = {'bench': 'calibration', 'machine': common.machine()}
  if _WORKDIR.value:
    config, _, params, _ = checkpointing.restore_for_inference(_WORKDIR.value)
    if _MIN_SYNTHETIC.value is not None:
      with config.unlocked():
        config.localize.min_synthetic_images = _MIN_SYNTHETIC.value
    method = methods.create_at(config, calibration.T_GRID)
    source = input_pipeline.get_source(config, config.data.validation_split)
    call = lambda: calibration.calibrate(config, method, params, source,
                                         seed=int(config.get('seed', 0)))
    out['workdir'] = _WORKDIR.value
  else:
    config = _CONFIG.value
    method = methods.create_at(config, calibration.T_GRID)
    s, c = config.data.image_size, config.data.num_channels
    params = jax.jit(method.init)(jax.random.PRNGKey(0))
    # A freshly initialized U-Net's output layer is zero (so is its field): jitter every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    images = _smooth_images(_IMAGES.value, s, c)
    call = lambda: calibration.choose(
        method.field_fn(params), method.ts, images, batch_size=int(config.eval.batch_size),
        smoothing_sigma=float(config.localize.smoothing_sigma), seed=0)
    out.update(image_size=s, channels=c, images=_IMAGES.value, nf=config.model.nf)
  for name in ('first_call_s', 'second_call_s'):
    tic = time.perf_counter()
    choice = call()
    out[name] = time.perf_counter() - tic
  out['candidates'] = len(choice['candidates'])
  out['healthy_images'] = choice['synthetic']['num_images']
  out['synthetic_images'] = choice['synthetic']['num_synthetic_images']
  out['peak_rss_mib'] = common.peak_rss_mib()
  out['label'] = _LABEL.value
  common.print_json(out, _OUT.value)


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (else: --config, initial params).')
  _IMAGES = flags.DEFINE_integer('images', 64, 'Healthy images without --workdir.')
  _MIN_SYNTHETIC = flags.DEFINE_integer(
      'min_synthetic_images', None, 'With --workdir: config.localize.min_synthetic_images '
      '(default: the run\'s config, else calibration.MIN_SYNTHETIC).')
  _OUT = flags.DEFINE_string('out', None, 'Also append the JSON line to this file.')
  _LABEL = flags.DEFINE_string('label', '', 'Free-text label copied into the JSON.')
  app.run(main)
