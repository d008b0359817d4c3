"""Evaluation curves: ROC and PR points, the z histogram, their PNG figures.

Input: `PixelMetricsAccumulator.curve_levels()`, the anomalous and healthy pixel counts (pos_k,
neg_k) per threshold level k, thresholds descending, predicted positive = score >= threshold_k
(exact path: one level per distinct score; binned: one per bin, its lower edge): the counts that
metrics.json's AUROC, AUPRC and operating point are computed from. With TP_k = sum_{j<=k} pos_j,
FP_k likewise, P = TP_L and N = FP_L, the written points lose nothing the metrics need:

  ROC: (0, 0), then (FP_k / N, TP_k / P) at every level where the curve turns (points inside a
       straight run, and empty levels, are dropped): trapezoid(tpr, fpr) = AUROC;
  PR:  (R_k = TP_k / P, Prec_k = TP_k / (TP_k + FP_k)) at every level holding anomalous pixels
       (the others add nothing to AP): sum_k (R_k - R_{k-1}) Prec_k with R_0 = 0 = AUPRC.

So the points stay few even on the exact path (at most about twice the runs of one class along
the sorted scores for ROC, the anomalous levels for PR) and the areas integrate back exactly.
"""
from __future__ import annotations

import os

import numpy as np

from sano_jax import files


def _levels(pos, neg, thresholds):
  pos = np.asarray(pos, np.float64)
  neg = np.asarray(neg, np.float64)
  thr = np.asarray(thresholds, np.float64)
  if not pos.shape == neg.shape == thr.shape or pos.ndim != 1:
    raise ValueError(f'pos, neg and thresholds must be 1-D of one length, got {pos.shape}, '
                     f'{neg.shape}, {thr.shape}')
  return pos, neg, thr


def roc_points(pos, neg, thresholds) -> dict[str, np.ndarray]:
  """{fpr, tpr, threshold}: the ROC vertices, (0, 0) first (threshold +inf). Level k is kept
  where the direction (pos_k : neg_k) of its segment differs from the next one's."""
  pos, neg, thr = _levels(pos, neg, thresholds)
  keep = (pos + neg) > 0
  pos, neg, thr = pos[keep], neg[keep], thr[keep]
  turn = np.ones(pos.shape, bool)
  turn[:-1] = pos[:-1] * neg[1:] != neg[:-1] * pos[1:]
  p, n = pos.sum(), neg.sum()
  with np.errstate(divide='ignore', invalid='ignore'):
    tpr = np.cumsum(pos)[turn] / p
    fpr = np.cumsum(neg)[turn] / n
  return {'fpr': np.concatenate([[0.0], fpr]), 'tpr': np.concatenate([[0.0], tpr]),
          'threshold': np.concatenate([[np.inf], thr[turn]])}


def pr_points(pos, neg, thresholds) -> dict[str, np.ndarray]:
  """{recall, precision, threshold} at the levels holding anomalous pixels, recall ascending."""
  pos, neg, thr = _levels(pos, neg, thresholds)
  tp, fp = np.cumsum(pos), np.cumsum(neg)
  keep = pos > 0
  with np.errstate(divide='ignore', invalid='ignore'):
    return {'recall': tp[keep] / tp[-1], 'precision': tp[keep] / (tp[keep] + fp[keep]),
            'threshold': thr[keep]}


def point_at(pos, neg, thresholds, threshold: float) -> dict[str, float]:
  """{fpr, tpr, precision} of the mask score >= threshold, from the levels at or above it (exact
  for a threshold that is a level, as the operating point is)."""
  pos, neg, thr = _levels(pos, neg, thresholds)
  above = thr >= threshold
  tp, fp = pos[above].sum(), neg[above].sum()
  with np.errstate(divide='ignore', invalid='ignore'):
    return {'fpr': float(fp / neg.sum()), 'tpr': float(tp / pos.sum()),
            'precision': float(tp / (tp + fp))}


def z_histogram(pos, neg, thresholds, *, num_bins: int = 100, quantile: float = 0.999,
                marks: tuple[float, ...] = ()) -> dict[str, np.ndarray]:
  """{edges [B+1], anomalous [B], healthy [B]}: pixel counts per equal bin of the score from the
  lowest level to the `quantile` of all pixels (and past every mark), higher scores in the last
  bin."""
  pos, neg, thr = _levels(pos, neg, thresholds)
  asc = np.argsort(thr, kind='stable')
  counts = (pos + neg)[asc]
  cdf = np.cumsum(counts) / max(counts.sum(), 1.0)
  lo = float(thr[asc][0])
  hi = float(thr[asc][min(np.searchsorted(cdf, quantile), len(cdf) - 1)])
  hi = max([hi] + [1.05 * m for m in marks if np.isfinite(m)])
  if not hi > lo:
    hi = lo + 1.0
  edges = np.linspace(lo, hi, num_bins + 1)
  clipped = np.clip(thr, lo, hi)
  return {'edges': edges, 'anomalous': np.histogram(clipped, edges, weights=pos)[0],
          'healthy': np.histogram(clipped, edges, weights=neg)[0]}


def curve_data(levels, op_threshold: float, n_sigma: dict) -> dict[str, np.ndarray]:
  """Everything the curve figures draw, as flat arrays (WORKDIR/eval/curves.npz): roc_{fpr, tpr,
  threshold}, pr_{recall, precision, threshold}, op_{threshold, fpr, tpr, precision},
  n_sigma_{threshold, fpr, tpr, precision} (from metrics.json's n_sigma entry: mask score > N),
  hist_{edges, anomalous, healthy}, prevalence = P / (P + N)."""
  pos, neg, thr = _levels(*levels)
  out = {f'roc_{k}': v for k, v in roc_points(pos, neg, thr).items()}
  out.update({f'pr_{k}': v for k, v in pr_points(pos, neg, thr).items()})
  op = point_at(pos, neg, thr, op_threshold)
  out.update({f'op_{k}': np.float64(v) for k, v in op.items()})
  out['op_threshold'] = np.float64(op_threshold)
  out.update({f'n_sigma_{k}': np.float64(np.nan if n_sigma.get(k) is None else n_sigma[k])
              for k in ('threshold', 'fpr', 'tpr', 'precision')})
  hist = z_histogram(pos, neg, thr, marks=(op_threshold, float(out['n_sigma_threshold'])))
  out.update({f'hist_{k}': v for k, v in hist.items()})
  out['prevalence'] = np.float64(pos.sum() / max(pos.sum() + neg.sum(), 1.0))
  return out


def save_points(data: dict, path: str) -> str:
  """`curve_data` as an .npz, written atomically (local or gs://)."""
  files.save_npz(path, **data)
  return path


# ---------------------------------------------------------------------------------------------
# Figures.


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# PNG rendered in memory, written atomically (local or gs://): an interrupted run leaves no
# half-written file. evaluate.py, groups.py and compare.py save their figures with it too.
save_figure = files.save_figure


def _thin(*arrays, limit: int = 20000):
  """At most `limit` evenly spaced points (first and last kept) for drawing only."""
  n = len(arrays[0])
  if n <= limit:
    return arrays
  idx = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
  return tuple(a[idx] for a in arrays)


def _marks(ax, data, x_key, y_key, n_sigma: float):
  """The operating point and the N-sigma point on a curve panel."""
  ax.plot(data[f'op_{x_key}'], data[f'op_{y_key}'], 'o', color='tab:red', ms=7,
          label=f"operating point (z >= {float(data['op_threshold']):.2f})")
  ax.plot(data[f'n_sigma_{x_key}'], data[f'n_sigma_{y_key}'], 's', color='tab:green', ms=7,
          label=f"N = {n_sigma:.3g} sigma (z > {float(data['n_sigma_threshold']):.2f})")


def _finish(plt, fig, ax, path: str, legend_loc: str) -> str:
  """Legend, layout, an atomic PNG at `path`; closes the figure."""
  ax.legend(loc=legend_loc, fontsize=8)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)
  return path


def write_figures(data: dict, out_dir: str, *, auroc, auprc, n_sigma: float,
                  title: str = '') -> dict[str, str]:
  """roc.png, pr.png and z_histogram.png in `out_dir`; returns {name: path}."""
  plt = pyplot()
  files.makedirs(out_dir)
  num = lambda v: 'n/a' if v is None else f'{v:.3f}'
  paths = {}

  fig, ax = plt.subplots(figsize=(5.2, 5.0))
  ax.plot(*_thin(data['roc_fpr'], data['roc_tpr']), color='tab:blue', label=f'AUROC {num(auroc)}')
  ax.plot([0, 1], [0, 1], ':', color='gray', lw=1)
  _marks(ax, data, 'fpr', 'tpr', n_sigma)
  ax.set(xlabel='false positive rate (healthy pixels)',
         ylabel='true positive rate (anomalous pixels)', xlim=(0, 1), ylim=(0, 1.01),
         title=f'ROC {title}'.strip())
  paths['roc'] = _finish(plt, fig, ax, os.path.join(out_dir, 'roc.png'), 'lower right')

  fig, ax = plt.subplots(figsize=(5.2, 5.0))
  ax.plot(*_thin(data['pr_recall'], data['pr_precision']), color='tab:blue', drawstyle='steps-pre',
          label=f'AUPRC (AP) {num(auprc)}')
  ax.axhline(float(data['prevalence']), ls=':', color='gray', lw=1, label='prevalence')
  _marks(ax, data, 'tpr', 'precision', n_sigma)
  ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.01),
         title=f'precision-recall {title}'.strip())
  paths['pr'] = _finish(plt, fig, ax, os.path.join(out_dir, 'pr.png'), 'upper right')

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  edges = data['hist_edges']
  for key, color in (('healthy', 'tab:blue'), ('anomalous', 'tab:orange')):
    counts = data[f'hist_{key}']
    density = counts / max(counts.sum(), 1.0) / np.diff(edges)
    ax.stairs(density, edges, color=color, label=f'{key} pixels ({int(counts.sum())})')
  ax.axvline(float(data['op_threshold']), color='tab:red', ls='--',
             label=f"operating point {float(data['op_threshold']):.2f}")
  ax.axvline(float(data['n_sigma_threshold']), color='tab:green', ls='--',
             label=f"N = {n_sigma:.3g} sigma: {float(data['n_sigma_threshold']):.2f}")
  ax.set_yscale('log')
  ax.set(xlabel='z (healthy std units); last bin holds the tail', ylabel='density',
         title=f'z on healthy vs anomalous pixels {title}'.strip())
  paths['z_histogram'] = _finish(plt, fig, ax, os.path.join(out_dir, 'z_histogram.png'), 'best')
  return paths
