"""The streaming pixel-metrics accumulator: per-subject histograms (or, for small sets, the raw
scores) and fixed-threshold counts, merged across processes, and every metric of `sano_jax.metrics`
with subject-bootstrap standard deviations (`PixelMetricsAccumulator.compute`).

The binned path holds subjects x bins x 2 counts, independent of the number of pixels; its
bootstrap is a matrix product of multinomial subject multiplicities with the per-subject
histograms. `bootstrap` is the same for in-memory arrays.
"""
from __future__ import annotations

import warnings
from typing import Any, Hashable, Sequence

import numpy as np

from sano_jax.metrics import AUPRO_MAX_FPR, StreamingRange, bootstrap_weights, pro_area
from sano_jax.metrics import curve_metrics, region_weights, subject_key



def _std(values: np.ndarray) -> float | None:
  values = np.asarray(values, np.float64)
  if values.shape[0] < 2:
    return None
  with warnings.catch_warnings():  # all runs undefined (e.g. a group without anomalies): NaN
    warnings.simplefilter('ignore', RuntimeWarning)
    return float(np.nanstd(values, axis=0, ddof=1))


class PixelMetricsAccumulator:
  """Streams (scores, labels, subjects) into per-subject histograms and fixed-threshold counts.

  Args:
    num_bins: equal-width bins over `score_range` (>= 2**16 recommended; scores outside the range
      fall into the end bins, so the range should cover the scores, e.g. from a first pass with
      `StreamingRange`).
    score_range: (lo, hi).
    thresholds: fixed thresholds (e.g. n_sigma for z-maps); predicted positive = score > t, as
      `sano_jax.localize`'s mask. The first one is reported as `n_sigma`.
    exact_max_pixels: while the total pixel count is at most this, the raw scores are kept as well
      and `compute` uses the exact sort-based curve (0: always binned).
    aupro_max_fpr: the FPR limit of AUPRO (`pro_area`). AUPRO needs the images' layout: batches of
      [B, H, W] (or [B, H, W, 1]) scores; fed anything else, it is reported as None.

  Memory: subjects x num_bins x (2 int32 + 1 float64 of AUPRO's region weights: 200 MB for 190
  subjects at 2**16 bins) plus O(images x
  thresholds) (each image's Dice and IoU, summed per subject in index order), whatever the number
  of pixels. Accumulators of parts of a set (one per process) combine with `merge`.
  """

  def __init__(self, num_bins: int = 2**16, score_range: tuple[float, float] = (0.0, 50.0),
               thresholds: Sequence[float] = (3.0,), exact_max_pixels: int = 0,
               aupro_max_fpr: float = AUPRO_MAX_FPR):
    lo, hi = float(score_range[0]), float(score_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
      raise ValueError(f'score_range must be finite with hi > lo, got {score_range}')
    if num_bins < 2:
      raise ValueError(f'num_bins must be >= 2, got {num_bins}')
    self.num_bins = int(num_bins)
    self.score_range = (lo, hi)
    self.thresholds = tuple(float(t) for t in thresholds)
    self.exact_max_pixels = int(exact_max_pixels)
    if not 0 < aupro_max_fpr <= 1:
      raise ValueError(f'aupro_max_fpr must be in (0, 1], got {aupro_max_fpr}')
    self.aupro_max_fpr = float(aupro_max_fpr)
    self._rows: dict[Hashable, int] = {}
    self._hist = np.zeros((0, 2, self.num_bins), np.int32)
    self._pro_hist = np.zeros((0, self.num_bins), np.float64)  # region weights per bin
    self._regions = np.zeros((0,), np.int64)  # anomalous regions per subject
    self._has_layout = True  # every batch was [B, H, W]: AUPRO is defined
    t = len(self.thresholds)
    self._conf = np.zeros((0, t, 3), np.int64)  # tp, fp, fn at each fixed threshold
    self._n_images = np.zeros((0,), np.int64)
    self._n_images_pos = np.zeros((0,), np.int64)
    self._pixels = np.zeros((0,), np.int64)
    self._first = np.zeros((0,), np.int64)  # each subject's first image index
    # Per image: (indices [k], subject rows [k], dice and iou [k, T, 2] (0 without truth)), summed
    # per subject in image-index order by `_image_sums` (the order one pass in index order adds).
    self._per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._seen = 0  # the next default image index
    # Exact path: (scores [P], labels [P], subject rows [P], first image index, region weights
    # [P]) per `add`.
    self._raw: list | None = [] if self.exact_max_pixels > 0 else None
    self._raw_pixels = 0

  @property
  def edges(self) -> np.ndarray:
    """Lower bin edges (the binned thresholds)."""
    lo, hi = self.score_range
    return lo + (hi - lo) * np.arange(self.num_bins) / self.num_bins

  def _row(self, subject, index: int) -> int:
    key = subject_key(subject)
    row = self._rows.get(key)
    if row is None:
      row = self._rows[key] = len(self._rows)
      if row >= self._hist.shape[0]:
        self._grow(max(16, 2 * self._hist.shape[0]))
      self._first[row] = index
    elif index < self._first[row]:
      self._first[row] = index
    return row

  def _grow(self, cap: int) -> None:
    grow = lambda a: np.concatenate([a, np.zeros((cap - a.shape[0],) + a.shape[1:], a.dtype)])
    self._hist, self._conf, self._first = grow(self._hist), grow(self._conf), grow(self._first)
    self._pro_hist, self._regions = grow(self._pro_hist), grow(self._regions)
    self._n_images, self._n_images_pos = grow(self._n_images), grow(self._n_images_pos)
    self._pixels = grow(self._pixels)

  def add(self, scores, labels, subjects, valid=None, indices=None) -> None:
    """scores [B, ...] float, labels [B, ...] (nonzero = anomalous), subjects [B], valid [B] bool,
    indices [B] int: the images' positions in the whole evaluated set (default: next in line),
    which order the subjects when accumulators of parts of the set are merged (`merge`)."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim < 1 or s.shape != y.shape:
      raise ValueError(f'scores {s.shape} and labels {y.shape} must have the same shape [B, ...]')
    b = s.shape[0]
    subjects = np.asarray(subjects).reshape(-1)
    if subjects.shape[0] != b:
      raise ValueError(f'{subjects.shape[0]} subjects for a batch of {b}')
    keep = np.ones((b,), bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    if keep.shape[0] != b:
      raise ValueError(f'valid has {keep.shape[0]} entries for a batch of {b}')
    if not keep.any():
      return
    if indices is None:
      index = np.arange(self._seen, self._seen + int(keep.sum()), dtype=np.int64)
    else:
      index = np.asarray(indices, np.int64).reshape(-1)
      if index.shape[0] != b:
        raise ValueError(f'indices has {index.shape[0]} entries for a batch of {b}')
      index = index[keep]
    self._seen = max(self._seen, int(index.max()) + 1)
    s_in = s[keep].reshape(int(keep.sum()), -1)
    if not np.issubdtype(s_in.dtype, np.floating):
      s_in = s_in.astype(np.float64)
    s = s_in.astype(np.float32, copy=False)
    kept = y[keep]
    # [B, H, W] (or [B, H, W, 1]): the images' layout, which AUPRO's regions need.
    layout = kept.reshape(kept.shape[:3]) if kept.ndim >= 3 and \
        np.prod(kept.shape[3:], dtype=np.int64) == 1 else None
    y = kept.reshape(s.shape) > 0
    subjects = subjects[keep]
    if not np.isfinite(s).all():
      raise ValueError('scores contain NaN or inf')
    rows = np.array([self._row(x, i) for x, i in zip(subjects, index)], np.int64)
    nb = self.num_bins
    lo, hi = self.score_range
    idx = np.floor((s - np.float32(lo)) * np.float32(nb / (hi - lo))).astype(np.int64)
    np.clip(idx, 0, nb - 1, out=idx)
    idx += nb * (~y)  # channel 0: positives, channel 1: negatives
    uniq, inv = np.unique(rows, return_inverse=True)
    idx += (2 * nb) * inv[:, None]
    counts = np.bincount(idx.reshape(-1), minlength=2 * nb * len(uniq)).reshape(len(uniq), 2, nb)
    self._has_layout &= layout is not None
    pro_w = None
    if self._has_layout:
      pro_w, per_image = region_weights(layout)
      pro_w = pro_w.reshape(s.shape)
      np.add.at(self._regions, rows, per_image)
      # Positives sit in channel 0 of each subject's 2 x nb block: row u's bin b is 2*nb*u + b.
      pro_idx = (idx[y] // (2 * nb)) * nb + idx[y] % nb
      self._pro_hist[uniq] += np.bincount(pro_idx, weights=pro_w[y],
                                          minlength=nb * len(uniq)).reshape(len(uniq), nb)
    self._pixels[uniq] += counts.reshape(len(uniq), -1).sum(axis=1)
    if self._pixels.max(initial=0) > np.iinfo(np.int32).max and self._hist.dtype == np.int32:
      self._hist = self._hist.astype(np.int64)
    self._hist[uniq] += counts.astype(self._hist.dtype)

    npos = y.sum(axis=1)
    np.add.at(self._n_images, rows, 1)
    np.add.at(self._n_images_pos, rows, (npos > 0).astype(np.int64))
    per_image = np.zeros((len(rows), len(self.thresholds), 2), np.float64)
    for j, t in enumerate(self.thresholds):
      pred = s > np.float32(t)
      inter = np.count_nonzero(pred & y, axis=1)
      npred = np.count_nonzero(pred, axis=1)
      conf = np.stack([inter, npred - inter, npos - inter], axis=1)
      np.add.at(self._conf[:, j], rows, conf)
      has = npos > 0
      per_image[:, j, 0] = np.where(has, 2.0 * inter / np.maximum(npred + npos, 1), 0.0)
      per_image[:, j, 1] = np.where(has, inter / np.maximum(npred + npos - inter, 1), 0.0)
    self._per_image.append((index, rows, per_image))

    if self._raw is not None:
      self._raw_pixels += s.size
      if self._raw_pixels > self.exact_max_pixels:
        self._raw = None
      else:
        self._raw.append((s_in.reshape(-1).copy(), y.reshape(-1).copy(),
                          np.repeat(rows, s.shape[1]), int(index.min()),
                          None if pro_w is None else pro_w.reshape(-1)))

  def _image_sums(self) -> np.ndarray:
    """[S, T, 2]: per subject, the sums of its images' Dice and IoU at each fixed threshold
    (images without anomalous pixels add 0), added in image-index order."""
    out = np.zeros((len(self._rows), len(self.thresholds), 2), np.float64)
    if self._per_image:
      index, rows, values = (np.concatenate(a) for a in zip(*self._per_image))
      order = np.argsort(index, kind='stable')
      np.add.at(out, rows[order], values[order])
    return out

  @classmethod
  def merge(cls, accumulators: Sequence['PixelMetricsAccumulator']) -> 'PixelMetricsAccumulator':
    """One accumulator of everything the given ones saw (e.g. one per process, each fed its share
    of the images with their global `indices`): counts and histograms add; the subjects are ordered
    by their first image index, the order one pass over the whole set in index order gives, so the
    bootstrap (whose columns are the subjects) does not depend on who saw which image. Equal
    settings required; the inputs are not changed."""
    accs = list(accumulators)
    if not accs:
      raise ValueError('merge needs at least one accumulator')
    a0 = accs[0]
    settings = lambda a: (a.num_bins, a.score_range, a.thresholds, a.exact_max_pixels,
                          a.aupro_max_fpr)
    for a in accs[1:]:
      if settings(a) != settings(a0):
        raise ValueError(f'cannot merge accumulators with different settings (num_bins, '
                         f'score_range, thresholds, exact_max_pixels, aupro_max_fpr): '
                         f'{settings(a0)} and {settings(a)}')
    out = cls(*settings(a0))
    out._has_layout = all(a._has_layout for a in accs)
    first: dict[Hashable, int] = {}
    for a in accs:
      for key, row in a._rows.items():
        first[key] = min(first.get(key, int(a._first[row])), int(a._first[row]))
    out._rows = {k: i for i, k in enumerate(sorted(first, key=first.__getitem__))}
    out._grow(len(out._rows))
    out._first[:] = [first[k] for k in out._rows]
    hist = np.zeros((len(out._rows), 2, out.num_bins), np.int64)
    raw = [] if all(a._raw is not None for a in accs) else None
    for a in accs:
      n = len(a._rows)
      to = np.array([out._rows[k] for k in a._rows], np.int64)  # a's row -> the merged row
      hist[to] += a._hist[:n]
      for mine, theirs in ((out._conf, a._conf), (out._n_images, a._n_images),
                           (out._n_images_pos, a._n_images_pos), (out._pixels, a._pixels),
                           (out._pro_hist, a._pro_hist), (out._regions, a._regions)):
        mine[to] += theirs[:n]
      out._per_image += [(i, to[r], v) for i, r, v in a._per_image]
      if raw is not None:
        raw += [(sc, y, to[r], i, pw) for sc, y, r, i, pw in a._raw]
      out._raw_pixels += a._raw_pixels
      out._seen = max(out._seen, a._seen)
    out._hist = hist if out._pixels.max(initial=0) > np.iinfo(np.int32).max else \
        hist.astype(np.int32)
    out._raw = None if raw is None or out._raw_pixels > out.exact_max_pixels else \
        sorted(raw, key=lambda chunk: chunk[3])
    return out

  # -- compute ---------------------------------------------------------------------------------

  @property
  def subjects(self) -> list:
    """The subjects in row order (order of first appearance): the columns of bootstrap weights."""
    return list(self._rows)

  def _exact_sorted(self):
    """The kept raw pixels sorted by descending score: (labels [P] float64, subject rows [P],
    level starts [L], thresholds [L], region weights [P] or None) with one level per distinct
    score."""
    sc = np.concatenate([r[0] for r in self._raw]).astype(np.float64)
    y = np.concatenate([r[1] for r in self._raw])
    subj = np.concatenate([r[2] for r in self._raw])
    order = np.argsort(-sc, kind='stable')
    ss = sc[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ss)) + 1])
    pro_w = np.concatenate([r[4] for r in self._raw])[order] if self._has_layout else None
    return y[order].astype(np.float64), subj[order], starts, ss[starts], pro_w

  def curve_levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos [L], neg [L], thresholds [L] descending): the anomalous and healthy pixel counts per
    threshold level of everything added, the curve every metric is computed from (exact: one level
    per distinct score; binned: one per bin, its threshold the bin's lower edge)."""
    s = len(self._rows)
    if s == 0:
      raise ValueError('no data added to the accumulator')
    if self._raw:
      yy, _, starts, thr, _ = self._exact_sorted()
      pos = np.add.reduceat(yy, starts)
      return pos, np.diff(np.append(starts, yy.size)) - pos, thr
    hist = self._hist[:s].sum(axis=0, dtype=np.int64).astype(np.float64)
    return hist[0, ::-1], hist[1, ::-1], self.edges[::-1]

  def _curves(self, weights: np.ndarray) -> dict:
    """Curve metrics for subject weights [R, S] (R = 1 + bootstrap runs), AUPRO included."""
    s = len(self._rows)
    regions = weights @ self._regions[:s].astype(np.float64)  # [R]

    def with_aupro(out, pro_mass, neg, rows):
      out['aupro'] = (pro_area(pro_mass, neg, regions[rows], self.aupro_max_fpr)
                      if self._has_layout else np.full(len(regions[rows]), np.nan))
      return out

    outs = []
    if self._raw:
      yy, sj, starts, thr, pro_w = self._exact_sorted()
      for r, w in enumerate(weights):  # the sort is shared; a run reweights pixels by multiplicity
        pw = w[sj]
        neg = np.add.reduceat(pw * (1.0 - yy), starts)[None]
        pro = np.add.reduceat(pw * pro_w, starts)[None] if self._has_layout else None
        outs.append(with_aupro(curve_metrics(np.add.reduceat(pw * yy, starts)[None], neg, thr),
                               pro, neg, slice(r, r + 1)))
      return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    hist = self._hist[:s]
    nb = self.num_bins
    runs_chunk, bins_chunk = 8, 8192  # bounded temporaries: 8 runs x bins, S x 8192 float64
    for r in range(0, weights.shape[0], runs_chunk):
      w = weights[r:r + runs_chunk]
      pos, neg, pro = (np.empty((w.shape[0], nb)) for _ in range(3))
      for a in range(0, nb, bins_chunk):
        pos[:, a:a + bins_chunk] = w @ hist[:, 0, a:a + bins_chunk].astype(np.float64)
        neg[:, a:a + bins_chunk] = w @ hist[:, 1, a:a + bins_chunk].astype(np.float64)
        pro[:, a:a + bins_chunk] = w @ self._pro_hist[:s, a:a + bins_chunk]
      # Descending thresholds: the highest bin first.
      outs.append(with_aupro(curve_metrics(pos[:, ::-1], neg[:, ::-1], self.edges[::-1]),
                             pro[:, ::-1], neg[:, ::-1], slice(r, r + runs_chunk)))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def run_values(self, weights: np.ndarray) -> dict:
    """Every metric under each row of subject weights [R, S] (columns in `subjects` order; row 0 of
    `bootstrap_weights` is the data as is): auroc, auprc, aupro, threshold, f1, dice, iou as [R],
    and 'fixed': per fixed threshold t a dict of arrays [R] of dice, iou (pooled pixels, mask
    score > t), dice_per_image, iou_per_image (mean over images with a non-empty truth), and
    tpr = TP / P, fpr = FP / N, precision = TP / (TP + FP)."""
    s = len(self._rows)
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2 or weights.shape[1] != s:
      raise ValueError(f'weights must be [runs, {s} subjects], got {weights.shape}')
    out = dict(self._curves(weights))
    conf = weights @ self._conf[:s].reshape(s, -1).astype(np.float64)  # [R, T*3]
    conf = conf.reshape(weights.shape[0], len(self.thresholds), 3)
    img = np.einsum('rs,stk->rtk', weights, self._image_sums())
    nimg_pos = weights @ self._n_images_pos[:s].astype(np.float64)
    neg = weights @ self._hist[:s, 1].sum(axis=1, dtype=np.int64).astype(np.float64)
    fixed = []
    with np.errstate(divide='ignore', invalid='ignore'):
      for j in range(len(self.thresholds)):
        tp, fp, fn = conf[:, j, 0], conf[:, j, 1], conf[:, j, 2]
        fixed.append({
            'dice': np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0),
            'iou': np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 1.0),
            'dice_per_image': img[:, j, 0] / nimg_pos, 'iou_per_image': img[:, j, 1] / nimg_pos,
            'tpr': tp / (tp + fn), 'fpr': fp / neg, 'precision': tp / (tp + fp)})
    out['fixed'] = fixed
    return out

  def compute(self, bootstrap_runs: int = 50, seed: int = 0) -> dict:
    """Metrics of everything added, with subject-bootstrap standard deviations.

    Resampling draws the subjects with replacement (multiplicities ~ Multinomial(S, 1/S), seeded
    by `seed`: `bootstrap_weights`); every metric, the operating point included, is recomputed on
    each resample, and `X_std` is the std (ddof=1) over the runs (None when bootstrap_runs < 2).
    Schema (floats/ints):

      auroc, auroc_std, auprc, auprc_std, aupro, aupro_std (`pro_area` up to aupro_max_fpr;
      NaN without a region, or when a batch had no [H, W] layout),
      operating_point: {threshold, threshold_std, f1, f1_std, dice, dice_std, iou, iou_std},
      n_sigma: {n, threshold, dice, dice_std, iou, iou_std, dice_per_image, dice_per_image_std,
                iou_per_image, iou_per_image_std, tpr, fpr, precision}
               (the first fixed threshold; None if none; tpr/fpr/precision without std),
      fixed_thresholds: [the same dict for each fixed threshold],
      num_images, num_anomalous_images, num_subjects, num_pixels, num_positive_pixels,
      bootstrap_runs, seed, method ('exact' or 'binned'), num_bins, score_range (None when exact).

    At a fixed threshold t the mask is score > t; dice/iou pool all pixels, *_per_image average
    over images with a non-empty ground truth. The binned operating-point threshold is a bin edge.
    """
    s = len(self._rows)
    if s == 0:
      raise ValueError('no data added to the accumulator')
    runs = int(bootstrap_runs)
    values = self.run_values(bootstrap_weights(s, runs, seed))

    def point_std(v):
      return float(v[0]), _std(v[1:])

    out: dict[str, Any] = {}
    for k in ('auroc', 'auprc', 'aupro'):
      out[k], out[k + '_std'] = point_std(values[k])
    op = {}
    for k in ('threshold', 'f1', 'dice', 'iou'):
      op[k], op[k + '_std'] = point_std(values[k])
    out['operating_point'] = op
    fixed = []
    for t, v in zip(self.thresholds, values['fixed']):
      entry = {'n': t, 'threshold': t}
      for name in ('dice', 'iou', 'dice_per_image', 'iou_per_image'):
        entry[name], entry[name + '_std'] = point_std(v[name])
      entry.update({name: float(v[name][0]) for name in ('tpr', 'fpr', 'precision')})
      fixed.append(entry)
    out['n_sigma'] = fixed[0] if fixed else None
    out['fixed_thresholds'] = fixed
    pix = self._hist[:s].sum(axis=(0, 2), dtype=np.int64)
    exact = bool(self._raw)
    out.update(num_images=int(self._n_images[:s].sum()),
               num_anomalous_images=int(self._n_images_pos[:s].sum()), num_subjects=s,
               num_pixels=int(pix.sum()), num_positive_pixels=int(pix[0]),
               bootstrap_runs=runs, seed=int(seed), method='exact' if exact else 'binned',
               num_bins=None if exact else self.num_bins,
               score_range=None if exact else list(self.score_range),
               num_regions=int(self._regions[:s].sum()) if self._has_layout else None,
               aupro_max_fpr=self.aupro_max_fpr)
    return out


def bootstrap(scores, labels, subjects, *, runs: int = 50, seed: int = 0,
              thresholds: Sequence[float] = (3.0,), num_bins: int | None = None,
              score_range: tuple[float, float] | None = None) -> dict:
  """Subject-stratified bootstrap of all metrics for in-memory arrays [N, ...] with subjects [N].

  num_bins=None: exact (one sort, each run reweights pixels by their subject's multiplicity);
  otherwise binned over score_range (default: the data's range). Returns the schema of
  `PixelMetricsAccumulator.compute`.
  """
  s = np.asarray(scores)
  if num_bins is None:
    acc = PixelMetricsAccumulator(2, (0.0, 1.0), thresholds, exact_max_pixels=max(s.size, 1))
  else:
    if score_range is None:
      r = StreamingRange()
      r.add(s)
      score_range = r.range
    acc = PixelMetricsAccumulator(num_bins, score_range, thresholds)
  acc.add(s, labels, subjects)
  return acc.compute(bootstrap_runs=runs, seed=seed)
