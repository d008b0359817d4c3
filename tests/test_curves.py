"""ROC / PR points (sano_jax.curves): they integrate back to the accumulator's AUROC and AUPRC
exactly, on the exact and the binned path, with far fewer points than levels; the marked points and
the z histogram agree with the counts."""
import numpy as np
import pytest
from sklearn import metrics as skm

from sano_jax import accumulator, curves


def _data(n=30, size=16, seed=0, ties=False):
  rng = np.random.default_rng(seed)
  y = np.zeros((n, size, size), bool)
  for i in range(n):
    a, b = rng.integers(0, size - 5, 2)
    y[i, a:a + rng.integers(1, 6), b:b + rng.integers(1, 6)] = rng.random() < 0.8
  s = np.abs(rng.normal(size=y.shape)) + y * rng.uniform(0.3, 3, (n, 1, 1))
  if ties:
    s = np.round(s, 1)
  return s.astype(np.float32), y, np.repeat([f's{k}' for k in range(n // 3)], 3)


def _accumulator(s, y, subj, binned):
  acc = (accumulator.PixelMetricsAccumulator(2**12, (0.0, float(s.max()) + 1e-3), (2.0,)) if binned else
         accumulator.PixelMetricsAccumulator(2, (0.0, 1.0), (2.0,), exact_max_pixels=s.size))
  acc.add(s, y, subj)
  return acc


@pytest.mark.parametrize('binned', [False, True], ids=['exact', 'binned'])
@pytest.mark.parametrize('ties', [False, True], ids=['distinct', 'ties'])
def test_points_integrate_to_the_metrics(binned, ties):
  s, y, subj = _data(ties=ties)
  acc = _accumulator(s, y, subj, binned)
  m = acc.compute(bootstrap_runs=0)
  levels = acc.curve_levels()
  roc = curves.roc_points(*levels)
  pr = curves.pr_points(*levels)
  assert np.trapezoid(roc['tpr'], roc['fpr']) == pytest.approx(m['auroc'], abs=1e-12)
  assert np.sum(np.diff(pr['recall'], prepend=0.0) * pr['precision']) == pytest.approx(m['auprc'],
                                                                                  abs=1e-12)
  if not binned:  # and the exact ones are scikit-learn's
    assert m['auroc'] == pytest.approx(skm.roc_auc_score(y.ravel(), s.ravel()), abs=1e-9)
    assert m['auprc'] == pytest.approx(skm.average_precision_score(y.ravel(), s.ravel()), abs=1e-9)
  # Lossless but few: the ROC keeps only its turning points, the PR curve the anomalous levels.
  if not ties:
    assert len(roc['fpr']) < 0.2 * np.count_nonzero(levels[0] + levels[1])
  assert len(pr['recall']) == np.count_nonzero(levels[0])
  assert roc['fpr'][0] == roc['tpr'][0] == 0.0 and roc['fpr'][-1] == roc['tpr'][-1] == 1.0
  assert np.all(np.diff(roc['fpr']) >= 0) and np.all(np.diff(pr['recall']) > 0)
  # Each vertex is the rate of the mask score >= its threshold.
  flat_s, flat_y = s.reshape(-1).astype(np.float64), y.reshape(-1)
  if not binned:
    for k in (1, len(roc['fpr']) // 2, len(roc['fpr']) - 1):
      pred = flat_s >= roc['threshold'][k]
      assert roc['tpr'][k] == pytest.approx((pred & flat_y).sum() / flat_y.sum())
      assert roc['fpr'][k] == pytest.approx((pred & ~flat_y).sum() / (~flat_y).sum())
  # The operating point on the curves: its F1 is the reported Dice.
  op = curves.point_at(*levels, m['operating_point']['threshold'])
  f1 = 2 * op['precision'] * op['tpr'] / (op['precision'] + op['tpr'])
  assert f1 == pytest.approx(m['operating_point']['dice'], abs=1e-12)
  # N sigma (score > 2): the accumulator's exact rates.
  pred = flat_s > 2.0
  ns = m['n_sigma']
  assert ns['tpr'] == pytest.approx((pred & flat_y).sum() / flat_y.sum(), abs=1e-12)
  assert ns['fpr'] == pytest.approx((pred & ~flat_y).sum() / (~flat_y).sum(), abs=1e-12)
  assert ns['precision'] == pytest.approx((pred & flat_y).sum() / pred.sum(), abs=1e-12)


def test_histogram_counts_every_pixel_and_figures(tmp_path):
  s, y, subj = _data()
  acc = _accumulator(s, y, subj, binned=False)
  m = acc.compute(bootstrap_runs=0)
  data = curves.curve_data(acc.curve_levels(), m['operating_point']['threshold'], m['n_sigma'])
  assert data['hist_anomalous'].sum() == y.sum() and data['hist_healthy'].sum() == (~y).sum()
  assert data['hist_edges'][-1] > max(data['op_threshold'], data['n_sigma_threshold'])
  assert data['prevalence'] == pytest.approx(y.mean())
  paths = curves.write_figures(data, str(tmp_path), auroc=m['auroc'], auprc=m['auprc'], n_sigma=2.0)
  assert sorted(paths) == ['pr', 'roc', 'z_histogram']
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for p in paths.values():
    with Image.open(p) as im:
      assert im.format == 'PNG'
  saved = np.load(curves.save_points(data, str(tmp_path / 'c.npz')))
  assert np.trapezoid(saved['roc_tpr'], saved['roc_fpr']) == pytest.approx(m['auroc'],
                                                                                    abs=1e-12)


def test_bad_levels_are_clear_errors():
  with pytest.raises(ValueError, match='one length'):
    curves.roc_points(np.ones(3), np.ones(2), np.ones(3))
