r"""Localization throughput: SANO's one-pass localize vs a bare model forward vs AnoDDPM (not a test).

  PYTHONPATH=. .venv/bin/python benchmarks/bench_localize.py --config=configs/demo.py \
      [--preset=issue64] [--batch=32] [--steps=10] [--anoddpm_steps=10,50,250] [--out=FILE]

Three jitted programs on the same synthetic images, params (and stats) passed as jit arguments:

  forward    model.apply(params, 2 img - 1, t) -- the bare network, nothing else
  localize   the program `rundir.load_localizer` builds: score = -eps/sigma(t), mean_c |.|,
             gaussian filter (sigma from the config), z = A / std, mask = z > N
  anoddpm_K  `sano_jax.baselines.anoddpm`: noise to t=0.5, K ancestral steps back, smoothed
             mean_c |x - x_rec| (K forward passes)

Prints one JSON line: images/s of each, localize/forward (the post-processing overhead), and
anoddpm_K / localize (SANO's measured single-pass speed-up).
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

from benchmarks import bench_train
from benchmarks import common
from sano_jax import localization, score_stats, models, score, sde as sde_lib
from sano_jax import multiscale
from sano_jax.baselines import anoddpm


def build_localize(model, sde, lc):
  """The jitted function of `rundir.load_localizer` (params and stats as arguments)."""
  @jax.jit
  def localize_with(params, stats, images):
    return localization.localize(
        score.make_score_fn(model, params, sde, multiscale.as_ts(lc.t)[0]), images, stats,
        **localization.settings(lc))
  return localize_with


def fake_stats(image_shape, smoothing_sigma):
  s = score_stats.init_stats(image_shape, smoothing_sigma=smoothing_sigma)
  one = jnp.float32(1.0)
  return s.replace(count=one, m2=one, n_images=one, pixel_m2=jnp.ones_like(s.pixel_m2),
                   map_count=one, map_m2=one)


def run(config, *, batch: int | None = None, steps: int = 10, warmup: int = 1,
        anoddpm_steps=(10, 50, 250), min_seconds: float = 0.0) -> dict:
  model = models.create_model(config)
  sde = sde_lib.from_config(config)
  lc = config.localize
  b = batch or config.training.batch_size
  s, c = config.data.image_size, config.data.num_channels
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, s, s, c)),
                               jnp.ones((1,)))['params']
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (b, s, s, c)).astype(np.float32))
  stats = fake_stats((s, s, c), float(lc.smoothing_sigma))
  out = {'bench': 'localize', 'machine': common.machine(), 'image_size': s, 'channels': c,
         'batch_size': b, 'nf': config.model.nf, 'ch_mult': list(config.model.ch_mult),
         'num_res_blocks': config.model.num_res_blocks}

  t_vec = jnp.full((b,), multiscale.as_ts(lc.t)[0], jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, t_vec, train=False))
  x = 2.0 * images - 1.0
  compiled, out['forward_compile_s'], flops = common.compile_with_cost(forward, params, x)
  out['forward_gflops'] = flops / 1e9 if flops else None
  tf = common.time_calls(lambda: compiled(params, x), warmup=warmup, iters=steps,
                         min_seconds=min_seconds)

  localize = build_localize(model, sde, lc)
  compiled_l, out['localize_compile_s'], _ = common.compile_with_cost(localize, params, stats,
                                                                      images)
  tl = common.time_calls(lambda: compiled_l(params, stats, images), warmup=warmup, iters=steps,
                         min_seconds=min_seconds)
  # Interleave a second round of each, so that drifting machine load hits both alike.
  tf2 = common.time_calls(lambda: compiled(params, x), warmup=0, iters=steps)
  tl2 = common.time_calls(lambda: compiled_l(params, stats, images), warmup=0, iters=steps)
  f_s = min(tf['median_s'], tf2['median_s'])
  l_s = min(tl['median_s'], tl2['median_s'])
  out.update(forward_images_per_s=b / f_s, localize_images_per_s=b / l_s,
             forward_ms=1e3 * f_s, localize_ms=1e3 * l_s, localize_over_forward=l_s / f_s)

  rng = jax.random.PRNGKey(0)
  for k in anoddpm_steps:
    fn = anoddpm.make_localizer(model, sde, num_steps=int(k),
                                smoothing_sigma=float(lc.smoothing_sigma))
    compiled_a, _, _ = common.compile_with_cost(fn, params, images, rng)
    # AOT-compiled: the first call compiles nothing. K forward passes per call: few calls suffice.
    ta = common.time_calls(lambda: compiled_a(params, images, rng), warmup=0,
                           iters=max(1, min(steps, 3 if k <= 10 else 1)))
    out[f'anoddpm_{k}_images_per_s'] = b / ta['median_s']
    out[f'anoddpm_{k}_over_localize'] = ta['median_s'] / l_s
  out['peak_rss_mib'] = common.peak_rss_mib()
  out['device_peak_mib'] = common.device_peak_mib()
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  bench_train.apply_preset(config, _PRESET.value)
  result = run(config, batch=_BATCH.value, steps=_STEPS.value, warmup=_WARMUP.value,
               anoddpm_steps=[int(k) for k in _ANODDPM.value],
               min_seconds=_MIN_SECONDS.value)
  result['label'] = _LABEL.value
  result['preset'] = _PRESET.value
  common.print_json(result, _OUT.value)


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
  _PRESET = flags.DEFINE_string('preset', None, 'Shape preset (benchmarks/common.py PRESETS).')
  _BATCH = flags.DEFINE_integer('batch', None, 'Batch size (default: training.batch_size).')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls.')
  _WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls after compilation.')
  _MIN_SECONDS = flags.DEFINE_float('min_seconds', 0.0, 'Keep timing until this many seconds.')
  _ANODDPM = flags.DEFINE_list('anoddpm_steps', ['10', '50', '250'], 'AnoDDPM K values ([] none).')
  _OUT = flags.DEFINE_string('out', None, 'Also append the JSON line to this file.')
  _LABEL = flags.DEFINE_string('label', '', 'Free-text label copied into the JSON.')
  app.run(main)
