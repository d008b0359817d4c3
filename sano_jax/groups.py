"""Per-group metrics: metrics.json's `groups` section, its table and its bar charts.

`config.eval.group_by` names per-image attributes of the test split: a dataset's scalar features
(hands11k: skin_color, aspect_of_hand, gender, ...; the embedded textures: anomaly_source,
anomaly_size) or, for folder datasets, any column of `subjects_csv` besides name and subject
(keyed by the image's file name, else its stem, as the subject is). For each attribute a and each
value v, the test images with a = v are evaluated on their own exactly as the whole test set is:
one `PixelMetricsAccumulator` per value, with the whole set's bins, score range, N-sigma threshold
and exact/binned path, so an entry equals the whole-set metrics of the filtered images:

  num_images, num_anomalous_images, num_subjects, num_pixels, num_positive_pixels,
  auroc, auprc, operating_point {threshold, dice, iou} (the group's own best-F1 threshold: it uses
  the group's labels), n_sigma {n, dice, iou, fpr} (the label-free threshold shared by all groups;
  fpr = the share of the group's healthy pixels flagged), each but fpr with `_std` = the std over
  the subject-stratified bootstrap of the group's own subjects (seeded as the whole set's), and
  `reason` (None, or why a metric is null: a group without anomalous pixels has no AUROC, AUPRC,
  operating point or Dice/IoU; one without healthy pixels no AUROC).

The gap of a metric is best - worst over the groups with anomalous pixels (best and worst named on
the data as is); its interval resamples ALL test subjects jointly (the whole set's bootstrap draws,
so groups sharing subjects move together) and recomputes both groups' metric on each draw:
gap_std = std over the draws (ddof=1), gap_ci95 = their 2.5 and 97.5 percentiles.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from typing import Callable, Sequence

import numpy as np

from sano_jax import accumulator
from sano_jax import curves
from sano_jax import files
from sano_jax import metrics as metrics_lib

CONTRACT_KEYS = ('image', 'mask', 'subject', 'name')
MISSING = '(missing)'  # the value of an image that subjects_csv does not list, or an empty cell
# Gap metrics: name -> (label, path into a group entry, path into `run_values`).
METRICS = {
    'auroc': ('AUROC', ('auroc',), ('auroc',)),
    'auprc': ('AUPRC', ('auprc',), ('auprc',)),
    'aupro': ('AUPRO', ('aupro',), ('aupro',)),
    'dice_at_op': ('Dice at OP', ('operating_point', 'dice'), ('dice',)),
    'iou_at_op': ('IoU at OP', ('operating_point', 'iou'), ('iou',)),
    'dice_at_n_sigma': ('Dice at N sigma', ('n_sigma', 'dice'), ('fixed', 0, 'dice')),
    'iou_at_n_sigma': ('IoU at N sigma', ('n_sigma', 'iou'), ('fixed', 0, 'iou')),
}


# ---------------------------------------------------------------------------------------------
# Which attributes, and their values per image.


def parse_group_by(value) -> tuple[str, ...]:
  """config.eval.group_by (a tuple, or one comma-separated string as the command line gives
  it: 'skin_color,aspect_of_hand') -> attribute names, without empties or repeats."""
  if value is None:
    return ()
  items = [value] if isinstance(value, str) else list(value)
  names = [n.strip() for item in items for n in str(item).split(',')]
  return tuple(dict.fromkeys(n for n in names if n))


def source_attributes(source) -> tuple[str, ...]:
  """The per-image attributes of a test source: `ContractSource.attributes`, else (in-memory lists
  of contract dicts) the keys of its first example beyond the data contract."""
  attrs = getattr(source, 'attributes', None)
  if attrs is not None:
    return tuple(attrs)
  if len(source) == 0:
    return ()
  return tuple(k for k in source[0] if k not in CONTRACT_KEYS)


def read_csv_attributes(csv_path: str) -> tuple[tuple[str, ...], dict[str, dict[str, str]]]:
  """(extra columns, name -> {column: value}) of a folder dataset's subjects_csv: every column
  besides name and subject; ValueError naming the file when it has no name column."""
  text = files.read_bytes(csv_path).decode('utf-8-sig')  # local or gs://
  with io.StringIO(text, newline='') as f:
    reader = csv.DictReader(f)
    cols = [c.strip() for c in (reader.fieldnames or ()) if c is not None]
    if 'name' not in cols:
      raise ValueError(f'subjects_csv {csv_path} needs a name column; it has {sorted(cols)}')
    extra = tuple(c for c in cols if c not in ('name', 'subject'))
    table = {}
    for raw in reader:
      row = {k.strip(): (v or '').strip() for k, v in raw.items() if k is not None}
      table[row['name']] = {c: row.get(c) or MISSING for c in extra}
  return extra, table


@dataclasses.dataclass(frozen=True)
class GroupLookup:
  """Where each attribute's per-image values come from: `carried` ones ride in the evaluation
  batches (eval_iterator's extra_keys); the others are looked up in `table` by image name."""
  attributes: tuple[str, ...]
  carried: tuple[str, ...]
  table: dict | None = None

  def values(self, batch) -> dict[str, np.ndarray]:
    """attribute -> values [N] (str) of a flattened batch ({key: [N]}); padding gets ''."""
    out = {a: np.asarray(batch[a]).astype(str) for a in self.carried}
    if self.table is not None:
      names = np.asarray(batch['name']).astype(str)
      rows = [self.table.get(n, self.table.get(os.path.splitext(n)[0])) if n else None
              for n in names]
      for a in self.attributes:
        if a not in out:
          out[a] = np.array([(r or {}).get(a, MISSING) if n else ''
                             for r, n in zip(rows, names)], dtype=object).astype(str)
    return out


def resolve(config, source) -> GroupLookup | None:
  """The lookup of config.eval.group_by for the test `source` (None when it names nothing).

  ValueError naming the unknown attribute and the available ones (the source's attributes, and for
  folder datasets the extra columns of subjects_csv)."""
  wanted = parse_group_by(config.eval.get('group_by', ()))
  if not wanted:
    return None
  carried = source_attributes(source)
  columns, table = (), None
  csv_path = config.data.get('subjects_csv', None)
  if str(config.data.dataset) in ('folder', 'sano_folder') and csv_path:
    columns, table = read_csv_attributes(str(csv_path))
  unknown = [a for a in wanted if a not in carried and a not in columns]
  if unknown:
    where = f'the test split of {config.data.dataset!r}'
    available = sorted(set(carried) | set(columns))
    raise ValueError(
        f'config.eval.group_by names {unknown[0]!r}, which is not an attribute of {where}: '
        f'available are {available or "none"}'
        + (f' (subjects_csv {csv_path} columns besides name,subject)' if csv_path else '')
        + "; set --config.eval.group_by='' for no groups")
  return GroupLookup(wanted, tuple(a for a in wanted if a in carried),
                     table if any(a not in carried for a in wanted) else None)


# ---------------------------------------------------------------------------------------------
# Metrics.


class GroupedMetrics:
  """One accumulator per (attribute, value), made by `make_accumulator` (the whole set's
  settings), fed the images of that value; `compute` -> metrics.json's `groups` section."""

  def __init__(self, attributes: Sequence[str],
               make_accumulator: Callable[[], accumulator.PixelMetricsAccumulator]):
    self.attributes = tuple(attributes)
    self.make_accumulator = make_accumulator
    self.accumulators: dict[str, dict[str, accumulator.PixelMetricsAccumulator]] = {
        a: {} for a in self.attributes}
    # All subjects -> their first image index, in order of first appearance (the whole set's order).
    self._subjects: dict = {}
    self._seen = 0  # the next default image index

  def add(self, scores, labels, subjects, valid, values: dict[str, np.ndarray],
          indices=None) -> None:
    """A batch [B, ...] with its valid flags [B], attribute values {attribute: [B] str} and the
    images' indices in the whole set [B] (default: next in line; `merge` orders subjects by them)."""
    valid = np.asarray(valid, bool).reshape(-1)
    subjects = np.asarray(subjects).reshape(-1)
    if indices is None:
      indices = np.arange(self._seen, self._seen + valid.shape[0], dtype=np.int64)
    indices = np.asarray(indices, np.int64).reshape(-1)
    if valid.any():
      self._seen = max(self._seen, int(indices[valid].max()) + 1)
    for s, i in zip(subjects[valid], indices[valid]):
      key = metrics_lib.subject_key(s)
      self._subjects[key] = min(self._subjects.get(key, int(i)), int(i))
    for a in self.attributes:
      v = np.asarray(values[a]).reshape(-1)
      for value in np.unique(v[valid]):
        sel = valid & (v == value)
        key = str(value) or MISSING
        acc = self.accumulators[a].get(key)
        if acc is None:
          acc = self.accumulators[a][key] = self.make_accumulator()
        acc.add(scores[sel], labels[sel], subjects[sel], indices=indices[sel])

  @classmethod
  def merge(cls, parts: Sequence['GroupedMetrics']) -> 'GroupedMetrics':
    """The groups of everything the given parts saw (one per process, say): per (attribute, value)
    `PixelMetricsAccumulator.merge`, and all subjects ordered by their first image index (the
    joint bootstrap's columns), as one pass over the whole set in index order gives."""
    parts = list(parts)
    if not parts:
      raise ValueError('merge needs at least one GroupedMetrics')
    out = cls(parts[0].attributes, parts[0].make_accumulator)
    first: dict = {}
    for g in parts:
      if g.attributes != out.attributes:
        raise ValueError(f'cannot merge groups of {g.attributes} with groups of {out.attributes}')
      for key, i in g._subjects.items():  # pylint: disable=protected-access
        first[key] = min(first.get(key, i), i)
      out._seen = max(out._seen, g._seen)  # pylint: disable=protected-access
    out._subjects = {k: first[k] for k in sorted(first, key=first.__getitem__)}
    for a in out.attributes:
      values = sorted({v for g in parts for v in g.accumulators[a]})
      out.accumulators[a] = {v: accumulator.PixelMetricsAccumulator.merge(
          [g.accumulators[a][v] for g in parts if v in g.accumulators[a]]) for v in values}
    return out

  def compute(self, bootstrap_runs: int, seed: int, n_sigma: float | None = None) -> dict:
    """{attribute: {'values': {value: entry}, 'gap': {metric: gap}}} (see the module docstring);
    values in sorted order; n_sigma: the N reported in each entry's n_sigma (default: its
    threshold)."""
    joint = metrics_lib.bootstrap_weights(len(self._subjects), int(bootstrap_runs), seed)
    column = {s: i for i, s in enumerate(self._subjects)}
    out = {}
    for a in self.attributes:
      accs = dict(sorted(self.accumulators[a].items()))
      entries = {v: group_entry(acc.compute(bootstrap_runs, seed), n_sigma)
                 for v, acc in accs.items()}
      runs = {v: acc.run_values(joint[:, [column[s] for s in acc.subjects]])
              for v, acc in accs.items()}
      gaps = {m: gap({v: value_at(e, path) for v, e in entries.items()
                      if e['num_positive_pixels'] > 0},
                     {v: value_at(r, run_path)[1:] for v, r in runs.items()})
              for m, (_, path, run_path) in METRICS.items()}
      out[a] = {'values': entries, 'gap': gaps}
    return out


def value_at(tree, path):
  """tree[path[0]][path[1]]... (a metric inside a group entry or a run_values dict)."""
  for key in path:
    tree = tree[key]
  return tree


def _finite(x) -> float | None:
  return float(x) if x is not None and math.isfinite(x) else None


def group_entry(m: dict, n_sigma: float | None = None) -> dict:
  """One group's entry from its `PixelMetricsAccumulator.compute` dict: counts, AUROC, AUPRC, AUPRO,
  Dice/IoU at its operating point and at N sigma with their stds; null (and `reason`) where the
  group's pixels leave a metric undefined, never NaN."""
  op, ns = m['operating_point'], m['n_sigma'] or {}
  entry = {k: m[k] for k in ('num_images', 'num_anomalous_images', 'num_subjects', 'num_pixels',
                             'num_positive_pixels')}
  for k in ('auroc', 'auroc_std', 'auprc', 'auprc_std', 'aupro', 'aupro_std'):
    entry[k] = _finite(m[k])
  entry['operating_point'] = {k: _finite(op[k]) for k in ('threshold', 'threshold_std', 'dice',
                                                          'dice_std', 'iou', 'iou_std')}
  entry['n_sigma'] = {'n': ns.get('n') if n_sigma is None else n_sigma}
  entry['n_sigma'].update({k: _finite(ns.get(k)) for k in ('dice', 'dice_std', 'iou', 'iou_std',
                                                           'fpr')})
  reason = None
  if m['num_positive_pixels'] == 0:
    reason = (f"no anomalous pixels in this group's {m['num_images']} image(s): AUROC, AUPRC, the "
              'operating point and Dice/IoU at N sigma are undefined (n_sigma.fpr, the share of '
              'its pixels flagged, is not)')
    null = ('auroc', 'auroc_std', 'auprc', 'auprc_std')
    entry['operating_point'] = dict.fromkeys(entry['operating_point'])
    entry['n_sigma'].update(dict.fromkeys(('dice', 'dice_std', 'iou', 'iou_std')))
  elif m['num_positive_pixels'] == m['num_pixels']:
    reason = 'every pixel of this group is anomalous: AUROC is undefined'
    null = ('auroc', 'auroc_std')
  else:
    null = ()
  entry.update(dict.fromkeys(null))
  entry['reason'] = reason
  return entry


def gap(points: dict[str, float | None], runs: dict[str, np.ndarray]) -> dict:
  """Best - worst of `points` (value -> metric; None = undefined, left out) with the bootstrap
  std and 95% percentile interval of runs[best] - runs[worst] (per-draw arrays)."""
  defined = {v: x for v, x in points.items() if x is not None}
  if len(defined) < 2:
    return {'gap': None, 'reason': f'{len(defined)} group(s) with this metric defined; a gap needs '
                                   'two'}
  order = sorted(defined, key=lambda v: defined[v])
  worst, best = order[0], order[-1]
  draws = np.asarray(runs[best], np.float64) - np.asarray(runs[worst], np.float64)
  draws = draws[np.isfinite(draws)]
  enough = draws.size >= 2
  return {'best': best, 'worst': worst, 'best_value': defined[best],
          'worst_value': defined[worst], 'gap': defined[best] - defined[worst],
          'gap_std': float(np.std(draws, ddof=1)) if enough else None,
          'gap_ci95': [float(q) for q in np.percentile(draws, [2.5, 97.5])] if enough else None}


# ---------------------------------------------------------------------------------------------
# Reports.


def _pm(entry, path, digits=3) -> str:
  value = value_at(entry, path)
  if value is None:
    return 'n/a'
  std = value_at(entry, path[:-1] + (path[-1] + '_std',))
  return f'{value:.{digits}f}' + (f' ± {std:.{digits}f}' if std is not None else '')


def format_table(attribute: str, section: dict) -> str:
  """A Markdown table of one attribute's groups (mean ± bootstrap std) and its gaps."""
  head = (['value', 'images (anomalous)', 'subjects'] + [METRICS[m][0] for m in METRICS]
          + ['FPR at N sigma'])
  lines = ['| ' + ' | '.join([f'{attribute}'] + head[1:]) + ' |',
           '|' + '---|' * len(head)]
  for value, e in section['values'].items():
    cells = [value, f"{e['num_images']} ({e['num_anomalous_images']})", str(e['num_subjects'])]
    cells += [_pm(e, path) for _, path, _ in METRICS.values()]
    fpr = e['n_sigma']['fpr']
    cells.append('n/a' if fpr is None else f'{fpr:.4f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  cells = ['**gap** best - worst', '', '']
  for m in METRICS:
    g = section['gap'][m]
    if g['gap'] is None:
      cells.append('n/a')
    else:
      ci = g['gap_ci95']
      cells.append(f"{g['gap']:.3f} ({g['best']} - {g['worst']})"
                   + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else ''))
  cells.append('')
  lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_figure(attribute: str, section: dict, path: str) -> str:
  """One bar chart per metric (AUROC, AUPRC, AUPRO, Dice/IoU at OP and at N sigma) over the values of
  `attribute`, error bars = bootstrap std, 'n/a' where undefined; written to `path` (PNG)."""
  plt = curves.pyplot()
  values = list(section['values'])
  rows = math.ceil(len(METRICS) / 2)
  fig, axes = plt.subplots(rows, 2, figsize=(max(8.0, 1.0 + 0.5 * len(values) * 2), 3.5 * rows),
                           squeeze=False)
  for ax in axes.ravel()[len(METRICS):]:
    ax.set_visible(False)
  x = np.arange(len(values))
  labels = [f"{v}\n({section['values'][v]['num_images']})" for v in values]
  for ax, (m, (label, path_in, _)) in zip(axes.ravel(), METRICS.items()):
    means = [value_at(section['values'][v], path_in) for v in values]
    stds = [value_at(section['values'][v], path_in[:-1] + (path_in[-1] + '_std',)) for v in values]
    heights = [0.0 if y is None else y for y in means]
    errs = [0.0 if (y is None or s is None) else s for y, s in zip(means, stds)]
    ax.bar(x, heights, yerr=errs, capsize=3, color='tab:blue', alpha=0.8)
    for xi, y in zip(x, means):
      if y is None:
        ax.text(xi, 0.02, 'n/a', ha='center', va='bottom', fontsize=8, rotation=90)
    g = section['gap'][m]
    ax.set_title(label + ('' if g['gap'] is None else
                          f"\ngap {g['gap']:.3f}" + (f" ± {g['gap_std']:.3f}"
                                                     if g['gap_std'] is not None else '')),
                 fontsize=10)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45 if len(values) > 4 else 0, ha='right'
                       if len(values) > 4 else 'center', fontsize=8)
  fig.suptitle(f'{attribute}: metrics by group (images); error bars = subject bootstrap std',
               fontsize=11)
  fig.tight_layout()
  curves.save_figure(fig, path)
  plt.close(fig)
  return path
