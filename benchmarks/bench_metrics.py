"""Streams a synthetic paper-scale evaluation through PixelMetricsAccumulator (not a test).

Default: 3200 images of 256x256 (~210M pixels) in batches of 32, 190 subjects, 2^16 bins,
50 subject-bootstrap runs. Prints JSON with wall times and peak RSS.

    .venv/bin/python benchmarks/bench_metrics.py [--images 3200 --size 256 --subjects 190]
"""
import argparse
import json
import resource
import sys
import time

import numpy as np

from sano_jax import accumulator


def _peak_rss_mib() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r / 2**20 if sys.platform == 'darwin' else r / 2**10  # bytes on macOS, KiB on Linux


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--images', type=int, default=3200)
  ap.add_argument('--size', type=int, default=256)
  ap.add_argument('--subjects', type=int, default=190)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--num_bins', type=int, default=2**16)
  ap.add_argument('--runs', type=int, default=50)
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()

  rng = np.random.default_rng(args.seed)
  subject_of = np.sort(rng.integers(0, args.subjects, args.images))  # images grouped by subject
  acc = accumulator.PixelMetricsAccumulator(args.num_bins, (0.0, 20.0), thresholds=(3.0,))
  yy, xx = np.mgrid[:args.size, :args.size]
  t_gen = t_add = 0.0
  rss_start = _peak_rss_mib()
  for a in range(0, args.images, args.batch):
    t0 = time.perf_counter()
    b = min(args.batch, args.images - a)
    # z-map-like scores: half-normal background, a disc of raised scores where the "jewel" is.
    cy, cx, r = (rng.uniform(0.2, 0.8, (3, b, 1, 1)) * [[[[args.size]]], [[[args.size]]],
                                                       [[[args.size / 8]]]])
    labels = (yy - cy)**2 + (xx - cx)**2 < r**2
    scores = np.abs(rng.standard_normal((b, args.size, args.size), np.float32))
    scores += labels * rng.uniform(0.5, 4.0, (b, 1, 1)).astype(np.float32)
    subjects = np.array([f'{s:07d}' for s in subject_of[a:a + b]])
    t1 = time.perf_counter()
    acc.add(scores, labels, subjects, np.ones(b, bool))
    t_add += time.perf_counter() - t1
    t_gen += t1 - t0
  t0 = time.perf_counter()
  out = acc.compute(bootstrap_runs=args.runs, seed=args.seed)
  t_compute = time.perf_counter() - t0
  print(json.dumps(dict(
      images=out['num_images'], subjects=out['num_subjects'], pixels=out['num_pixels'],
      num_bins=args.num_bins, bootstrap_runs=args.runs,
      add_seconds=round(t_add, 2), add_mpixels_per_s=round(out['num_pixels'] / t_add / 1e6, 1),
      compute_seconds=round(t_compute, 2), synth_seconds=round(t_gen, 2),
      peak_rss_mib=round(_peak_rss_mib(), 1), rss_before_stream_mib=round(rss_start, 1),
      auroc=round(out['auroc'], 4), auroc_std=round(out['auroc_std'], 4),
      auprc=round(out['auprc'], 4), auprc_std=round(out['auprc_std'], 4),
      op_dice=round(out['operating_point']['dice'], 4),
      n_sigma_dice=round(out['n_sigma']['dice'], 4)), indent=1))


if __name__ == '__main__':
  main()
