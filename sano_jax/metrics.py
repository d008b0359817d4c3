"""Pixel-level localization metrics (SANO §3.3, Table 1) and the subject-stratified bootstrap.

All metrics pool every pixel of the evaluated set (the paper's "over the entirety of images").
Labels: any array, nonzero = anomalous. Scores: finite floats (NaN raises ValueError).

- AUROC: area under the ROC curve, trapezoidal over distinct thresholds (= sklearn roc_auc_score).
- AUPRC: average precision AP = sum_k (R_k - R_{k-1}) P_k, step-wise, no interpolation
  (= sklearn average_precision_score).
- Operating point: the threshold t of best F1 = 2 TP / (TP + FP + P) on the PR curve, predicted
  positive = score >= t (as sklearn's precision_recall_curve); ties go to the highest threshold.
  Over a pooled pixel set, Dice at the OP equals its F1 and IoU = TP / (FP + P).
- Dice = 2|A n B| / (|A| + |B|), IoU = |A n B| / |A u B|; both are 1 when A and B are empty.

Every path shares one curve routine on per-level counts (`curve_metrics`, threshold levels in
descending order): exact (sort the scores once) or binned (`sano_jax.accumulator`: per-subject
histograms of equal bins over a fixed score range; a level = a bin, its threshold = the bin's lower
edge).
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------
# The curve: counts per threshold level -> AUROC, AP, operating point.
# --------------------------------------------------------------------------------------------


def curve_metrics(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> dict:
  """Metrics from (weighted) positive/negative counts per level [..., L], thresholds descending.

  TP_k = sum_{j<=k} pos_j, FP_k likewise; AUROC = sum_k (FP_k - FP_{k-1})(TP_k + TP_{k-1}) / (2PN);
  AP = sum_k pos_k / P * TP_k / (TP_k + FP_k); F1_k = 2 TP_k / (TP_k + FP_k + P).
  Levels with no counts are harmless (zero area, repeated F1). Leading axes = bootstrap runs.
  """
  pos = np.asarray(pos, np.float64)
  neg = np.asarray(neg, np.float64)
  tp = np.cumsum(pos, axis=-1)
  fp = np.cumsum(neg, axis=-1)
  p = tp[..., -1:]
  n = fp[..., -1:]
  with np.errstate(divide='ignore', invalid='ignore'):
    tp_prev = tp - pos
    auroc = np.sum(neg * (tp + tp_prev), axis=-1) / (2.0 * p[..., 0] * n[..., 0])
    prec = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1.0), 0.0)
    auprc = np.sum(pos * prec, axis=-1) / p[..., 0]
    f1 = 2.0 * tp / (tp + fp + p)
    f1 = np.where(np.isfinite(f1), f1, -1.0)
    k = np.argmax(f1, axis=-1)
    take = lambda a: np.take_along_axis(a, k[..., None], axis=-1)[..., 0]
    tp_k, fp_k, p0 = take(tp), take(fp), p[..., 0]
    best_f1 = 2.0 * tp_k / (tp_k + fp_k + p0)
    best_iou = tp_k / (fp_k + p0)
  thr = np.asarray(thresholds, np.float64)[k]
  return dict(auroc=auroc, auprc=auprc, threshold=thr, f1=best_f1, dice=best_f1, iou=best_iou)


def _flat(scores, labels, sample_weight=None):
  s = np.asarray(scores, np.float64).reshape(-1)
  y = (np.asarray(labels).reshape(-1) > 0)
  if s.shape != y.shape:
    raise ValueError(f'scores ({np.shape(scores)}) and labels ({np.shape(labels)}) differ in size')
  if s.size == 0:
    raise ValueError('empty scores')
  if not np.isfinite(s).all():
    raise ValueError('scores contain NaN or inf')
  w = None if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)
  return s, y, w


def _exact_levels(s, y, w=None):
  """Sorts once: (pos, neg, thresholds) per distinct score, descending. Weights w [..., N] may
  carry leading axes (several weightings of one sort): pos and neg are then [..., L]."""
  order = np.argsort(-s, kind='stable')
  ss = s[order]
  starts = np.concatenate([[0], np.flatnonzero(np.diff(ss)) + 1])
  yy = y[order].astype(np.float64)
  if w is not None:
    ww = w[..., order]
    pos = np.add.reduceat(ww * yy, starts, axis=-1)
    neg = np.add.reduceat(ww * (1.0 - yy), starts, axis=-1)
  else:
    pos = np.add.reduceat(yy, starts)
    neg = (np.diff(np.append(starts, ss.size)) - pos)
  return pos, neg, ss[starts]


def exact_curve_metrics(scores, labels, sample_weight=None) -> dict:
  """auroc, auprc, threshold, f1, dice, iou of the pooled pixels (exact, sort-based)."""
  s, y, w = _flat(scores, labels, sample_weight)
  out = curve_metrics(*_exact_levels(s, y, w))
  return {k: float(v) for k, v in out.items()}


def weighted_aurocs(scores, labels, weights) -> np.ndarray:
  """Pixel AUROC under each row of `weights` [R, N] (e.g. bootstrap multiplicities), from one sort
  of the N scores: [R]."""
  s, y, _ = _flat(scores, labels)
  w = np.asarray(weights, np.float64)
  if w.ndim != 2 or w.shape[1] != s.size:
    raise ValueError(f'weights must be [runs, {s.size}], got shape {w.shape}')
  return curve_metrics(*_exact_levels(s, y, w))['auroc']


def _group_levels(scores, labels, groups):
  """One sort for every group: (group names [G], pos [G, L], neg [G, L], thresholds [L])."""
  s, y, _ = _flat(scores, labels)
  g = np.asarray(groups).reshape(-1)
  if g.shape != s.shape:
    raise ValueError(f'groups ({np.shape(groups)}) and scores ({np.shape(scores)}) differ in size')
  names = np.unique(g)
  one_hot = (g[None, :] == names[:, None]).astype(np.float64)  # [G, N]
  return (names, *_exact_levels(s, y, one_hot))


def _macro_dice(pos, neg, thresholds) -> tuple[float, float]:
  tp, fp = np.cumsum(pos, axis=-1), np.cumsum(neg, axis=-1)
  p = tp[:, -1:]
  if not (p > 0).any():
    raise ValueError('macro_dice_threshold: no group has a positive pixel')
  dice = 2.0 * tp[p[:, 0] > 0] / (tp + fp + p)[p[:, 0] > 0]
  mean = dice.mean(axis=0)
  k = int(np.argmax(mean))
  return float(thresholds[k]), float(mean[k])


def macro_dice_threshold(scores, labels, groups) -> tuple[float, float]:
  """(threshold, mean Dice) maximizing the MEAN over groups of each group's Dice at one shared
  threshold (predicted positive = score >= threshold); groups without a positive are skipped.

  Dice_g(k) = 2 TP_g(k) / (TP_g(k) + FP_g(k) + P_g) at every distinct level k of the pooled scores
  (one sort). Unlike the pooled best Dice, a group with many high scores (an easy kind of
  anomaly) cannot pull the threshold to itself."""
  return _macro_dice(*_group_levels(scores, labels, groups)[1:])


def grouped_curve_metrics(scores, labels, groups) -> dict:
  """Everything the calibration ranks by, from ONE sort of the pooled scores:
  {'pooled': exact_curve_metrics, 'by_group': {name: exact_curve_metrics of that group},
  'macro_threshold': (threshold, mean Dice) of `macro_dice_threshold`}.

  A group's counts per pooled level are its own curve (levels it has no pixel at add nothing), so
  each group's metrics equal those of its pixels alone."""
  names, pos, neg, thresholds = _group_levels(scores, labels, groups)
  as_float = lambda m, i=(): {k: float(v[i]) for k, v in m.items()}
  by_group = curve_metrics(pos, neg, thresholds)
  return {'pooled': as_float(curve_metrics(pos.sum(0), neg.sum(0), thresholds)),
          'by_group': {n.item(): as_float(by_group, i) for i, n in enumerate(names)},
          'macro_threshold': _macro_dice(pos, neg, thresholds)}


def pixel_auroc(scores, labels, sample_weight=None) -> float:
  """Pixel AUROC (trapezoidal, ties as sklearn); NaN if only one class is present."""
  return exact_curve_metrics(scores, labels, sample_weight)['auroc']


def pixel_auprc(scores, labels, sample_weight=None) -> float:
  """Average precision AP = sum_k (R_k - R_{k-1}) P_k (sklearn's definition); NaN if no positive."""
  return exact_curve_metrics(scores, labels, sample_weight)['auprc']


def operating_point(scores, labels) -> tuple[float, float]:
  """(threshold, F1) of the best F1 on the PR curve; predicted positive = score >= threshold."""
  m = exact_curve_metrics(scores, labels)
  return m['threshold'], m['f1']


def _overlap_counts(pred, labels):
  p = np.asarray(pred).reshape(-1) > 0
  y = np.asarray(labels).reshape(-1) > 0
  if p.shape != y.shape:
    raise ValueError(f'pred ({np.shape(pred)}) and labels ({np.shape(labels)}) differ in size')
  inter = int(np.count_nonzero(p & y))
  return inter, int(np.count_nonzero(p)), int(np.count_nonzero(y))


def dice(pred, labels) -> float:
  """2 |A n B| / (|A| + |B|) over all pixels (1.0 when both are empty)."""
  inter, a, b = _overlap_counts(pred, labels)
  return 1.0 if a + b == 0 else 2.0 * inter / (a + b)


def iou(pred, labels) -> float:
  """|A n B| / |A u B| over all pixels (1.0 when both are empty)."""
  inter, a, b = _overlap_counts(pred, labels)
  union = a + b - inter
  return 1.0 if union == 0 else inter / union


AUPRO_MAX_FPR = 0.3  # MVTec AD's integration limit


def region_weights(labels, connectivity: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """(weights [N, H, W], regions per image [N]): 1 / |region| on each anomalous pixel, 0 elsewhere.

  Regions = connected components of each image's mask (connectivity 2 = 8-neighbourhood), labelled
  for the whole batch in one `scipy.ndimage.label` call whose structure links no two images.
  Summed over the pixels above a threshold and divided by the number of regions, they give the
  per-region overlap PRO(t) = mean over regions of |{score >= t} n region| / |region|.
  """
  y = np.asarray(labels) > 0
  if y.ndim != 3:
    raise ValueError(f'region_weights needs labels [N, H, W], got shape {y.shape}')
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = ndimage.generate_binary_structure(2, connectivity)
  comp, k = ndimage.label(y, structure=structure)
  sizes = np.bincount(comp.ravel(), minlength=k + 1).astype(np.float64)
  sizes[0] = np.inf  # background: weight 0
  weights = 1.0 / sizes[comp]
  firsts = ndimage.find_objects(comp)  # one slice tuple per region: its image is its first axis
  per_image = np.bincount([sl[0].start for sl in firsts], minlength=y.shape[0]) if k else \
      np.zeros(y.shape[0], np.int64)
  return weights, per_image.astype(np.int64)


def pro_area(pro_mass, neg, n_regions, max_fpr: float = AUPRO_MAX_FPR):
  """Normalized area under PRO(FPR) for FPR in [0, max_fpr], from per-level sums [..., L] (levels
  in descending threshold order): pro_mass = sum of region weights, neg = healthy pixels, and
  n_regions [...]. PRO_k = cumsum(pro_mass)_k / n_regions, FPR_k = cumsum(neg)_k / N, from (0, 0);
  trapezoids, the one that crosses max_fpr cut there by linear interpolation; / max_fpr.
  NaN where there is no region or no healthy pixel."""
  if not 0 < max_fpr <= 1:
    raise ValueError(f'max_fpr must be in (0, 1], got {max_fpr}')
  pro_mass, neg = np.asarray(pro_mass, np.float64), np.asarray(neg, np.float64)
  n_regions = np.asarray(n_regions, np.float64)
  zero = np.zeros(pro_mass.shape[:-1] + (1,))
  with np.errstate(divide='ignore', invalid='ignore'):
    pro = np.concatenate([zero, np.cumsum(pro_mass, -1)], -1) / n_regions[..., None]
    fpr = np.cumsum(neg, -1)
    fpr = np.concatenate([zero, fpr], -1) / fpr[..., -1:]
    x0, x1 = fpr[..., :-1], fpr[..., 1:]
    slope = np.where(x1 > x0, (pro[..., 1:] - pro[..., :-1]) / (x1 - x0), 0.0)
    c0, c1 = np.minimum(x0, max_fpr), np.minimum(x1, max_fpr)
    v0 = pro[..., :-1] + slope * (c0 - x0)
    v1 = pro[..., :-1] + slope * (c1 - x0)
    area = np.sum((c1 - c0) * (v0 + v1), -1) / (2.0 * max_fpr)
  return np.where((n_regions > 0) & np.isfinite(fpr[..., -1]), area, np.nan)


def aupro(scores, labels, max_fpr: float = AUPRO_MAX_FPR, connectivity: int = 2) -> float:
  """Normalised area under PRO(FPR) for FPR in [0, max_fpr] (Bergmann et al., MVTec AD).

  scores, labels [N, H, W]. PRO(t) = mean over all regions (`region_weights`) of
  |{score >= t} n region| / |region|, FPR(t) = |{score >= t} n negatives| / |negatives|; exact
  over all distinct thresholds (`pro_area`). NaN without a region or without a healthy pixel.
  """
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels) > 0
  if s.shape != y.shape or s.ndim != 3:
    raise ValueError(f'aupro needs scores and labels [N,H,W], got {s.shape}, {y.shape}')
  weights, per_image = region_weights(y, connectivity)
  # Per-level sums of two weightings from one sort (label 1 everywhere: `pos` sums the weights).
  sums, _, _ = _exact_levels(s.reshape(-1), np.ones(s.size, bool),
                             np.stack([weights.reshape(-1), (~y).reshape(-1).astype(np.float64)]))
  return float(pro_area(sums[0], sums[1], per_image.sum(), max_fpr))


def subject_key(subject) -> Hashable:
  """A subject as the accumulators key it: numpy scalars as Python values, bytes decoded."""
  key = subject.item() if isinstance(subject, np.generic) else subject
  return key.decode() if isinstance(key, bytes) else key


def bootstrap_weights(num_subjects: int, runs: int, seed: int) -> np.ndarray:
  """Subject weights [1 + runs, S]: row 0 all ones (the data as is), then one row per run of
  multiplicities m_r ~ Multinomial(S, 1/S) drawn from np.random.default_rng(seed)."""
  s = int(num_subjects)
  rng = np.random.default_rng(seed)
  mult = rng.multinomial(s, np.full(s, 1.0 / s), size=runs).astype(np.float64) if runs else \
      np.zeros((0, s))
  return np.concatenate([np.ones((1, s)), mult], axis=0)


class StreamingRange:
  """Running (min, max) of scores, for a first pass that fixes the histogram range."""

  def __init__(self):
    self.lo, self.hi = math.inf, -math.inf

  @classmethod
  def merge(cls, ranges: Sequence['StreamingRange']) -> 'StreamingRange':
    """The range of everything the given ones saw: (min of lo, max of hi)."""
    out = cls()
    for r in ranges:
      out.lo, out.hi = min(out.lo, r.lo), max(out.hi, r.hi)
    return out

  def add(self, scores, valid=None) -> None:
    s = np.asarray(scores)
    if valid is not None:
      s = s[np.asarray(valid, bool)]
    if s.size:
      self.lo = min(self.lo, float(np.min(s)))
      self.hi = max(self.hi, float(np.max(s)))

  @property
  def range(self) -> tuple[float, float]:
    """(lo, hi) widened by one part in 1e6 so that the maximum lies inside the last bin."""
    if not math.isfinite(self.lo):
      raise ValueError('StreamingRange saw no scores')
    pad = max(abs(self.hi - self.lo), abs(self.hi), 1e-12) * 1e-6
    return self.lo, self.hi + pad
