"""The evaluation run (SANO §3.3, Table 1, Fig. 1): calibrate, score the test split, report.

`evaluate(config, workdir)`, the same for every method (`config.method`, `sano_jax.methods`):
  1. restores the best checkpoint of WORKDIR (EMA params if config.localize.use_ema);
  2. fits the healthy `ScoreStats` of the method's field (SANO's score, a baseline's residual
     x - x_hat) on the validation split (streaming, jitted batches, padding masked
     by 'valid') and writes them with the settings used and the checkpoint step as the run's
     inference bundle (`sano_jax.rundir`), so that `load_localizer(workdir)` works after;
  3. scores the test split in jitted batches (data-parallel over the local devices: the batch is
     sharded over a 1-D mesh and jit partitions the forward pass) into z-maps, and streams them into
     a `PixelMetricsAccumulator` (exact while the test set has at most config.eval.exact_max_pixels
     pixels; above, a first `StreamingRange` pass fixes the histogram range and a second pass fills
     the per-subject histograms, so memory stays bounded);
  4. scores a trivial baseline on the same pass: G_sigma * mean_c |x - mean training intensity|;
  5. with config.eval.group_by, evaluates each group of test images (an attribute's value) on its
     own, one accumulator per value on the same pass (`sano_jax.groups`: metrics.json's `groups`);
  6. writes WORKDIR/eval/metrics.json, Fig. 1-style grids in WORKDIR/eval/figures/, the ROC and PR
     curves and the z histogram (`sano_jax.curves`: figures/{roc,pr,z_histogram}.png and their
     points in WORKDIR/eval/curves.npz), a bar chart per group attribute
     (figures/groups_{attribute}.png), and TensorBoard summaries of all of it in
     WORKDIR/eval/tensorboard at the evaluated checkpoint's step (`tensorboard --logdir=WORKDIR`
     shows training and evaluation together).

Several processes (`run_eval.py --distributed`, every host of a slice): each process scores its
share of every split (rows [p*b, (p+1)*b) of each global batch, b = eval.batch_size / processes) on
its own devices with no collective in the loop; the healthy statistics, the baseline mean, the
histogram range and the metric accumulators are then gathered (`sano_jax.gather`) and merged
in an order fixed by the images' global indices and the global device order, so that the numbers
do not depend on which process saw which image (2 processes x 2 devices give the metrics of 1 x 4).
Process 0 alone writes; the others wait for it at a barrier. The label-free calibration (small: at
most 512 validation images) runs whole on every process and process 0's choice is used by all.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sano_jax import accumulator
from sano_jax import calibration
from sano_jax import checkpointing
from sano_jax import distributed
from sano_jax import eval_batches
from sano_jax import files
from sano_jax import gather
from sano_jax import groups as groups_lib
from sano_jax import healthy
from sano_jax import image_checks
from sano_jax import localization
from sano_jax import methods as methods_lib
from sano_jax import metrics as metrics_lib
from sano_jax import report
from sano_jax import rundir
from sano_jax import score_stats
from sano_jax import sharding

# ---------------------------------------------------------------------------------------------
# Set-up.


def _check_workdir(workdir: str) -> None:
  if not files.isdir(workdir):  # local or gs://
    raise FileNotFoundError(f'workdir {workdir!r} does not exist: train first with '
                            f'run_train.py --config=... --workdir={workdir}')
  checkpointing.require_checkpoint(workdir)


# ---------------------------------------------------------------------------------------------
# Figures.


def _figure_rows(picks, source, config, mesh, zmaps) -> list[tuple]:
  """Reads the picked test images again and scores them with `zmaps` (sharded images -> z), the
  pass's own compiled step, padded to one process's share of an evaluation batch."""
  if not picks:
    return []
  rows = []
  bs = int(config.eval.batch_size) // jax.process_count()
  ndev = mesh.devices.size
  for start in range(0, len(picks), bs):
    exs = [source[i] for i in picks[start:start + bs]]
    images = np.zeros((bs,) + exs[0]['image'].shape, np.float32)
    images[:len(exs)] = image_checks.to_unit(np.stack([ex['image'] for ex in exs]))
    x = sharding.shard_batch({'image': images.reshape((ndev, bs // ndev) + images.shape[1:])},
                             mesh)['image']
    z = np.asarray(zmaps(x)).reshape((bs,) + images.shape[1:3])
    for j, (i, ex) in enumerate(zip(picks[start:start + bs], exs)):
      mask = ex['mask'][..., 0]
      rows.append((int((mask > 0).sum()), -i, str(ex['name']), images[j], mask, z[j]))
  return rows


# ---------------------------------------------------------------------------------------------
# The run.


def _make_accumulators(config, n_pixels: int, thresholds, score_range, baseline: bool):
  """(make, baseline accumulator or None): `make()` is a fresh accumulator of z-maps with the
  evaluation's settings (exact while the test set has <= exact_max_pixels pixels, else binned
  over score_range), for the whole set and for each group alike."""
  exact_max = int(config.eval.get('exact_max_pixels', 0))
  exact = n_pixels <= exact_max
  num_bins = int(config.eval.num_bins)
  kw = dict(exact_max_pixels=exact_max) if exact else {}
  make = functools.partial(accumulator.PixelMetricsAccumulator, num_bins,
                           score_range if score_range else (0.0, 1.0), thresholds, **kw)
  base = None
  if baseline:  # |x - mean| lies in [0, 1]; the baseline needs no range pass.
    base = accumulator.PixelMetricsAccumulator(num_bins, (0.0, 1.0 + 1e-6), (), **kw)
  return make, base


class _Scored(NamedTuple):
  """The test split's pass, merged over the processes: the accumulators and the counts."""
  acc: Any
  base_acc: Any
  grouped: Any
  fig_set: Any
  device_s: float
  timed_images: int
  n_anomalous: int
  n_valid: int
  pass_s: float
  passes: int


def calibrated(config, params, val_source):
  """(config with the label-free choice applied, the choice), or (config, None) without
  localize.calibrate. Every process calibrates; all use process 0's choice."""
  if not config.localize.get('calibrate', False):
    return config, None
  choice = calibration.calibrate(config, methods_lib.create_at(config, calibration.T_GRID),
                                 params, val_source, seed=int(config.get('seed', 0)))
  choice = gather.gather_from_processes(choice, 'calibration')[0]  # all use process 0's
  config = calibration.apply(config, choice)
  logging.info('calibrated on %d synthetic anomalies in %.1f s: t=%s rule=%s sigma=%g N=%.3g',
               choice['synthetic']['num_synthetic_images'], choice['seconds'], choice['t'],
               choice['rule'], float(config.localize.smoothing_sigma), choice['n_sigma'])
  return config, choice


def score_test_split(config, test_source, mesh, zmaps_and_baseline, *, n_threshold: float,
                     lookup, baseline: bool) -> _Scored | None:
  """Scores the test split in batches into the metric accumulators (a first pass fixes the
  histogram range when the split is too large for the exact path), gathers them from every
  process and merges them; None on processes other than 0 (after the merge they have no use)."""
  ec = config.eval
  h = w = int(config.data.image_size)
  n_pixels = len(test_source) * h * w
  exact = n_pixels <= int(ec.get('exact_max_pixels', 0))
  n_batches = eval_batches.num_batches(test_source, config)

  def scored(desc):
    """Yields (host batch, z [N,H,W], baseline [N,H,W] or None, device seconds) per batch."""
    carried = lookup.carried if lookup is not None else ()
    batches = eval_batches.batches(test_source, config, mesh, carried)
    for batch in eval_batches.progress(batches, n_batches, desc):
      images = sharding.shard_batch({'image': eval_batches.unit_images(batch)}, mesh)['image']
      tic = time.perf_counter()
      z, base = zmaps_and_baseline(images)
      z = np.asarray(z)
      base = None if base is None else np.asarray(base)
      yield batch, z, base, time.perf_counter() - tic

  score_range = None
  passes = 1
  if not exact:  # a first pass fixes the histogram range of the z-maps
    rng = metrics_lib.StreamingRange()
    for batch, z, _, _ in scored('test range pass'):
      rng.add(z, eval_batches.flat(batch['valid']))
    lo, hi = metrics_lib.StreamingRange.merge(gather.gather_from_processes(rng, 'test_range')).range
    score_range = (min(lo, 0.0), max(hi, n_threshold * 1.01))
    passes = 2
  make_acc, base_acc = _make_accumulators(config, n_pixels, (n_threshold,), score_range, baseline)
  acc = make_acc()
  grouped = None if lookup is None else groups_lib.GroupedMetrics(lookup.attributes, make_acc)
  fig_set = report.FigureSet(int(ec.get('num_figures', 8)))
  device_s, timed_images, n_anomalous, n_valid = 0.0, 0, 0, 0
  tic_pass = time.perf_counter()
  for b, (batch, z, base, dt) in enumerate(scored('test')):
    valid = eval_batches.flat(batch['valid'])
    masks = eval_batches.flat(batch['mask'])[..., 0]
    subjects = eval_batches.flat(batch['subject'])
    index = eval_batches.flat(batch['index'])
    acc.add(z, masks, subjects, valid, indices=index)
    if base_acc is not None:
      base_acc.add(base, masks, subjects, valid, indices=index)
    if b > 0 or n_batches == 1:  # the first call compiles: keep it out of images/s if we can
      device_s += dt
      timed_images += int(valid.sum())
    n_valid += int(valid.sum())
    n_anomalous += int((masks[valid].reshape(int(valid.sum()), -1).any(axis=1)).sum())
    fig_set.add(masks, index, valid)
    if grouped is not None:
      flat = {k: eval_batches.flat(batch[k]) for k in lookup.carried + ('name',)}
      grouped.add(z, masks, subjects, valid, lookup.values(flat), indices=index)
  pass_s = time.perf_counter() - tic_pass
  parts = gather.gather_from_processes(
      (acc, base_acc, grouped, fig_set, (device_s, timed_images, n_anomalous, n_valid)), 'test')
  if jax.process_index() != 0:
    return None
  if len(parts) > 1:  # one accumulator of each kind over all processes' images
    acc = accumulator.PixelMetricsAccumulator.merge([p[0] for p in parts])
    if base_acc is not None:
      base_acc = accumulator.PixelMetricsAccumulator.merge([p[1] for p in parts])
    if grouped is not None:
      grouped = groups_lib.GroupedMetrics.merge([p[2] for p in parts])
    fig_set = report.FigureSet.merge([p[3] for p in parts])
    counts = np.array([p[4] for p in parts])
    device_s = float(counts[:, 0].max())  # the processes score at the same time
    timed_images, n_anomalous, n_valid = (int(c) for c in counts[:, 1:].sum(axis=0))
  return _Scored(acc, base_acc, grouped, fig_set, device_s, timed_images, n_anomalous, n_valid,
                 pass_s, passes)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, *, train_source=None,
             val_source=None, test_source=None) -> dict:
  """Evaluates the best checkpoint in `workdir`; returns (and writes) the metrics.json dict.

  config: the evaluation config (None: the run's WORKDIR/config.json). Its model fields must match
  the checkpoint; data/localize/eval fields may differ. Sources default to
  `input_pipeline.get_source(config, split)`; tests may pass in-memory lists of contract dicts.
  With several processes (module docstring) every process calls it alike; process 0 writes and
  returns the dict, the others return None once it has written.

  Stages: calibrate (`calibrated`) -> fit the healthy statistics and write the inference bundle ->
  the baseline's mean -> score the test split (`score_test_split`) -> metrics -> the report
  (`sano_jax.report`).
  """
  from sano_jax import input_pipeline
  _check_workdir(workdir)
  chief = jax.process_index() == 0
  if config is None:
    config = checkpointing.load_config(workdir)
  checkpointing.check_same_model(config, workdir)
  ec = config.eval
  t_start = time.perf_counter()

  mesh = eval_batches.eval_mesh(config)
  # Orbax's restore may run a cross-process collective: meet first (gloo's 30 s to join one).
  distributed.barrier('sano_eval_start')
  _, method, params, step = checkpointing.restore_for_inference(
      workdir, ema=bool(config.localize.use_ema), config=config)
  val_source = val_source if val_source is not None else input_pipeline.get_source(
      config, config.data.validation_split)
  test_source = test_source if test_source is not None else input_pipeline.get_source(
      config, config.data.test_split)
  if len(test_source) == 0:
    raise ValueError(f'the test split {config.data.test_split!r} is empty: nothing to evaluate')
  lookup = groups_lib.resolve(config, test_source)  # an unknown attribute fails before any work

  # 0. Label-free calibration of t, rule and N (healthy validation images only).
  config, choice = calibrated(config, params, val_source)
  if choice is not None:
    method = methods_lib.create(config)
  lc = config.localize
  loc = localization.settings(lc)  # the config's settings, or the calibration's applied to it
  rule, n_sigma, sigma, target_fpr = (loc['rule'], loc['n_sigma'], loc['smoothing_sigma'],
                                      loc['target_fpr'])
  num_devices = mesh.devices.size * jax.process_count()
  logging.info('evaluating %s (%s) on %d device(s) in %d process(es), rule=%s, t=%s', workdir,
               method.name, num_devices, jax.process_count(), rule, method.ts)

  # 1. Healthy statistics on the validation images, saved with their settings and checkpoint step.
  tic = time.perf_counter()
  stats = healthy.fit_stats(method, params, config, val_source, mesh)
  stats_seconds = time.perf_counter() - tic
  if chief:
    bundle = rundir.save(workdir, config=config, stats=stats, step=step, calibration=choice)
  logging.info('healthy score std %.4g over %d validation images', float(stats.std),
               int(stats.n_images))

  # 2. The baseline's mean training intensity.
  do_baseline = bool(ec.get('baseline', True))
  mean = None
  if do_baseline:
    train_source = train_source if train_source is not None else input_pipeline.get_source(
        config, config.data.train_split)
    mean = healthy.mean_intensity(config, train_source, mesh)

  # 3. Scoring the test split.
  n_threshold = n_sigma
  if rule == 'quantile':  # the rule's mask is A > q = (z = A / std) > q / std
    n_threshold = float(stats.quantile(1.0 - target_fpr) / stats.std)

  @jax.jit
  def score_step(params, stats, images, mean):
    z, _ = localization.localize(method.field_fn(params), images, stats, **loc)
    base = healthy.baseline_map(images, mean, sigma) if mean is not None else None
    return z, base

  params_d = sharding.replicate(params, mesh)
  stats_d = sharding.replicate(score_stats.whitened(stats), mesh)
  mean_d = None if mean is None else jnp.asarray(mean, jnp.float32)
  zmaps_and_baseline = lambda x: score_step(params_d, stats_d, x, mean_d)
  scored = score_test_split(config, test_source, mesh, zmaps_and_baseline,
                            n_threshold=n_threshold, lookup=lookup, baseline=do_baseline)
  if not chief:  # process 0 reports; the others wait until it has written
    distributed.barrier('sano_eval_written')
    return None

  # 4. Metrics.
  runs, seed = int(ec.bootstrap_runs), int(config.get('seed', 0))
  out = scored.acc.compute(bootstrap_runs=runs, seed=seed)
  out['n_sigma']['n'] = n_sigma
  if scored.grouped is not None:
    out['groups'] = scored.grouped.compute(runs, seed, n_sigma=n_sigma)
  base_metrics = None
  if scored.base_acc is not None:
    bm = scored.base_acc.compute(bootstrap_runs=0)
    base_metrics = {'auroc': bm['auroc'], 'auprc': bm['auprc'], 'aupro': bm['aupro'],
                    'dice_at_op': bm['operating_point']['dice'],
                    'mean_intensity': [float(v) for v in mean],
                    'map': 'gaussian(mean_c |x - mean training intensity|)'}
  out.update(
      baseline=base_metrics,
      num_anomalous_images=scored.n_anomalous,
      num_healthy_images=scored.n_valid - scored.n_anomalous,
      localization={'method': method.name, 't': list(method.ts), 'rule': rule, 'n_sigma': n_sigma,
                    'n_sigma_threshold': n_threshold, 'smoothing_sigma': sigma,
                    'use_ema': bool(lc.use_ema), 'target_fpr': target_fpr},
      checkpoint_step=step,
      score_stats={'path': os.path.join(workdir, bundle['parts']['stats']['file']),
                   'std': float(stats.std), 'num_images': int(stats.n_images)},
      calibration=choice,
      data={'dataset': str(config.data.dataset), 'test_split': str(config.data.test_split),
            'validation_split': str(config.data.validation_split),
            'image_size': int(config.data.image_size),
            'num_channels': int(config.data.num_channels)},
      timing={'images_per_s': (scored.timed_images / scored.device_s if scored.device_s > 0
                               else None),
              'end_to_end_images_per_s': (scored.n_valid / scored.pass_s if scored.pass_s > 0
                                          else None),
              'score_stats_seconds': stats_seconds, 'test_passes': scored.passes,
              'total_seconds': None, 'num_devices': int(num_devices),
              'num_processes': int(jax.process_count()), 'batch_size': int(ec.batch_size)},
  )

  # 5. Figures, curves, TensorBoard and metrics.json.
  rows = _figure_rows(scored.fig_set.picks(), test_source, config, mesh,
                      lambda x: zmaps_and_baseline(x)[0])
  out = report.write_report(out, rows, scored.acc, os.path.join(workdir, 'eval'), step=step,
                            n_threshold=n_threshold,
                            title=f'({method.name}, {config.data.dataset})')
  out['timing']['total_seconds'] = time.perf_counter() - t_start
  path = os.path.join(workdir, 'eval', 'metrics.json')
  files.atomic_write_json(path, out)  # local or gs://; never half written
  num = lambda v: math.nan if v is None else v  # JSON null (undefined) -> nan; 0.0 stays 0.0
  logging.info('AUROC %.4f AUPRC %.4f AUPRO %.4f | OP dice %.4f iou %.4f | N=%g dice %.4f | '
               'baseline AUROC %s', num(out['auroc']), num(out['auprc']), num(out['aupro']),
               num(out['operating_point']['dice']),
               num(out['operating_point']['iou']), n_sigma, num(out['n_sigma']['dice']),
               None if base_metrics is None else out['baseline']['auroc'])
  logging.info('wrote %s', path)
  distributed.barrier('sano_eval_written')
  return out
