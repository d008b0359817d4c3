"""Input pipeline throughput at 256 px (not a test).

  python benchmarks/bench_input_pipeline.py [--num_images=400] [--batch_size=64] [--steps=30]
      [--worker_count=0] [--workdir=/tmp/sano_bench]

Generates a folder of fake 256x256 RGB photos (smooth shapes + noise, PNG-compressible like real
photos), builds it with the folder builder (array_record, PNG-encoded images) and times
``train_iterator`` (decode + normalize to [-1, 1] + batch) and ``eval_iterator``. Prints JSON.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from configs import folder as folder_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from sano_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top,wrong-import-position


def _fake_images(folder, n, size, seed=0):
  from PIL import Image, ImageDraw, ImageFilter  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    img = Image.new('RGB', (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
      x0, y0 = rng.integers(0, size // 2, 2)
      w, h = rng.integers(size // 4, size // 2, 2)
      x1, y1 = x0 + w, y0 + h
      draw.ellipse([int(x0), int(y0), int(x1), int(y1)],
                   fill=tuple(int(v) for v in rng.integers(60, 230, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img, np.int16) + rng.normal(0, 4, (size, size, 3)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'img_{i:05d}.png'))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--num_images', type=int, default=400)
  parser.add_argument('--image_size', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--worker_count', type=int, default=0)
  parser.add_argument('--workdir', default=None)
  args = parser.parse_args()

  workdir = args.workdir or tempfile.mkdtemp(prefix='sano_bench_')
  normal = os.path.join(workdir, f'normal_{args.num_images}_{args.image_size}')
  if not os.path.isdir(normal):
    t0 = time.perf_counter()
    _fake_images(normal + '.tmp', args.num_images, args.image_size)
    os.rename(normal + '.tmp', normal)
    print(f'generated {args.num_images} images in {time.perf_counter() - t0:.1f}s',
          file=sys.stderr)
  config = folder_config.get_config(str(args.image_size))
  config.data.normal_dir = normal
  config.data.data_dir = os.path.join(workdir, 'tfds')

  t0 = time.perf_counter()
  source = ip.get_source(config, 'train')
  build_s = time.perf_counter() - t0

  it = ip.train_iterator(source, global_batch_size=args.batch_size, seed=0, num_local_devices=1,
                         worker_count=args.worker_count)
  next(it)  # warm-up (threads / worker processes start)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    batch = next(it)
  train_s = time.perf_counter() - t0
  if hasattr(it, 'close'):
    it.close()

  t0 = time.perf_counter()
  n_eval = 0
  for b in ip.eval_iterator(source, global_batch_size=args.batch_size, num_local_devices=1):
    n_eval += int(b['valid'].sum())
  eval_s = time.perf_counter() - t0

  print(json.dumps({
      'images_per_s': round(args.steps * args.batch_size / train_s, 1),
      'eval_images_per_s': round(n_eval / eval_s, 1),
      'image_size': args.image_size,
      'batch_size': args.batch_size,
      'steps': args.steps,
      'worker_count': args.worker_count,
      'train_examples': len(source),
      'batch_shape': list(batch['image'].shape),
      'build_or_load_s': round(build_s, 2),
      'cpu_count': os.cpu_count(),
  }))
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  main()
