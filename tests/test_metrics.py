"""Tests of sano_jax.metrics against scikit-learn, brute force, and bootstrap properties."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from sano_jax import accumulator
from sano_jax import metrics as M
from tests import sklearn_oracle


def _sklearn_best_f1(y, s):
  p, r, _ = precision_recall_curve(y, s)
  with np.errstate(divide='ignore', invalid='ignore'):
    f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
  return f.max()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_exact_metrics_match_sklearn(data):
  n = data.draw(st.integers(2, 120))
  # Few distinct values -> many ties; or continuous floats.
  levels = data.draw(st.sampled_from([2, 3, 7, None]))
  if levels is None:
    s = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-1e3, 1e3)))
  else:
    s = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, levels - 1))).astype(float)
  y = data.draw(hnp.arrays(np.bool_, n))
  if y.all() or not y.any():
    y[0], y[-1] = True, False
  assert M.pixel_auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
  assert M.pixel_auprc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-6)
  thr, f1 = M.operating_point(s, y)
  assert f1 == pytest.approx(_sklearn_best_f1(y, s), abs=1e-6)
  # The threshold reproduces its F1 with the rule score >= threshold.
  assert M.dice(s >= thr, y) == pytest.approx(f1, abs=1e-9)


def test_weighted_matches_sklearn():
  rng = np.random.default_rng(1)
  s = rng.integers(0, 20, 500).astype(float)
  y = rng.random(500) < 0.2
  w = rng.integers(0, 4, 500).astype(float)
  assert M.pixel_auroc(s, y, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-9)
  assert M.pixel_auprc(s, y, w) == pytest.approx(
      average_precision_score(y, s, sample_weight=w), abs=1e-9)


def test_weighted_aurocs_are_sklearns_under_each_row_of_weights():
  rng = np.random.default_rng(2)
  s = rng.integers(0, 20, 400).astype(float)  # ties: the tie rule matters
  y = rng.random(400) < 0.3
  w = rng.integers(0, 3, (5, 400)).astype(float)
  got = M.weighted_aurocs(s, y, w)
  assert got.shape == (5,)
  np.testing.assert_allclose(got, [roc_auc_score(y, s, sample_weight=r) for r in w], atol=1e-12)
  with pytest.raises(ValueError, match=r'weights must be \[runs, 400\]'):
    M.weighted_aurocs(s, y, w[:, :399])


def test_any_shape_and_label_encoding():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(3, 8, 9))
  y = (rng.random((3, 8, 9)) < 0.3).astype(np.uint8) * 255  # nonzero = anomalous
  assert M.pixel_auroc(s, y) == pytest.approx(roc_auc_score(y.ravel() > 0, s.ravel()))
  with pytest.raises(ValueError, match='NaN'):
    M.pixel_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match='differ'):
    M.pixel_auroc(np.zeros(3), np.zeros(4))
  assert math.isnan(M.pixel_auroc(np.arange(4.0), np.zeros(4)))


def test_dice_iou():
  p = np.array([[1, 1, 0, 0], [0, 1, 0, 0]], bool)
  y = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], bool)
  assert M.dice(p, y) == pytest.approx(2 * 2 / (3 + 3))
  assert M.iou(p, y) == pytest.approx(2 / 4)
  assert M.dice(np.zeros(5), np.zeros(5)) == 1.0 and M.iou(np.zeros(5), np.zeros(5)) == 1.0
  # Per image: image 0 dice 2/3, image 1 dice 2/3 -> mean 2/3; empty-truth images are skipped.
  pi = np.concatenate([p, np.zeros((1, 4), bool)])
  yi = np.concatenate([y, np.zeros((1, 4), bool)])
  assert sklearn_oracle.mean_dice_per_image(pi, yi) == pytest.approx(2 / 3)
  assert sklearn_oracle.mean_iou_per_image(pi, yi) == pytest.approx(0.5)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_grouped_curve_metrics_equal_each_group_alone_and_sklearn(data):
  """One sort serves every group: each group's metrics are those of its pixels alone (sklearn),
  the pooled ones those of all pixels, and the macro threshold that of macro_dice_threshold."""
  n = data.draw(st.integers(8, 150))
  levels = data.draw(st.sampled_from([3, 9, None]))  # heavy ties, or continuous
  if levels is None:
    s = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-1e3, 1e3)))
  else:
    s = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, levels - 1))).astype(float)
  y = data.draw(hnp.arrays(np.bool_, n))
  g = data.draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2)))
  if not y.any() or y.all():
    y[0], y[-1] = True, False
  out = M.grouped_curve_metrics(s, y, g)
  assert sorted(out['by_group']) == sorted(np.unique(g).tolist())
  for k, m in out['by_group'].items():
    yk, sk = y[g == k], s[g == k]
    if yk.any() and not yk.all():
      assert m['auroc'] == pytest.approx(roc_auc_score(yk, sk), abs=1e-9)
      assert m['auprc'] == pytest.approx(average_precision_score(yk, sk), abs=1e-9)
      assert m['dice'] == pytest.approx(_sklearn_best_f1(yk, sk), abs=1e-9)
    else:
      assert math.isnan(m['auroc'])
  assert out['pooled'] == pytest.approx(M.exact_curve_metrics(s, y))
  assert out['macro_threshold'] == M.macro_dice_threshold(s, y, g)


def test_macro_dice_threshold_matches_brute_force_and_ignores_an_easy_group():
  """Group 0: hard positives (scores near the negatives'); group 1: easy ones, far above. The
  pooled best Dice follows the many easy pixels; the macro threshold must serve both groups."""
  rng = np.random.default_rng(0)
  s = np.round(np.concatenate([rng.normal(0, 1, 600), rng.normal(1.5, 1, 100),  # group 0
                               rng.normal(0, 1, 300), rng.normal(8, 1, 400)]), 2)  # group 1 (ties)
  y = np.concatenate([np.zeros(600), np.ones(100), np.zeros(300), np.ones(400)]).astype(bool)
  g = np.repeat(['hard', 'hard', 'easy', 'easy'], [600, 100, 300, 400])
  thr, mean_dice = M.macro_dice_threshold(s, y, g)
  brute = {t: np.mean([M.dice(s[g == k] >= t, y[g == k]) for k in ('hard', 'easy')])
           for t in np.unique(s)}
  best_t = max(brute, key=brute.get)
  assert mean_dice == pytest.approx(brute[best_t]) and brute[thr] == pytest.approx(brute[best_t])
  pooled_t = M.exact_curve_metrics(s, y)['threshold']
  assert thr < pooled_t and brute[thr] > brute[pooled_t] + 0.05
  # a group without positives is skipped; only negatives anywhere is a clear error
  g2 = np.where(np.arange(s.size) < 50, 'none', g)
  y2 = y & (np.arange(s.size) >= 50)
  assert M.macro_dice_threshold(s, y2, g2)[0] == M.macro_dice_threshold(s[50:], y[50:], g[50:])[0]
  with pytest.raises(ValueError, match='no group has a positive'):
    M.macro_dice_threshold(s, np.zeros_like(y), g)
  with pytest.raises(ValueError, match='groups'):
    M.macro_dice_threshold(s, y, g[:-1])


def _regions_by_flood_fill(mask):
  """Each 8-connected region of a 2-D bool mask as a bool mask (a plain breadth-first search)."""
  seen = np.zeros_like(mask)
  regions = []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    region, queue = np.zeros_like(mask), [start]
    seen[start] = True
    while queue:
      i, j = queue.pop()
      region[i, j] = True
      for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
          a, b = i + di, j + dj
          if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
            seen[a, b] = True
            queue.append((a, b))
    regions.append(region)
  return regions


def _brute_aupro(s, y, max_fpr):
  """MVTec AD's recipe, written out: PRO and FPR at every distinct threshold, the curve linearly
  interpolated on a fine FPR grid and integrated by trapezoids up to max_fpr."""
  regions = [(i, r) for i in range(s.shape[0]) for r in _regions_by_flood_fill(y[i])]
  fprs, pros = [0.0], [0.0]
  for t in np.unique(s)[::-1]:
    pred = s >= t
    fprs.append((pred & ~y).sum() / (~y).sum())
    pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  grid = np.linspace(0, max_fpr, 200001)
  return np.trapezoid(np.interp(grid, fprs, pros), grid) / max_fpr


def test_aupro_matches_brute_force():
  rng = np.random.default_rng(3)
  y = np.zeros((3, 12, 12), bool)
  y[0, 2:5, 2:6] = True
  y[0, 8:11, 8:9] = True
  y[2, 0:3, 9:12] = True
  s = np.round(rng.normal(size=y.shape) + 1.2 * y, 1)
  for max_fpr in (0.3, 1.0):
    assert M.aupro(s, y, max_fpr) == pytest.approx(_brute_aupro(s, y, max_fpr), abs=1e-4)
  assert M.aupro(y.astype(float), y) == pytest.approx(1.0)


def _data(n_subj=12, imgs=3, size=16, seed=0):
  rng = np.random.default_rng(seed)
  n = n_subj * imgs
  y = np.zeros((n, size, size), bool)
  for i in range(n):
    a, b = rng.integers(0, size - 4, 2)
    y[i, a:a + rng.integers(1, 5), b:b + rng.integers(1, 5)] = rng.random() < 0.8
  s = np.abs(rng.normal(size=y.shape)) * rng.uniform(0.5, 2, (n, 1, 1)) + y * rng.uniform(
      0.5, 4, (n, 1, 1))
  subj = np.repeat([f's{k:03d}' for k in range(n_subj)], imgs)
  return s.astype(np.float32), y, subj


def _grid_data(n_subj=6, imgs=2, size=10, seed=4):
  """`_data` with scores on the grid k/8 in [0, 8): 64 bins over (0, 8) hold one score value each,
  so the binned path must equal the exact one."""
  s, y, subj = _data(n_subj, imgs, size, seed)
  return (np.clip(np.floor(s * 8), 0, 63) / 8).astype(np.float32), y, subj


def test_accumulator_aupro_matches_brute_force_exact_binned_merged_and_resampled():
  s, y, subj = _grid_data()
  want = _brute_aupro(s, y, 0.3)
  exact = accumulator.bootstrap(s, y, subj, runs=0)
  binned = accumulator.bootstrap(s, y, subj, runs=0, num_bins=64, score_range=(0.0, 8.0))
  assert exact['aupro'] == pytest.approx(want, abs=1e-4)
  assert binned['aupro'] == pytest.approx(want, abs=1e-4)
  assert M.aupro(s, y) == pytest.approx(want, abs=1e-4)
  assert exact['num_regions'] == sum(len(_regions_by_flood_fill(m)) for m in y)
  # Two processes' shares, merged, and [B, H, W, 1] batches: the same numbers.
  halves = []
  for part in (slice(0, 5), slice(5, None)):
    acc = accumulator.PixelMetricsAccumulator(64, (0.0, 8.0), ())
    index = np.arange(len(s))[part]
    acc.add(s[part][..., None], y[part][..., None], subj[part], indices=index)
    halves.append(acc)
  merged = accumulator.PixelMetricsAccumulator.merge(halves).compute(bootstrap_runs=0)
  assert merged['aupro'] == pytest.approx(want, abs=1e-4)
  # A bootstrap run = the data with each subject's images repeated by its multiplicity.
  acc = accumulator.PixelMetricsAccumulator(2, (0.0, 1.0), (), exact_max_pixels=s.size)
  acc.add(s, y, subj)
  weights = M.bootstrap_weights(len(acc.subjects), 3, seed=2)
  runs = acc.run_values(weights)['aupro']
  for w, got in zip(weights[1:], runs[1:]):
    rows = [i for i in range(len(s)) for _ in range(int(w[acc.subjects.index(subj[i])]))]
    assert got == pytest.approx(_brute_aupro(s[rows], y[rows], 0.3), abs=1e-4)
  assert len(set(np.round(runs, 6))) > 1


def test_aupro_is_undefined_without_layout_or_regions():
  s, y, subj = _grid_data()
  flat = accumulator.bootstrap(s.reshape(len(s), -1), y.reshape(len(s), -1), subj, runs=2)
  assert math.isnan(flat['aupro']) and flat['num_regions'] is None
  assert flat['auroc'] == accumulator.bootstrap(s, y, subj, runs=2)['auroc']
  healthy = accumulator.bootstrap(s, np.zeros_like(y), subj, runs=0, num_bins=64)
  assert math.isnan(healthy['aupro']) and healthy['num_regions'] == 0


def test_binned_agrees_with_exact():
  s, y, subj = _data()
  ex = accumulator.bootstrap(s, y, subj, runs=0)
  bi = accumulator.bootstrap(s, y, subj, runs=0, num_bins=2**16)
  assert ex['method'] == 'exact' and bi['method'] == 'binned'
  assert ex['auroc'] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-6)
  assert ex['auprc'] == pytest.approx(average_precision_score(y.ravel(), s.ravel()), abs=1e-6)
  for k in ('auroc', 'auprc'):
    assert bi[k] == pytest.approx(ex[k], abs=1e-3)
  for k in ('threshold', 'f1', 'dice', 'iou'):
    assert bi['operating_point'][k] == pytest.approx(ex['operating_point'][k], abs=1e-3)
  assert bi['n_sigma'] == ex['n_sigma']  # fixed thresholds are exact counts in both paths
  assert ex['n_sigma']['dice'] == pytest.approx(M.dice(s > 3.0, y))
  assert ex['n_sigma']['iou'] == pytest.approx(M.iou(s > 3.0, y))
  assert ex['n_sigma']['dice_per_image'] == pytest.approx(sklearn_oracle.mean_dice_per_image(s > 3.0, y))
  assert ex['operating_point']['iou'] == pytest.approx(
      M.iou(s >= ex['operating_point']['threshold'], y))
  assert ex['num_images'] == len(s) and ex['num_subjects'] == 12
  assert ex['num_pixels'] == s.size and ex['num_positive_pixels'] == y.sum()


def test_accumulator_streaming_padding_and_schema():
  s, y, subj = _data()
  acc = accumulator.PixelMetricsAccumulator(2**16, (0.0, float(s.max()) + 1e-3), thresholds=(3.0, 2.0))
  for a in range(0, len(s), 5):  # uneven batches, padded to 5 with garbage marked invalid
    sb, yb, jb = s[a:a + 5], y[a:a + 5], subj[a:a + 5]
    pad = 5 - len(sb)
    valid = np.r_[np.ones(len(sb), bool), np.zeros(pad, bool)]
    sb = np.concatenate([sb, np.full((pad,) + sb.shape[1:], 1e9, np.float32)])
    yb = np.concatenate([yb, np.ones((pad,) + yb.shape[1:], bool)])
    jb = np.concatenate([jb, ['pad'] * pad])
    acc.add(sb, yb, jb, valid)
  out = acc.compute(bootstrap_runs=10, seed=1)
  ref = accumulator.bootstrap(s, y, subj, runs=10, seed=1, thresholds=(3.0, 2.0), num_bins=2**16,
                    score_range=(0.0, float(s.max()) + 1e-3))
  assert out == ref
  json.dumps(out)  # JSON-serialisable
  assert set(out) >= {'auroc', 'auroc_std', 'auprc', 'auprc_std', 'operating_point', 'n_sigma',
                      'num_images', 'num_subjects'}
  assert set(out['operating_point']) >= {'threshold', 'dice', 'iou', 'dice_std', 'iou_std'}
  assert set(out['n_sigma']) >= {'n', 'dice', 'iou', 'dice_std', 'iou_std'}
  assert out['fixed_thresholds'][1]['n'] == 2.0
  with pytest.raises(ValueError, match='NaN'):
    acc.add(np.full((1, 4), np.nan), np.zeros((1, 4)), ['x'])


def _sklearn_bootstrap(s, y, subj, runs, seed, threshold=3.0):
  """The documented resampling, recomputed with scikit-learn: run r draws subject multiplicities
  m_r ~ Multinomial(S, 1/S) from np.random.default_rng(seed) (subjects in order of first
  appearance, which in `_data` is also their sorted order), and weights every pixel by its
  subject's multiplicity; the std is over the runs with ddof=1."""
  _, first = np.unique(subj, return_index=True)
  order = subj[np.sort(first)]
  row = {k: i for i, k in enumerate(order)}
  pixel_row = np.repeat([row[k] for k in subj], s[0].size)
  mult = np.random.default_rng(seed).multinomial(len(order), np.full(len(order), 1 / len(order)),
                                                 size=runs)
  ss, yy = s.reshape(-1).astype(np.float64), y.reshape(-1)
  pred = ss > threshold
  out = {k: [] for k in ('auroc', 'auprc', 'f1', 'dice', 'iou')}
  for m in mult:
    w = m[pixel_row].astype(np.float64)
    keep = w > 0
    out['auroc'].append(roc_auc_score(yy[keep], ss[keep], sample_weight=w[keep]))
    out['auprc'].append(average_precision_score(yy[keep], ss[keep], sample_weight=w[keep]))
    p, r, _ = precision_recall_curve(yy[keep], ss[keep], sample_weight=w[keep])
    with np.errstate(divide='ignore', invalid='ignore'):
      out['f1'].append(np.nanmax(np.where(p + r > 0, 2 * p * r / (p + r), 0.0)))
    tp, fp, fn = (w * (pred & yy)).sum(), (w * (pred & ~yy)).sum(), (w * (~pred & yy)).sum()
    out['dice'].append(2 * tp / (2 * tp + fp + fn))
    out['iou'].append(tp / (tp + fp + fn))
  return {k: np.std(v, ddof=1) for k, v in out.items()}


@pytest.mark.parametrize('num_bins', [None, 2**16])
def test_bootstrap_stds_match_sklearn_resamples(num_bins):
  s, y, subj = _data()
  runs, seed = 20, 5
  a = accumulator.bootstrap(s, y, subj, runs=runs, seed=seed, num_bins=num_bins)
  ref = _sklearn_bootstrap(s, y, subj, runs, seed)
  tol = 1e-9 if num_bins is None else 2e-3  # binned: thresholds at bin edges
  assert a['auroc_std'] == pytest.approx(ref['auroc'], abs=tol)
  assert a['auprc_std'] == pytest.approx(ref['auprc'], abs=tol)
  assert a['operating_point']['f1_std'] == pytest.approx(ref['f1'], abs=tol)
  # Fixed thresholds are exact counts in both paths.
  assert a['n_sigma']['dice_std'] == pytest.approx(ref['dice'], abs=1e-9)
  assert a['n_sigma']['iou_std'] == pytest.approx(ref['iou'], abs=1e-9)
  assert min(ref.values()) > 0


def test_bootstrap_seeded_and_positive():
  s, y, subj = _data()
  a = accumulator.bootstrap(s, y, subj, runs=20, seed=5)
  b = accumulator.bootstrap(s, y, subj, runs=20, seed=5)
  c = accumulator.bootstrap(s, y, subj, runs=20, seed=6)
  assert a == b and a != c
  for k in ('auroc_std', 'auprc_std'):
    assert a[k] > 0
  assert a['operating_point']['dice_std'] > 0 and a['n_sigma']['dice_std'] > 0
  # The seed is the resampling's: seed 6 gives sklearn's stds of seed 6's resamples.
  assert c['auroc_std'] == pytest.approx(_sklearn_bootstrap(s, y, subj, 20, 6)['auroc'], abs=1e-9)
  # The point estimates are the unresampled metrics.
  assert a['auroc'] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-9)


def test_bootstrap_one_subject_has_zero_std():
  s, y, _ = _data()
  out = accumulator.bootstrap(s, y, np.zeros(len(s), int), runs=20)
  assert out['num_subjects'] == 1
  for k in ('auroc_std', 'auprc_std'):
    assert out[k] == 0.0
  assert out['operating_point']['dice_std'] == 0.0 and out['n_sigma']['iou_std'] == 0.0


def test_bootstrap_resamples_subjects_not_images():
  # Every subject holds the same varied images: any resample of subjects is a scaled copy of the
  # data, so all (scale-invariant) metrics are constant; resampling images would vary them.
  s, y, _ = _data(n_subj=1, imgs=6)
  k = 8
  ss, yy = np.tile(s, (k, 1, 1)), np.tile(y, (k, 1, 1))
  subj = np.repeat(np.arange(k), len(s))
  for num_bins in (None, 2**12):
    out = accumulator.bootstrap(ss, yy, subj, runs=20, num_bins=num_bins)
    for key in ('auroc_std', 'auprc_std'):
      assert out[key] == pytest.approx(0.0, abs=1e-12)
    assert out['operating_point']['dice_std'] == pytest.approx(0.0, abs=1e-12)
    assert out['n_sigma']['dice_std'] == pytest.approx(0.0, abs=1e-12)
  # The same images, each its own subject: now the bootstrap varies.
  out = accumulator.bootstrap(ss, yy, np.arange(len(ss)), runs=20)
  assert out['auroc_std'] > 0
