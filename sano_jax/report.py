"""The evaluation's report, apart from its maths: metrics.json's JSON, the Fig. 1-style grids, the
ROC / PR curves' files, TensorBoard summaries, and the console summaries."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from sano_jax import curves
from sano_jax import files
from sano_jax import groups as groups_lib
from sano_jax import metrics as metrics_lib
from sano_jax import summaries


def json_safe(x):
  """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


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


class FigureSet:
  """The figure rows: `pick_rows` over the whole test set (sizes recorded during the pass, the
  chosen images read again and scored after it), so memory stays bounded."""

  def __init__(self, k: int):
    self.k = k
    self.sizes: dict[int, int] = {}

  def add(self, masks, indices, valid):
    for i in np.flatnonzero(valid):
      self.sizes[int(indices[i])] = int(masks[i].sum())

  @classmethod
  def merge(cls, parts: list['FigureSet']) -> 'FigureSet':
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


def write_summaries(log_dir: str, step: int, scalars: dict, images: dict[str, str]) -> bool:
  """TensorBoard scalars (None skipped) and PNG images (tag -> path) in `log_dir`, replacing an
  earlier evaluation's, with flax.metrics.tensorboard (training's writer); False without
  TensorFlow."""
  files.rmtree(log_dir)  # the writer itself goes through TensorFlow's gfile, which speaks gs://
  writer = summaries.tensorboard_writer(log_dir, auto_flush=False)
  if writer is None:
    return False
  for tag, value in scalars.items():
    if value is not None:
      writer.scalar(tag, float(value), step)
  for tag, path in images.items():
    with files.path(path).open('rb') as f, Image.open(f) as im:
      writer.image(tag, np.asarray(im.convert('RGB')), step)
  writer.close()
  return True


def summary_scalars(out: dict) -> dict:
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


def write_curves(acc, out: dict, eval_dir: str, n_sigma: float, title: str) -> dict:
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


def _num(v) -> str:
  return 'n/a' if v is None else f'{v:.3f}'  # NaN is written as null


def brief_summary(metrics: dict, workdir: str, seconds: float) -> str:
  """Five lines for the end of `make demo`: the metrics, where the figures are, how to look."""
  ns, op, base = metrics['n_sigma'], metrics['operating_point'], metrics.get('baseline') or {}
  loc = metrics['localization']
  return '\n'.join([
      f"done in {seconds / 60:.1f} min: {metrics['data']['dataset']}, {metrics['num_images']} test "
      f"images; pixel AUROC {_num(metrics.get('auroc'))} ± {_num(metrics.get('auroc_std'))} (trivial "
      f"baseline {_num(base.get('auroc'))}), AUPRO {_num(metrics.get('aupro'))}",
      f"Dice at the label-free threshold ({loc['rule']}, N = {ns['n']:.3g}): {_num(ns.get('dice'))}; "
      f"at the best-F1 threshold (uses test labels): {_num(op.get('dice'))}",
      f"figures: {os.path.join(workdir, 'eval', 'figures')}/ (test_grid_*.png, roc.png, pr.png, "
      'z_histogram.png, groups_*.png)',
      f"all metrics: {os.path.join(workdir, 'eval', 'metrics.json')} (the full summary: "
      f"{os.path.join(workdir, 'eval', SUMMARY_FILE)})",
      f'look at them: tensorboard --logdir={workdir}'])


SUMMARY_FILE = 'summary.txt'


def format_summary(metrics: dict, workdir: str, seconds: float) -> str:
  """A short table of `metrics` (as written to metrics.json) for the end of a run."""
  op, ns, base = metrics['operating_point'], metrics['n_sigma'], metrics.get('baseline') or {}
  pm = lambda key, d=metrics: f"{_num(d.get(key))} ± {_num(d.get(key + '_std'))}"
  name = metrics['localization'].get('method', 'sano')
  rows = [
      f"{name} on {metrics['data']['dataset']}: {metrics['num_images']} test images, "
      f"{metrics['num_subjects']} subjects ({seconds / 60:.1f} min); "
      + (f"t={','.join(f'{t:g}' for t in metrics['localization']['t'])}, "
         if None not in metrics['localization']['t'] else '')
      + f"{metrics['localization']['rule']} healthy statistics",
      f"  pixel AUROC   {pm('auroc')}     trivial baseline {_num(base.get('auroc'))}",
      f"  pixel AUPRC   {pm('auprc')}     trivial baseline {_num(base.get('auprc'))}",
      f"  AUPRO@{metrics.get('aupro_max_fpr', 0.3):g}     {pm('aupro')}     trivial baseline "
      f"{_num(base.get('aupro'))}",
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


def write_report(out: dict, figure_rows: list, acc, eval_dir: str, *, step: int,
                 n_threshold: float, title: str) -> dict:
  """Writes the evaluation's figures (Fig. 1-style grids of `figure_rows`, the ROC / PR curves and
  z histogram of `acc`, a bar chart per group attribute) and its TensorBoard summaries at `step`
  into `eval_dir`; returns `out` (the metrics dict) with their paths, JSON-safe."""
  files.makedirs(eval_dir)
  n_sigma = out['n_sigma']['n']
  figures = write_figures(figure_rows, os.path.join(eval_dir, 'figures'),
                          op_threshold=float(out['operating_point']['threshold']),
                          n_sigma_threshold=n_threshold, n_sigma=n_sigma)
  out['figures'] = figures
  out['curves'] = write_curves(acc, out, eval_dir, n_sigma, title)
  for attr, section in out.get('groups', {}).items():
    section['figure'] = groups_lib.write_figure(
        attr, json_safe(section), os.path.join(eval_dir, 'figures', f'groups_{attr}.png'))
  out = json_safe(out)
  images = {f'eval/{os.path.splitext(os.path.basename(p))[0]}': p
            for p in figures + list(out['curves'].get('figures', {}).values())
            + [s['figure'] for s in out.get('groups', {}).values()]}
  out['tensorboard'] = os.path.join(eval_dir, 'tensorboard')
  if not write_summaries(out['tensorboard'], step, summary_scalars(out), images):
    out['tensorboard'] = None
  return out
