"""The independent oracle of the per-group tests: whole-set metrics of (filtered) arrays computed
with scikit-learn alone."""
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
