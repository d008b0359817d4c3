"""Table 1 of the paper for any set of evaluated runs: one table (Markdown + JSON) and one figure.

`train_all(config, root, methods)` first trains and evaluates every method on one config (same
data, steps and batch) into ROOT/<method>, skipping runs already evaluated.

`compare(workdirs, out_dir)` reads each run's eval/metrics.json (written by run_eval.py, the same
evaluation for every method), checks that all runs were tested on the same data, and writes
  OUT/compare.md    AUROC, AUPRC, AUPRO, Dice and IoU at the operating point and at N sigma (label-free),
                    each +- the subject-stratified bootstrap std; training img/s and wall seconds
  OUT/compare.json  the same numbers
  OUT/compare.png   the same test images localized by every method side by side (rows chosen across
                    anomaly sizes: largest, median, smallest, and a healthy image)
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np

from sano_jax import checkpointing
from sano_jax import evaluate
from sano_jax import files
from sano_jax import image_checks
from sano_jax import input_pipeline
from sano_jax import methods
from sano_jax import report
from sano_jax import rundir
from sano_jax import summaries
from sano_jax import train

COLUMNS = (('auroc', 'AUROC'), ('auprc', 'AUPRC'), ('aupro', 'AUPRO'), ('op_dice', 'Dice @ OP'),
           ('op_iou', 'IoU @ OP'),
           ('ns_dice', 'Dice @ Nσ*'), ('ns_iou', 'IoU @ Nσ*'))


def training_summary(workdir: str) -> dict:
  """Median training img/s and the wall seconds of the training steps, from WORKDIR/metrics.jsonl."""
  path = os.path.join(workdir, summaries.METRICS_LOG)
  if not files.exists(path):
    return {'train_images_per_s': None, 'train_seconds': None}
  rows = [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]
  speeds = [r['perf/images_per_s'] for r in rows if 'perf/images_per_s' in r]
  timing = [r for r in rows if 'perf/wall_s' in r]
  return {'train_images_per_s': float(np.median(speeds)) if speeds else None,
          'train_seconds': float(timing[-1]['perf/wall_s']) if timing else None}


def row_of(workdir: str) -> dict:
  """One table row from a run's eval/metrics.json."""
  m = files.read_json(os.path.join(workdir, 'eval', 'metrics.json'),
                      f'evaluate the run first: python run_eval.py --workdir={workdir}')
  op, ns = m['operating_point'], m['n_sigma']
  row = {'workdir': workdir, 'method': m['localization'].get('method', 'sano'), 'dataset': m['data']['dataset'],
         'test_split': m['data']['test_split'], 'num_images': m['num_images'],
         'rule': m['localization']['rule'], 'n_sigma': ns['n']}
  for key, src, name in (('auroc', m, 'auroc'), ('auprc', m, 'auprc'), ('aupro', m, 'aupro'),
                         ('op_dice', op, 'dice'),
                         ('op_iou', op, 'iou'), ('ns_dice', ns, 'dice'), ('ns_iou', ns, 'iou')):
    row[key], row[key + '_std'] = src.get(name), src.get(name + '_std')
  row['baseline_auroc'] = (m.get('baseline') or {}).get('auroc')
  row['baseline_sigma'] = m['localization'].get('smoothing_sigma')  # the baseline's smoothing
  row.update(training_summary(workdir))
  return row


def check_same_test_data(rows: Sequence[dict]) -> None:
  keys = {(r['dataset'], r['test_split'], r['num_images']) for r in rows}
  if len(keys) > 1:
    detail = '; '.join(f"{r['workdir']}: {r['dataset']}/{r['test_split']} ({r['num_images']} images)"
                       for r in rows)
    raise ValueError(f'the runs were not evaluated on the same test data: {detail}')


def markdown_table(rows: Sequence[dict]) -> str:
  """Table 1's layout; the best value of each column in bold."""
  fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'
  best = {k: max((r[k] for r in rows if r[k] is not None), default=None) for k, _ in COLUMNS}
  # Calibrated runs each choose their own rule and N: show them per row when they differ.
  per_row = len({(r['rule'], r['n_sigma']) for r in rows}) > 1
  head = (['method'] + [name for _, name in COLUMNS] + (['rule, N'] if per_row else [])
          + ['train img/s', 'train s'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['method']]
    for k, _ in COLUMNS:
      cell = f'{fmt(r[k])} ± {fmt(r[k + "_std"])}'
      cells.append(f'**{cell}**' if r[k] is not None and r[k] == best[k] else cell)
    if per_row:
      cells.append(f"{r['rule']}, {r['n_sigma']:.3g}")
    speed, secs = r['train_images_per_s'], r['train_seconds']
    cells += ['n/a' if speed is None else f'{speed:.0f}', 'n/a' if secs is None else f'{secs:.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  r0 = rows[0]
  lines.append('')
  threshold = ("each run's own rule and N (column 'rule, N')" if per_row else
               f"N = {r0['n_sigma']:g} of the healthy statistics ('{r0['rule']}' rule), for every "
               'method')
  lines.append(f"{r0['dataset']} ({r0['test_split']}, {r0['num_images']} images); ± is the std of "
               'the subject-stratified bootstrap. AUPRO: per-region overlap up to FPR 0.3. OP: the '
               'best-F1 threshold (uses test labels); Nσ*: the label-free threshold, '
               f"{threshold}. {baseline_note(rows)}")
  return '\n'.join(lines) + '\n'


def baseline_note(rows: Sequence[dict]) -> str:
  """The trivial baseline's AUROC (G_sigma * |x - mean training intensity|): it depends on the data
  and on sigma only, and each run smooths it with its own (calibrated) sigma, so one value per
  sigma, not the first run's alone."""
  found = {}
  for r in rows:
    if r['baseline_auroc'] is not None:
      found.setdefault(r['baseline_sigma'], r['baseline_auroc'])
  if not found:
    return 'Trivial baseline AUROC: n/a.'
  parts = [f'{v:.3f}' + ('' if s is None else f' at sigma {s:g}')
           for s, v in sorted(found.items(), key=lambda kv: (kv[0] is None, kv[0] or 0.0))]
  return ('Trivial baseline AUROC (G_sigma * |x - mean training intensity|, smoothed as each run '
          f"smooths its map): {', '.join(parts)}.")


def pick_examples(masks: np.ndarray) -> list[int]:
  """Indices of the test images with the largest, median and smallest anomaly, and a healthy one."""
  return report.pick_rows(masks.reshape(len(masks), -1).sum(axis=1), 4)


def write_figure(workdirs: Sequence[str], path: str, max_images: int = 256) -> str:
  """The same test images (from the first run's test split) localized by every run side by side:
  image | ground truth | each method's z-map with its N-sigma mask outlined."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  config = checkpointing.load_config(workdirs[0])
  source = input_pipeline.get_source(config, config.data.test_split)
  n = min(len(source), max_images)
  examples = [source[i] for i in range(n)]
  masks = np.stack([ex['mask'][..., 0] for ex in examples])
  picks = pick_examples(masks)
  images = image_checks.to_unit(np.stack([examples[i]['image'] for i in picks]))
  maps = []
  for wd in workdirs:
    cfg = checkpointing.load_config(wd)
    z, mask = rundir.load_localizer(wd)(images)
    maps.append((str(cfg.get('method', 'sano')), np.asarray(z), np.asarray(mask)))
  cols = 2 + len(maps)
  fig, axes = plt.subplots(len(picks), cols, figsize=(2.2 * cols, 2.2 * len(picks) + 0.4),
                           squeeze=False)
  for r, i in enumerate(picks):
    img = images[r][..., 0] if images.shape[-1] == 1 else images[r]
    panels = [('image', img, dict(cmap='gray', vmin=0, vmax=1)),
              ('ground truth', masks[i], dict(cmap='gray', vmin=0, vmax=1))]
    for name, z, _ in maps:
      panels.append((name, z[r], dict(cmap='inferno', vmin=0,
                                       vmax=max(float(np.percentile(z, 99.5)), 1e-6))))
    for c, (title, data, kw) in enumerate(panels):
      ax = axes[r, c]
      ax.imshow(data, interpolation='nearest', **kw)
      if c >= 2 and maps[c - 2][2][r].any():
        ax.contour(maps[c - 2][2][r].astype(float), levels=[0.5], colors='cyan', linewidths=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(title, fontsize=10)
    size = int(masks[i].sum())
    axes[r, 0].set_ylabel(f"{examples[i]['name']}\n{size} anomalous px" if size else
                          f"{examples[i]['name']}\nhealthy", fontsize=8)
  fig.suptitle('z-maps (each in its own healthy-std units); cyan: mask at N sigma', fontsize=9)
  fig.tight_layout()
  report.save_figure(fig, path)
  plt.close(fig)
  return path


def reuse_model(source_dir: str, workdir: str, config) -> bool:
  """A method that trains exactly another's model with its loss (`Method.reuses_model_of`, e.g.
  AnoDDPM of SANO): copy that trained run's checkpoints (not its statistics or evaluation) instead
  of training the same model twice. False (nothing copied) unless the models match."""
  source = methods.method_class(config).reuses_model_of
  if (source is None or not files.isdir(os.path.join(source_dir, checkpointing.BEST_DIR))
      or files.exists(workdir)):
    return False
  if checkpointing.model_signature(checkpointing.load_config(source_dir)) != {
      **checkpointing.model_signature(config), 'method': source}:
    return False
  files.copytree(source_dir, workdir, ignore=('eval', checkpointing.CONFIG_FILE, rundir.MANIFEST,
                                              rundir.PARTS_DIR) + rundir.LEGACY)
  checkpointing.save_config(config, workdir)
  return True


def train_all(config, root: str, names) -> list[str] | None:
  """Trains and evaluates each method (same data, steps and batch) into ROOT/<method>; None when a
  training was preempted (SIGTERM): it saved its checkpoint, nothing half-trained is evaluated,
  and the same call resumes it."""
  workdirs = []
  for name in names:
    methods.check_name(name)
    cfg = config.copy_and_resolve_references()
    cfg.method = name
    workdir = os.path.join(root, name)
    source = methods.method_class(cfg).reuses_model_of
    if source and reuse_model(os.path.join(root, source), workdir, cfg):
      print(f'[{name}] uses the {source} model trained in {os.path.join(root, source)} (same '
            'model, same loss); evaluating', flush=True)
      evaluate.evaluate(cfg, workdir)
    if not files.exists(os.path.join(workdir, 'eval', 'metrics.json')):
      tic, cpu = time.perf_counter(), time.process_time()
      print(f'[{name}] training {cfg.data.dataset} for {cfg.training.num_train_steps} steps in '
            f'{workdir}', flush=True)
      if not train.finished(train.train_and_evaluate(cfg, workdir), cfg):
        print(f'[{name}] preempted: its checkpoint is saved; run the same command again to resume',
              flush=True)
        return None
      print(f'[{name}] trained in {time.perf_counter() - tic:.0f} s wall, '
            f'{time.process_time() - cpu:.0f} CPU-s; evaluating', flush=True)
      evaluate.evaluate(cfg, workdir)
    workdirs.append(workdir)
  return workdirs


def compare(workdirs: Sequence[str], out_dir: str, *, figure: bool = True) -> dict:
  """Writes OUT/compare.{md,json,png}; returns {'rows': [...], 'markdown': str, 'figure': path}."""
  if not workdirs:
    raise ValueError('no workdirs to compare')
  rows = [row_of(wd) for wd in workdirs]
  check_same_test_data(rows)
  table = markdown_table(rows)
  files.atomic_write_text(os.path.join(out_dir, 'compare.md'), table)
  fig_path = write_figure(workdirs, os.path.join(out_dir, 'compare.png')) if figure else None
  out = {'rows': rows, 'markdown': table, 'figure': fig_path}
  files.atomic_write_json(os.path.join(out_dir, 'compare.json'), {'rows': rows, 'figure': fig_path})
  return out
