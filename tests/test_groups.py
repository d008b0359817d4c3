"""Per-group metrics (sano_jax.groups) against an independent oracle: filter the group's images,
then scikit-learn; exact and binned accumulators; undefined metrics are null with a reason; the
gap's interval follows the documented joint resampling; attribute look-up and its errors."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from sano_jax import accumulator
from sano_jax import groups, metrics as M
from tests.sklearn_oracle import whole_set_metrics

RUNS, SEED, N_SIGMA = 12, 3, 2.0


def _data(n=48, size=12, seed=0):
  """Scores, masks, subjects and two attributes; colour 'blue' has no anomalous pixel."""
  rng = np.random.default_rng(seed)
  y = np.zeros((n, size, size), bool)
  colour = np.array(['red', 'green', 'blue'])[np.arange(n) % 3]
  shape = np.array(['round', 'square'])[(np.arange(n) // 3) % 2]
  for i in range(n):
    if colour[i] != 'blue':
      a, b = rng.integers(0, size - 4, 2)
      y[i, a:a + rng.integers(2, 5), b:b + rng.integers(2, 5)] = True
  gain = np.where(colour == 'red', 3.0, 1.0)[:, None, None]  # red is easier
  s = np.abs(rng.normal(size=y.shape)) + y * gain * rng.uniform(0.5, 2, (n, 1, 1))
  subjects = np.array([f's{i // 4:02d}' for i in range(n)])  # 4 images a subject, across colours
  return s.astype(np.float32), y, subjects, {'colour': colour, 'shape': shape}


def _grouped(s, y, subj, attrs, binned: bool, batch=5):
  make = lambda: (accumulator.PixelMetricsAccumulator(2**16, (0.0, float(s.max()) + 1e-3), (N_SIGMA,))
                  if binned else accumulator.PixelMetricsAccumulator(2, (0.0, 1.0), (N_SIGMA,),
                                                           exact_max_pixels=s.size))
  g = groups.GroupedMetrics(tuple(attrs), make)
  whole = make()
  for a in range(0, len(s), batch):  # batches padded at the end, as evaluate's are
    sl = slice(a, a + batch)
    pad = batch - len(s[sl])
    valid = np.r_[np.ones(len(s[sl]), bool), np.zeros(pad, bool)]
    padded = lambda x, fill: np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])
    values = {k: padded(v[sl], '') for k, v in attrs.items()}
    g.add(padded(s[sl], 7.0), padded(y[sl], True), padded(subj[sl], 'pad'), valid, values)
    whole.add(s[sl], y[sl], subj[sl])
  return g.compute(RUNS, SEED, n_sigma=N_SIGMA), whole


@pytest.mark.parametrize('binned', [False, True], ids=['exact', 'binned'])
def test_group_metrics_equal_sklearn_on_the_group_alone(binned):
  s, y, subj, attrs = _data()
  out, _ = _grouped(s, y, subj, attrs, binned)
  tol = 2e-3 if binned else 1e-9
  assert list(out) == ['colour', 'shape']
  assert list(out['colour']['values']) == ['blue', 'green', 'red']  # sorted
  for attr, values in attrs.items():
    for value, e in out[attr]['values'].items():
      keep = values == value
      assert e['num_images'] == keep.sum() and e['num_subjects'] == len(set(subj[keep]))
      assert e['num_anomalous_images'] == y[keep].any(axis=(1, 2)).sum()
      assert e['n_sigma']['n'] == N_SIGMA
      if not y[keep].any():
        continue
      ref = whole_set_metrics(s[keep], y[keep], N_SIGMA)
      assert e['auroc'] == pytest.approx(ref['auroc'], abs=tol)
      assert e['auprc'] == pytest.approx(ref['auprc'], abs=tol)
      assert e['aupro'] == pytest.approx(M.aupro(s[keep], y[keep]), abs=tol)
      assert e['operating_point']['dice'] == pytest.approx(ref['op_dice'], abs=tol)
      assert e['operating_point']['iou'] == pytest.approx(ref['op_iou'], abs=tol)
      assert e['n_sigma']['dice'] == pytest.approx(ref['ns_dice'], abs=1e-9)  # exact counts
      assert e['n_sigma']['iou'] == pytest.approx(ref['ns_iou'], abs=1e-9)
      assert e['n_sigma']['fpr'] == pytest.approx((s[keep] > N_SIGMA)[~y[keep]].mean(), abs=1e-12)
      # The stds are the group's own subject bootstrap: the whole-set routine on the group alone.
      alone = accumulator.bootstrap(s[keep], y[keep], subj[keep], runs=RUNS, seed=SEED, thresholds=(N_SIGMA,),
                          num_bins=2**16 if binned else None,
                          score_range=(0.0, float(s.max()) + 1e-3) if binned else None)
      for key in ('auroc_std', 'auprc_std', 'aupro_std'):
        assert e[key] == pytest.approx(alone[key], abs=1e-12) and e[key] > 0
      assert e['operating_point']['dice_std'] == pytest.approx(
          alone['operating_point']['dice_std'], abs=1e-12)
      assert e['n_sigma']['iou_std'] == pytest.approx(alone['n_sigma']['iou_std'], abs=1e-12)


def test_a_group_without_anomalies_is_null_with_a_reason_never_nan():
  s, y, subj, attrs = _data()
  out, _ = _grouped(s, y, subj, attrs, binned=False)
  blue = out['colour']['values']['blue']
  assert blue['num_positive_pixels'] == 0 and 'no anomalous pixels' in blue['reason']
  for key in ('auroc', 'auroc_std', 'auprc', 'auprc_std', 'aupro', 'aupro_std'):
    assert blue[key] is None
  assert all(v is None for v in blue['operating_point'].values())
  assert blue['n_sigma']['dice'] is None and blue['n_sigma']['iou'] is None
  # ... but its false alarms at N sigma are: the share of its (healthy) pixels above N.
  assert blue['n_sigma']['fpr'] == pytest.approx((s[attrs['colour'] == 'blue'] > N_SIGMA).mean())
  assert out['colour']['values']['red']['reason'] is None
  text = json.dumps(out, allow_nan=False)  # strict JSON: raises on NaN or inf
  assert 'NaN' not in text
  # Every pixel anomalous: AUROC is undefined, AUPRC (= 1) is not.
  entry = groups.group_entry(accumulator.bootstrap(np.ones((2, 3)), np.ones((2, 3)), ['a', 'b'], runs=3))
  assert entry['auroc'] is None and entry['auprc'] == 1.0
  assert 'AUROC is undefined' in entry['reason']


def test_gap_is_best_minus_worst_with_the_joint_bootstrap_interval():
  s, y, subj, attrs = _data()
  out, whole = _grouped(s, y, subj, attrs, binned=False)
  gap = out['colour']['gap']['auroc']
  values = out['colour']['values']
  assert (gap['best'], gap['worst']) == ('red', 'green')  # blue (no anomalies) is left out
  assert gap['gap'] == pytest.approx(values['red']['auroc'] - values['green']['auroc'])
  # The documented draws: the whole set's subject multiplicities, applied to each group's pixels.
  order = whole.subjects
  weights = M.bootstrap_weights(len(order), RUNS, SEED)[1:]
  draws = []
  col = attrs['colour']
  for m in weights:
    w = {k: m[i] for i, k in enumerate(order)}
    auc = {}
    for value in ('red', 'green'):
      keep = col == value
      pw = np.repeat([w[k] for k in subj[keep]], s[0].size)
      yy, ss = y[keep].reshape(-1), s[keep].reshape(-1)
      auc[value] = skm.roc_auc_score(yy[pw > 0], ss[pw > 0], sample_weight=pw[pw > 0])
    draws.append(auc['red'] - auc['green'])
  assert gap['gap_std'] == pytest.approx(np.std(draws, ddof=1), abs=1e-9)
  assert gap['gap_ci95'] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
  # A metric defined in fewer than two groups has no gap, and says why.
  one = groups.gap({'a': 0.5, 'b': None}, {'a': np.zeros(3), 'b': np.zeros(3)})
  assert one['gap'] is None and 'needs two' in one['reason']


def test_table_and_figure(tmp_path):
  s, y, subj, attrs = _data()
  out, _ = _grouped(s, y, subj, attrs, binned=False)
  table = groups.format_table('colour', out['colour'])
  red = out['colour']['values']['red']
  assert f"| red | {red['num_images']} ({red['num_anomalous_images']}) |" in table
  assert f"{red['auroc']:.3f} ± {red['auroc_std']:.3f}" in table and 'n/a' in table
  path = groups.write_figure('colour', out['colour'], str(tmp_path / 'g.png'))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size[0] > 500


class _Cfg(dict):
  def __getattr__(self, k):
    return self[k]

  def get(self, k, default=None):
    return dict.get(self, k, default)


def _config(group_by, dataset='in-memory', subjects_csv=None):
  return _Cfg(eval=_Cfg(group_by=group_by),
              data=_Cfg(dataset=dataset, subjects_csv=subjects_csv))


def test_group_by_parsing_and_unknown_attributes_name_the_available_ones():
  assert groups.parse_group_by(('a', 'b')) == ('a', 'b')
  assert groups.parse_group_by(('a,b', ' c ', 'a')) == ('a', 'b', 'c')  # the command line's form
  assert groups.parse_group_by(('',)) == groups.parse_group_by(()) == ()
  src = [{'image': 0, 'mask': 0, 'subject': 's', 'name': 'n', 'skin_color': 'fair', 'aspect': 'x'}]
  assert groups.resolve(_config(()), src) is None
  lookup = groups.resolve(_config(('skin_color',)), src)
  assert lookup.carried == ('skin_color',) and lookup.table is None
  with pytest.raises(ValueError, match=r"'skin_tone'.*available are \['aspect', 'skin_color'\]"):
    groups.resolve(_config(('skin_color', 'skin_tone')), src)
  bare = [{'image': 0, 'mask': 0, 'subject': 's', 'name': 'n'}]
  with pytest.raises(ValueError, match="'site'.*available are none"):
    groups.resolve(_config('site'), bare)


def test_folder_groups_come_from_subjects_csv_by_name_or_stem(tmp_path):
  csv_path = tmp_path / 'subjects.csv'
  csv_path.write_text('name,subject,site,scanner\na.png,p1,north,X\nb,p2,south,\n')
  bare = [{'image': 0, 'mask': 0, 'subject': 's', 'name': 'a.png'}]
  cfg = _config('site,scanner', dataset='folder', subjects_csv=str(csv_path))
  lookup = groups.resolve(cfg, bare)
  assert lookup.carried == () and lookup.attributes == ('site', 'scanner')
  values = lookup.values({'name': np.array(['a.png', 'b.jpg', 'c.png', ''])})
  assert list(values['site']) == ['north', 'south', groups.MISSING, '']  # '' = padding
  assert list(values['scanner']) == ['X', groups.MISSING, groups.MISSING, '']
  with pytest.raises(ValueError, match=r"'age'.*\['scanner', 'site'\].*subjects_csv"):
    groups.resolve(_config('age', dataset='folder', subjects_csv=str(csv_path)), bare)


def test_textures_carry_meaningful_group_attributes():
  from sano_jax.datasets import textures  # pylint: disable=g-import-not-at-top
  cfg = next(c for c in textures.SanoTextures.BUILDER_CONFIGS if c.name == 'brick_16')
  test = textures.make_split(cfg, 'test')
  sources = textures.GRAY_SOURCES + textures.RGB_SOURCES
  for ex in test:
    share = ex['mask'].mean()
    if share == 0:
      assert ex['anomaly_source'] == ex['anomaly_size'] == 'none'
    else:
      assert ex['anomaly_source'] in sources
      lo, hi = (int(v) / 100 for v in ex['anomaly_size'].rstrip('%').split('-'))
      assert lo - 0.01 <= share < hi + 1e-9 or (hi == 0.25 and share <= 0.25)
  sizes = [ex['anomaly_size'] for ex in test if ex['mask'].any()]
  assert all(sizes.count(b) > len(sizes) / 5 for _, b in textures.SIZE_BUCKETS)  # roughly terciles
  assert len({ex['anomaly_source'] for ex in test}) >= 8
  assert {ex['anomaly_source'] for ex in textures.make_split(cfg, 'validation')} == {'none'}
