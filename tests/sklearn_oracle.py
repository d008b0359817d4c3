"""Independent oracles of the metric tests: whole-set metrics of (filtered) arrays computed with
scikit-learn alone, and per-image Dice / IoU written out straightforwardly."""
import math

import numpy as np
from sklearn import metrics as skm


def whole_set_metrics(z, y, n_sigma: float) -> dict:
  """AUROC, AP, Dice/IoU at the best-F1 threshold (mask z >= t) and at N sigma (mask z > N)."""
  z, y = np.asarray(z, np.float64).reshape(-1), np.asarray(y).reshape(-1) > 0
  prec, rec, thr = skm.precision_recall_curve(y, z)
  f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)[:-1]
  k = int(np.argmax(f1))
  return {'auroc': skm.roc_auc_score(y, z), 'auprc': skm.average_precision_score(y, z),
          'op_dice': f1[k], 'op_iou': skm.jaccard_score(y, z >= thr[k]),
          'ns_dice': skm.f1_score(y, z > n_sigma, zero_division=1.0),
          'ns_iou': skm.jaccard_score(y, z > n_sigma, zero_division=1.0)}


def _per_image_counts(pred, labels):
  """[N, ...] -> per-image (inter, |pred|, |label|) int64 arrays [N]."""
  p = np.asarray(pred) > 0
  y = np.asarray(labels) > 0
  if p.shape != y.shape or p.ndim < 2:
    raise ValueError(f'per-image metrics need equal shapes [N, ...], got {p.shape}, {y.shape}')
  p = p.reshape(p.shape[0], -1)
  y = y.reshape(y.shape[0], -1)
  return (np.count_nonzero(p & y, axis=1), np.count_nonzero(p, axis=1),
          np.count_nonzero(y, axis=1))


def mean_dice_per_image(pred, labels) -> float:
  """Mean over images with a non-empty ground truth of the per-image Dice ([N, ...] arrays)."""
  inter, a, b = _per_image_counts(pred, labels)
  keep = b > 0
  return float(np.mean(2.0 * inter[keep] / (a[keep] + b[keep]))) if keep.any() else math.nan


def mean_iou_per_image(pred, labels) -> float:
  """Mean over images with a non-empty ground truth of the per-image IoU ([N, ...] arrays)."""
  inter, a, b = _per_image_counts(pred, labels)
  keep = b > 0
  return float(np.mean(inter[keep] / (a[keep] + b[keep] - inter[keep]))) if keep.any() else math.nan
