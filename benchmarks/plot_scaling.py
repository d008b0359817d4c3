r"""Training and localization images/s vs batch size and vs image size; writes benchmarks/scaling.png.

  PYTHONPATH=. .venv/bin/python benchmarks/plot_scaling.py --config=configs/demo.py --run \
      [--batches=8,16,32,64] [--sizes=32,64,128] [--size_batch=8] [--results=scaling.jsonl]
  PYTHONPATH=. .venv/bin/python benchmarks/plot_scaling.py --results=scaling.jsonl   # plot only

With --run, times `bench_train.run` (the real train step) and `bench_localize.run` (the jitted
localize program, and the bare forward) for each batch size at the config's image size, and for each
image size at --size_batch, appending JSON lines to --results; then plots whatever --results holds
(the latest line of each point).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from benchmarks import bench_train
from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
_PRESET = flags.DEFINE_string('preset', None, 'Shape preset (benchmarks/common.py PRESETS).')
_RUN = flags.DEFINE_bool('run', False, 'Run the sweep (else only plot --results).')
_BATCHES = flags.DEFINE_list('batches', ['8', '16', '32', '64'], 'Batch sizes (config image size).')
_SIZES = flags.DEFINE_list('sizes', ['32', '64', '128'], 'Image sizes (at --size_batch).')
_SIZE_BATCH = flags.DEFINE_integer('size_batch', 8, 'Batch size of the image-size sweep.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per point.')
_RESULTS = flags.DEFINE_string('results', os.path.join(os.path.dirname(__file__),
                                                       'scaling.jsonl'), 'JSON lines file.')
_PNG = flags.DEFINE_string('png', os.path.join(os.path.dirname(__file__), 'scaling.png'),
                           'Output figure.')


def sweep(config, results: str) -> None:
  from benchmarks import bench_localize  # pylint: disable=g-import-not-at-top
  points = [('batch', int(b), config.data.image_size) for b in _BATCHES.value]
  points += [('size', _SIZE_BATCH.value, int(s)) for s in _SIZES.value]
  for axis, batch, size in points:
    cfg = config.copy_and_resolve_references()
    cfg.training.batch_size, cfg.data.image_size = batch, size
    tr = bench_train.run(cfg, mode='step', steps=_STEPS.value, warmup=1)
    lo = bench_localize.run(cfg, batch=batch, steps=_STEPS.value, anoddpm_steps=())
    common.print_json({'bench': 'scaling', 'axis': axis, 'batch_size': batch, 'image_size': size,
                       'nf': cfg.model.nf, 'ch_mult': list(cfg.model.ch_mult),
                       'machine': common.machine(),
                       'train_images_per_s': tr['images_per_s'], 'train_ms': tr['ms_per_step'],
                       'localize_images_per_s': lo['localize_images_per_s'],
                       'forward_images_per_s': lo['forward_images_per_s'],
                       'localize_over_forward': lo['localize_over_forward']}, results)


def plot(results: str, png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = {}
  with open(results) as f:
    for line in f:
      r = json.loads(line)
      if r.get('bench') == 'scaling':
        rows[(r['axis'], r['batch_size'], r['image_size'])] = r  # the latest line wins
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, axis, key, xlabel in ((axes[0], 'batch', 'batch_size', 'batch size'),
                                (axes[1], 'size', 'image_size', 'image size (px)')):
    pts = [r for (a, _, _), r in rows.items() if a == axis]
    if axis == 'size' and pts:  # the batch sweep's point at the size sweep's batch belongs here too
      pts += [r for (a, b, s), r in rows.items() if a == 'batch' and b == pts[0]['batch_size']
              and s not in {p['image_size'] for p in pts}]
    pts = sorted(pts, key=lambda r: r[key])
    if not pts:
      continue
    xs = [r[key] for r in pts]
    for field, label, style in (('train_images_per_s', 'train step', 'o-'),
                                ('localize_images_per_s', 'localize', 's-'),
                                ('forward_images_per_s', 'bare forward', 'x--')):
      ax.plot(xs, [r[field] for r in pts], style, label=label)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel('images / s')
    fixed = (f"{pts[0]['image_size']} px" if axis == 'batch' else f"batch {pts[0]['batch_size']}")
    ax.set_title(f"vs {xlabel} ({fixed}; nf {pts[0]['nf']}, ch_mult {tuple(pts[0]['ch_mult'])})",
                 fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  m = next(iter(rows.values()))['machine'] if rows else {}
  fig.suptitle(f"sano-jax throughput on {m.get('platform', '?')} ({m.get('cpu_count', '?')} cores, "
               f"jax {m.get('jax', '?')})", fontsize=10)
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  print(f'wrote {png}')


def main(argv):
  del argv
  config = _CONFIG.value
  bench_train.apply_preset(config, _PRESET.value)
  if _RUN.value:
    sweep(config, _RESULTS.value)
  plot(_RESULTS.value, _PNG.value)


if __name__ == '__main__':
  app.run(main)
