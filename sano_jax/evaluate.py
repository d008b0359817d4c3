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
histogram range and the metric accumulators are then gathered (`gather_from_processes`) and merged
in an order fixed by the images' global indices and the global device order, so that the numbers
do not depend on which process saw which image (2 processes x 2 devices give the metrics of 1 x 4).
Process 0 alone writes; the others wait for it at a barrier. The label-free calibration (small: at
most 512 validation images) runs whole on every process and process 0's choice is used by all.
"""
from __future__ import annotations

import functools
import math
import os
import pickle
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sano_jax import calibration
from sano_jax import checkpointing
from sano_jax import curves
from sano_jax import distributed
from sano_jax import files
from sano_jax import groups as groups_lib
from sano_jax import localization
from sano_jax import metrics as metrics_lib
from sano_jax import methods as methods_lib
from sano_jax import rundir
from sano_jax import sharding

MIN_IMAGES_PER_PIXEL = 2  # validation images the per_pixel rule needs (a std per pixel)


# ---------------------------------------------------------------------------------------------
# Set-up.


def _check_workdir(workdir: str) -> None:
  if not files.isdir(workdir):  # local or gs://
    raise FileNotFoundError(f'workdir {workdir!r} does not exist: train first with '
                            f'run_train.py --config=... --workdir={workdir}')
  checkpointing.require_checkpoint(workdir)


def eval_mesh(config):
  """The mesh of this process's devices that score its share of each evaluation batch: as many
  local devices as divide eval.batch_size / the number of processes."""
  bs, n = int(config.eval.batch_size), jax.process_count()
  if bs % n:
    raise ValueError(f'eval.batch_size={bs} is not divisible by the {n} processes: set '
                     f'--config.eval.batch_size to a multiple of {n}')
  return sharding.local_mesh_for(bs // n)


def _batches(source, config, mesh, extra_keys=()) -> Iterator[dict]:
  """This process's share of each global evaluation batch (`input_pipeline.eval_iterator`)."""
  from sano_jax import input_pipeline
  return input_pipeline.eval_iterator(source, global_batch_size=int(config.eval.batch_size),
                                      num_local_devices=mesh.devices.size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count(), dtype=np.float32,
                                      extra_keys=extra_keys)


def gather_from_processes(obj, name: str) -> list:
  """[process 0's obj, process 1's obj, ...] on every process ([obj] in one process): pickled,
  padded to the longest and exchanged by `multihost_utils.process_allgather` (bytes, so float64 and
  int64 survive whatever jax_enable_x64 says). Every process calls it with the same names in the
  same order. They meet first at the coordination service (`distributed.barrier`, a long limit):
  gloo, the CPU collectives, gives a process only 30 s to join a collective."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  distributed.barrier(f'sano_eval_{name}')
  blob = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  if blob.size >= 2**31:
    raise ValueError(f'{name}: {blob.size} bytes to gather from one process (at most 2**31 - 1)')
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32),
                                                       tiled=True))
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(blobs[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def _pairwise(items: list, merge):
  """items merged by a fixed tree, adjacent pairs level by level: ((x0 x1) (x2 x3)) ... (an odd
  last one moves up a level). An aligned block of 2^k items is one subtree of it."""
  while len(items) > 1:
    items = [merge(*items[i:i + 2]) if i + 1 < len(items) else items[i]
             for i in range(0, len(items), 2)]
  return items[0]


def merge_device_stats(per_device, name: str = 'score_stats'):
  """This process's per-device stats (leaves [local devices, ...]) -> the stats of every device of
  every process, merged (`localization.merge_stats`) by `_pairwise` over the global device order;
  a power-of-two number of local devices merges its own subtree before the gather."""
  n = jax.tree.leaves(per_device)[0].shape[0]
  devices = [jax.tree.map(lambda x, i=i: x[i], per_device) for i in range(n)]
  if n & (n - 1) == 0:
    devices = [_pairwise(devices, localization.merge_stats)]
  parts = gather_from_processes(devices, name)
  return jax.device_get(_pairwise([d for part in parts for d in part], localization.merge_stats))


def _unit_images(batch) -> np.ndarray:
  """eval_iterator's [-1, 1] images [ndev, b, H, W, C] -> [0, 1] images [ndev, b, H, W, C]."""
  return np.clip((batch['image'] + np.float32(1.0)) * np.float32(0.5), 0.0, 1.0)


def _flat(x) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[2:])


def _progress(iterable, total: int, desc: str):
  import tqdm
  return tqdm.tqdm(iterable, total=total, desc=desc, unit='batch', dynamic_ncols=True,
                   mininterval=1.0, disable=jax.process_index() != 0)


def _num_batches(source, config) -> int:
  return -(-len(source) // int(config.eval.batch_size))


def _json_safe(x):
  """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


# ---------------------------------------------------------------------------------------------
# Calibration: the healthy score statistics.


def needs_multi_stats(method: methods_lib.Method, config) -> bool:
  """A t-set, or the density rule: MultiStats; else the paper's ScoreStats."""
  rule = localization.rule_from_config(config.localize)
  return len(method.ts) > 1 or rule in localization.DENSITY_RULES


def fit_stats(method: methods_lib.Method, params, config, source, mesh):
  """Streams the healthy `source` through a jitted update of `ScoreStats` (the statistics of the
  method's field: SANO's score, a baseline's residual). Each device keeps the stats of its own rows
  of every batch (no collective); `merge_device_stats` then merges all devices of all processes in a
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
    one = localization.make_stats_step(method.field_fn(params), sigma)(one, images, valid)
    return jax.tree.map(lambda x: x[None], one)

  axis = P(sharding.AXIS)
  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(axis, P(), axis, axis), out_specs=axis))
  h = w = int(config.data.image_size)
  shape = (h, w, int(config.data.num_channels))
  if needs_multi_stats(method, config):
    stats = localization.init_multi_stats(shape, method.ts, smoothing_sigma=sigma)
  else:
    stats = localization.init_stats(shape, smoothing_sigma=sigma)
  ndev = mesh.devices.size
  stats = jax.device_put(jax.tree.map(lambda x: np.stack([np.asarray(x)] * ndev), stats),
                         NamedSharding(mesh, axis))
  params = sharding.replicate(params, mesh)
  for batch in _progress(_batches(source, config, mesh), _num_batches(source, config),
                         'score stats (validation)'):
    arrays = sharding.shard_batch({'image': _unit_images(batch), 'valid': batch['valid']}, mesh)
    stats = step(stats, params, arrays['image'], arrays['valid'])
  stats = merge_device_stats(jax.device_get(stats))
  try:
    stats = localization.finalize(stats)
  except ValueError as e:
    raise ValueError(f'cannot fit the score statistics on the validation split: {e}') from e
  std = float(stats.std)
  if not (math.isfinite(std) and std > 0):
    raise ValueError(f'the healthy std of the {method.name!r} field is {std}: the model is constant '
                     '(untrained? a perfect reconstruction?) or produced NaN; cannot normalise the '
                     'anomaly maps')
  return stats


# ---------------------------------------------------------------------------------------------
# The trivial baseline.


def mean_intensity(config, source, mesh) -> np.ndarray:
  """Per-channel mean intensity in [0, 1] of the (healthy) training split: each image's channel
  sums (float64, on the host) of every process, added in image-index order, / the pixel count."""
  index, sums, pixels = [], [], 0
  for batch in _progress(_batches(source, config, mesh), _num_batches(source, config),
                         'baseline mean (train)'):
    valid = _flat(batch['valid'])
    x = _flat(_unit_images(batch))[valid]
    sums.append(x.reshape(x.shape[0], -1, x.shape[-1]).sum(axis=1, dtype=np.float64))
    index.append(_flat(batch['index'])[valid])
    pixels = x.shape[1] * x.shape[2]
  parts = gather_from_processes((np.concatenate(index), np.concatenate(sums)), 'train_mean')
  index, sums = (np.concatenate(a) for a in zip(*parts))
  if index.size == 0:
    raise ValueError('the training split is empty: cannot compute the baseline mean intensity')
  return sums[np.argsort(index, kind='stable')].sum(axis=0) / (index.size * pixels)


def baseline_map(images, mean, smoothing_sigma: float):
  """G_sigma * mean_c |x - mean| for images [B, H, W, C] in [0, 1] (the trivial baseline)."""
  a = jnp.mean(jnp.abs(images - mean), axis=-1)
  return localization.gaussian_filter2d(a, smoothing_sigma)


# ---------------------------------------------------------------------------------------------
# Figures.


def pick_rows(sizes: np.ndarray, k: int) -> list[int]:
  """Indices of the `k` test images shown in the figures, fair to the whole test set: anomalous
  images at evenly spaced ranks of the anomaly size (largest, ..., median, ..., smallest) and about
  a quarter healthy ones (at least one when there are any)."""
  sizes = np.asarray(sizes)
  anomalous, healthy = np.flatnonzero(sizes > 0), np.flatnonzero(sizes == 0)
  if k <= 0:
    return []
  n_h = min(len(healthy), max(1, k // 4) if len(anomalous) else k)
  n_a = min(len(anomalous), k - n_h)
  order = anomalous[np.argsort(-sizes[anomalous], kind='stable')]
  ranks = np.unique(np.linspace(0, len(order) - 1, n_a).round().astype(int)) if n_a else []
  spread = np.unique(np.linspace(0, len(healthy) - 1, n_h).round().astype(int)) if n_h else []
  return [int(order[r]) for r in ranks] + [int(healthy[r]) for r in spread]


class _FigureSet:
  """The figure rows: `pick_rows` over the whole test set (sizes recorded during the pass, the
  chosen images read again and scored after it), so memory stays bounded."""

  def __init__(self, k: int):
    self.k = k
    self.sizes: dict[int, int] = {}

  def add(self, masks, indices, valid):
    for i in np.flatnonzero(valid):
      self.sizes[int(indices[i])] = int(masks[i].sum())

  @classmethod
  def merge(cls, parts: list['_FigureSet']) -> '_FigureSet':
    """The figure rows of the images all parts saw (one per process)."""
    out = cls(parts[0].k)
    for part in parts:
      out.sizes.update(part.sizes)
    return out

  def picks(self) -> list[int]:
    keys = np.asarray(sorted(self.sizes), np.int64)
    sizes = np.asarray([self.sizes[int(i)] for i in keys], np.int64)
    return [int(keys[j]) for j in pick_rows(sizes, self.k)] if len(keys) else []


save_figure = curves.save_figure  # the name compare.py uses


def write_figures(items: list[tuple], out_dir: str, *, op_threshold: float, n_sigma_threshold: float,
                  n_sigma: float, rows_per_page: int = 8) -> list[str]:
  """Fig. 1-style grids: image | ground truth | heatmap | mask at OP | mask at N sigma.

  items: (anomalous pixels, index, name, image [H,W,C], mask [H,W], z [H,W]) per row."""
  if not items:
    return []
  plt = curves.pyplot()
  files.makedirs(out_dir)
  vmax = max(float(np.percentile(np.concatenate([it[5].ravel() for it in items]), 99.5)),
             1.5 * n_sigma_threshold, 1.2 * op_threshold, 1e-6)
  cols = ('image', 'ground truth', 'z-map (healthy std)', f'mask at OP (z >= {op_threshold:.2f})',
          f'mask at N={n_sigma:g} sigma')
  paths = []
  for page, start in enumerate(range(0, len(items), rows_per_page)):
    rows = items[start:start + rows_per_page]
    fig, axes = plt.subplots(len(rows), 5, figsize=(12.5, 2.6 * len(rows) + 0.4), squeeze=False)
    for r, (npos, _, name, image, mask, z) in enumerate(rows):
      img = image[..., 0] if image.shape[-1] == 1 else image
      truth = mask > 0
      m_op = z >= op_threshold
      m_n = z > n_sigma_threshold
      panels = [(img, dict(cmap='gray', vmin=0, vmax=1)),
                (truth, dict(cmap='gray', vmin=0, vmax=1)),
                (z, dict(cmap='inferno', vmin=0, vmax=vmax)),
                (m_op, dict(cmap='gray', vmin=0, vmax=1)),
                (m_n, dict(cmap='gray', vmin=0, vmax=1))]
      for c, (data, kw) in enumerate(panels):
        ax = axes[r, c]
        im = ax.imshow(data, interpolation='nearest', **kw)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
          ax.set_title(cols[c], fontsize=10)
        if c == 2:
          fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
      axes[r, 0].set_ylabel(f'{name}\n{npos} anomalous px' if npos else f'{name}\nhealthy',
                            fontsize=8)
      for c, pred in ((3, m_op), (4, m_n)):
        axes[r, c].set_xlabel(f'Dice {metrics_lib.dice(pred, truth):.2f}', fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f'test_grid_{page:02d}.png')
    save_figure(fig, path)
    plt.close(fig)
    paths.append(path)
  return paths


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
    images[:len(exs)] = np.stack([ex['image'] for ex in exs]).astype(np.float32) / 255.0
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
  make = functools.partial(metrics_lib.PixelMetricsAccumulator, num_bins,
                           score_range if score_range else (0.0, 1.0), thresholds, **kw)
  base = None
  if baseline:  # |x - mean| lies in [0, 1]; the baseline needs no range pass.
    base = metrics_lib.PixelMetricsAccumulator(num_bins, (0.0, 1.0 + 1e-6), (), **kw)
  return make, base


def write_summaries(log_dir: str, step: int, scalars: dict, images: dict[str, str]) -> bool:
  """TensorBoard scalars (None skipped) and PNG images (tag -> path) in `log_dir`, replacing an
  earlier evaluation's, with flax.metrics.tensorboard (training's writer); False without
  TensorFlow."""
  try:
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('TensorFlow not installed: no TensorBoard summaries of the evaluation.')
    return False
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sano_jax import datasets  # pylint: disable=g-import-not-at-top
  datasets.hide_gpus_from_tf()  # the writer starts TensorFlow: it must not take JAX's GPU memory
  files.rmtree(log_dir)  # the writer itself goes through TensorFlow's gfile, which speaks gs://
  writer = tensorboard.SummaryWriter(log_dir, auto_flush=False)
  for tag, value in scalars.items():
    if value is not None:
      writer.scalar(tag, float(value), step)
  for tag, path in images.items():
    with files.path(path).open('rb') as f, Image.open(f) as im:
      writer.image(tag, np.asarray(im.convert('RGB')), step)
  writer.close()
  return True


def _summary_scalars(out: dict) -> dict:
  """The TensorBoard scalars of a metrics.json dict: eval/*, and eval_groups/{attribute}/{value}/*
  and eval_groups/{attribute}/gap/* per group."""
  scalars = {'eval/auroc': out['auroc'], 'eval/auprc': out['auprc'], 'eval/aupro': out['aupro'],
             'eval/op_dice': out['operating_point']['dice'],
             'eval/op_iou': out['operating_point']['iou'],
             'eval/n_sigma_dice': out['n_sigma']['dice'], 'eval/n_sigma_iou': out['n_sigma']['iou'],
             'eval/baseline_auroc': (out.get('baseline') or {}).get('auroc')}
  for attr, section in (out.get('groups') or {}).items():
    for m, (_, path, _) in groups_lib.METRICS.items():
      for value, entry in section['values'].items():
        scalars[f'eval_groups/{attr}/{value}/{m}'] = groups_lib.value_at(entry, path)
      scalars[f'eval_groups/{attr}/gap/{m}'] = section['gap'][m]['gap']
  return scalars


def _write_curves(acc, out: dict, eval_dir: str, n_sigma: float, title: str) -> dict:
  """metrics.json's `curves`: the points (curves.npz) and figures of the whole test set."""
  if out['num_positive_pixels'] in (0, out['num_pixels']):
    return {'skipped': 'the test set needs anomalous and healthy pixels for ROC and PR curves'}
  data = curves.curve_data(acc.curve_levels(), float(out['operating_point']['threshold']),
                           out['n_sigma'])
  return {'points': curves.save_points(data, os.path.join(eval_dir, 'curves.npz')),
          'figures': curves.write_figures(data, os.path.join(eval_dir, 'figures'),
                                          auroc=_finite(out['auroc']),
                                          auprc=_finite(out['auprc']), n_sigma=n_sigma,
                                          title=title)}


def _finite(x):
  return x if x is not None and math.isfinite(x) else None


def evaluate(config: ml_collections.ConfigDict | None, workdir: str, *, train_source=None,
             val_source=None, test_source=None) -> dict:
  """Evaluates the best checkpoint in `workdir`; returns (and writes) the metrics.json dict.

  config: the evaluation config (None: the run's WORKDIR/config.json). Its model fields must match
  the checkpoint; data/localize/eval fields may differ. Sources default to
  `input_pipeline.get_source(config, split)`; tests may pass in-memory lists of contract dicts.
  With several processes (module docstring) every process calls it alike; process 0 writes and
  returns the dict, the others return None once it has written.
  """
  from sano_jax import input_pipeline
  _check_workdir(workdir)
  chief = jax.process_index() == 0
  if config is None:
    config = checkpointing.load_config(workdir)
  checkpointing.check_same_model(config, workdir)
  lc, ec = config.localize, config.eval
  t_start = time.perf_counter()

  mesh = eval_mesh(config)
  # Orbax's restore may run a cross-process collective: meet first (gloo's 30 s to join one).
  distributed.barrier('sano_eval_start')
  _, method, params, step = checkpointing.restore_for_inference(workdir, ema=bool(lc.use_ema),
                                                               config=config)
  val_source = val_source if val_source is not None else input_pipeline.get_source(
      config, config.data.validation_split)
  test_source = test_source if test_source is not None else input_pipeline.get_source(
      config, config.data.test_split)
  if len(test_source) == 0:
    raise ValueError(f'the test split {config.data.test_split!r} is empty: nothing to evaluate')
  lookup = groups_lib.resolve(config, test_source)  # an unknown attribute fails before any work

  # 0. Label-free calibration of t, rule and N (healthy validation images only).
  choice = None
  if lc.get('calibrate', False):
    choice = calibration.calibrate(config, methods_lib.create_at(config, calibration.T_GRID),
                                   params, val_source, seed=int(config.get('seed', 0)))
    choice = gather_from_processes(choice, 'calibration')[0]  # every process uses process 0's
    config = calibration.apply(config, choice)
    lc = config.localize
    method = methods_lib.create(config)
    logging.info('calibrated on %d synthetic anomalies in %.1f s: t=%s rule=%s sigma=%g N=%.3g',
                 choice['synthetic']['num_synthetic_images'], choice['seconds'], choice['t'],
                 choice['rule'], float(lc.smoothing_sigma), choice['n_sigma'])
  # The settings of this evaluation: the config's, or the calibration's applied to it.
  loc = localization.settings(lc)
  rule, n_sigma, sigma, target_fpr = loc['rule'], loc['n_sigma'], loc['smoothing_sigma'], \
      loc['target_fpr']
  num_devices = mesh.devices.size * jax.process_count()
  logging.info('evaluating %s (%s) on %d device(s) in %d process(es), rule=%s, t=%s', workdir,
               method.name, num_devices, jax.process_count(), rule, method.ts)

  # 1. Healthy statistics on the validation images.
  tic = time.perf_counter()
  stats = fit_stats(method, params, config, val_source, mesh)
  stats_seconds = time.perf_counter() - tic
  if chief:  # the statistics with the settings and checkpoint step they belong to, as one unit
    bundle = rundir.save(workdir, config=config, stats=stats, step=step, calibration=choice)
  logging.info('healthy score std %.4g over %d validation images', float(stats.std),
               int(stats.n_images))

  # 2. The baseline's mean training intensity.
  do_baseline = bool(ec.get('baseline', True))
  mean = None
  if do_baseline:
    train_source = train_source if train_source is not None else input_pipeline.get_source(
        config, config.data.train_split)
    mean = mean_intensity(config, train_source, mesh)

  # 3. Scoring the test split.
  n_threshold = n_sigma
  if rule == 'quantile':  # the rule's mask is A > q = (z = A / std) > q / std
    n_threshold = float(stats.quantile(1.0 - target_fpr) / stats.std)

  @jax.jit
  def score_step(params, stats, images, mean):
    z, _ = localization.localize(method.field_fn(params), images, stats, **loc)
    base = baseline_map(images, mean, sigma) if mean is not None else None
    return z, base

  params_d = sharding.replicate(params, mesh)
  stats_d = sharding.replicate(stats, mesh)
  mean_d = None if mean is None else jnp.asarray(mean, jnp.float32)
  h = w = int(config.data.image_size)
  n_pixels = len(test_source) * h * w
  exact = n_pixels <= int(ec.get('exact_max_pixels', 0))
  n_batches = _num_batches(test_source, config)

  def scored(desc):
    """Yields (host batch, z [N,H,W], baseline [N,H,W] or None, device seconds) per batch."""
    carried = lookup.carried if lookup is not None else ()
    for batch in _progress(_batches(test_source, config, mesh, carried), n_batches, desc):
      images = sharding.shard_batch({'image': _unit_images(batch)}, mesh)['image']
      tic = time.perf_counter()
      z, base = score_step(params_d, stats_d, images, mean_d)
      z = np.asarray(z)
      base = None if base is None else np.asarray(base)
      yield batch, z, base, time.perf_counter() - tic

  score_range = None
  passes = 1
  if not exact:  # a first pass fixes the histogram range of the z-maps
    rng = metrics_lib.StreamingRange()
    for batch, z, _, _ in scored('test range pass'):
      rng.add(z, _flat(batch['valid']))
    lo, hi = metrics_lib.StreamingRange.merge(gather_from_processes(rng, 'test_range')).range
    score_range = (min(lo, 0.0), max(hi, n_threshold * 1.01))
    passes = 2
  make_acc, base_acc = _make_accumulators(config, n_pixels, (n_threshold,), score_range,
                                          do_baseline)
  acc = make_acc()
  grouped = None if lookup is None else groups_lib.GroupedMetrics(lookup.attributes, make_acc)
  fig_set = _FigureSet(int(ec.get('num_figures', 8)))
  device_s, timed_images, n_anomalous, n_valid = 0.0, 0, 0, 0
  tic_pass = time.perf_counter()
  for b, (batch, z, base, dt) in enumerate(scored('test')):
    valid = _flat(batch['valid'])
    masks = _flat(batch['mask'])[..., 0]
    subjects = _flat(batch['subject'])
    index = _flat(batch['index'])
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
      flat = {k: _flat(batch[k]) for k in lookup.carried + ('name',)}
      grouped.add(z, masks, subjects, valid, lookup.values(flat), indices=index)
  pass_s = time.perf_counter() - tic_pass
  parts = gather_from_processes(
      (acc, base_acc, grouped, fig_set, (device_s, timed_images, n_anomalous, n_valid)), 'test')
  if not chief:  # process 0 reports; the others wait until it has written
    distributed.barrier('sano_eval_written')
    return None
  if len(parts) > 1:  # one accumulator of each kind over all processes' images
    acc = metrics_lib.PixelMetricsAccumulator.merge([p[0] for p in parts])
    if base_acc is not None:
      base_acc = metrics_lib.PixelMetricsAccumulator.merge([p[1] for p in parts])
    if grouped is not None:
      grouped = groups_lib.GroupedMetrics.merge([p[2] for p in parts])
    fig_set = _FigureSet.merge([p[3] for p in parts])
    counts = np.array([p[4] for p in parts])
    device_s = float(counts[:, 0].max())  # the processes score at the same time
    timed_images, n_anomalous, n_valid = (int(c) for c in counts[:, 1:].sum(axis=0))

  # 4. Metrics.
  runs = int(ec.bootstrap_runs)
  out = acc.compute(bootstrap_runs=runs, seed=int(config.get('seed', 0)))
  out['n_sigma']['n'] = n_sigma
  if grouped is not None:
    out['groups'] = grouped.compute(runs, int(config.get('seed', 0)), n_sigma=n_sigma)
  base_metrics = None
  if base_acc is not None:
    bm = base_acc.compute(bootstrap_runs=0)
    base_metrics = {'auroc': bm['auroc'], 'auprc': bm['auprc'], 'aupro': bm['aupro'],
                    'dice_at_op': bm['operating_point']['dice'],
                    'mean_intensity': [float(v) for v in mean],
                    'map': 'gaussian(mean_c |x - mean training intensity|)'}
  out.update(
      baseline=base_metrics,
      num_anomalous_images=n_anomalous,
      num_healthy_images=n_valid - n_anomalous,
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
      timing={'images_per_s': timed_images / device_s if device_s > 0 else None,
              'end_to_end_images_per_s': n_valid / pass_s if pass_s > 0 else None,
              'score_stats_seconds': stats_seconds, 'test_passes': passes,
              'total_seconds': None, 'num_devices': int(num_devices),
              'num_processes': int(jax.process_count()), 'batch_size': int(ec.batch_size)},
  )

  # 5. Figures and metrics.json.
  eval_dir = os.path.join(workdir, 'eval')
  files.makedirs(eval_dir)
  zmaps = lambda x: score_step(params_d, stats_d, x, mean_d)[0]
  figures = write_figures(_figure_rows(fig_set.picks(), test_source, config, mesh, zmaps),
                          os.path.join(eval_dir, 'figures'),
                          op_threshold=float(out['operating_point']['threshold']),
                          n_sigma_threshold=n_threshold, n_sigma=n_sigma)
  out['figures'] = figures
  out['curves'] = _write_curves(acc, out, eval_dir, n_sigma,
                                f"({method.name}, {config.data.dataset})")
  for attr, section in out.get('groups', {}).items():
    section['figure'] = groups_lib.write_figure(
        attr, _json_safe(section), os.path.join(eval_dir, 'figures', f'groups_{attr}.png'))
  out = _json_safe(out)
  images = {f'eval/{os.path.splitext(os.path.basename(p))[0]}': p
            for p in figures + list(out['curves'].get('figures', {}).values())
            + [s['figure'] for s in out.get('groups', {}).values()]}
  out['tensorboard'] = os.path.join(eval_dir, 'tensorboard')
  if not write_summaries(out['tensorboard'], step, _summary_scalars(out),
                         images):
    out['tensorboard'] = None
  out['timing']['total_seconds'] = time.perf_counter() - t_start
  path = os.path.join(eval_dir, 'metrics.json')
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


def brief_summary(metrics: dict, workdir: str, seconds: float) -> str:
  """Five lines for the end of `make demo`: the metrics, where the figures are, how to look."""
  ns, op, base = metrics['n_sigma'], metrics['operating_point'], metrics.get('baseline') or {}
  num = lambda v: 'n/a' if v is None else f'{v:.3f}'
  loc = metrics['localization']
  return '\n'.join([
      f"done in {seconds / 60:.1f} min: {metrics['data']['dataset']}, {metrics['num_images']} test "
      f"images; pixel AUROC {num(metrics.get('auroc'))} ± {num(metrics.get('auroc_std'))} (trivial "
      f"baseline {num(base.get('auroc'))}), AUPRO {num(metrics.get('aupro'))}",
      f"Dice at the label-free threshold ({loc['rule']}, N = {ns['n']:.3g}): {num(ns.get('dice'))}; "
      f"at the best-F1 threshold (uses test labels): {num(op.get('dice'))}",
      f"figures: {os.path.join(workdir, 'eval', 'figures')}/ (test_grid_*.png, roc.png, pr.png, "
      'z_histogram.png, groups_*.png)',
      f"all metrics: {os.path.join(workdir, 'eval', 'metrics.json')} (the full summary: "
      f"{os.path.join(workdir, 'eval', SUMMARY_FILE)})",
      f'look at them: tensorboard --logdir={workdir}'])


SUMMARY_FILE = 'summary.txt'


def format_summary(metrics: dict, workdir: str, seconds: float) -> str:
  """A short table of `metrics` (as written to metrics.json) for the end of a run."""
  op, ns, base = metrics['operating_point'], metrics['n_sigma'], metrics.get('baseline') or {}
  num = lambda v: 'n/a' if v is None else f'{v:.3f}'  # NaN is written as null
  pm = lambda key, d=metrics: f"{num(d.get(key))} ± {num(d.get(key + '_std'))}"
  name = metrics['localization'].get('method', 'sano')
  rows = [
      f"{name} on {metrics['data']['dataset']}: {metrics['num_images']} test images, "
      f"{metrics['num_subjects']} subjects ({seconds / 60:.1f} min); "
      + (f"t={','.join(f'{t:g}' for t in metrics['localization']['t'])}, " if name == 'sano' else '')
      + f"{metrics['localization']['rule']} healthy statistics",
      f"  pixel AUROC   {pm('auroc')}     trivial baseline {num(base.get('auroc'))}",
      f"  pixel AUPRC   {pm('auprc')}     trivial baseline {num(base.get('auprc'))}",
      f"  AUPRO@{metrics.get('aupro_max_fpr', 0.3):g}     {pm('aupro')}     trivial baseline "
      f"{num(base.get('aupro'))}",
      f"  operating point (best F1, uses test labels): Dice {pm('dice', op)}  IoU {pm('iou', op)}",
      f"  N = {ns['n']:g} sigma (healthy data only):       Dice {pm('dice', ns)}  IoU {pm('iou', ns)}",
      f"  metrics: {os.path.join(workdir, 'eval', 'metrics.json')}",
      f"  figures: {os.path.join(workdir, 'eval', 'figures')}/ (grids, roc, pr, z_histogram, "
      'groups)',
  ]
  if metrics.get('tensorboard'):
    rows.append(f'  TensorBoard: tensorboard --logdir={workdir}')
  for attr, section in (metrics.get('groups') or {}).items():
    rows += [f'  by {attr} (± subject bootstrap std; OP = each group\'s own best-F1 threshold; '
             'gap [95% interval]):', groups_lib.format_table(attr, section)]
  return '\n'.join(rows)
