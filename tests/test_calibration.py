"""Label-free calibration (sano_jax.calibration): synthetic anomalies, the choice on a case with a
known answer, no use of test labels, and the choice carried to load_localizer."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sano_jax import calibration, eval_batches, evaluate, healthy, localization, score_stats, metrics
from sano_jax import rundir
from sano_jax import synthetic
from tests.helpers import random_values, split_slices, tiny_run_config


def test_candidates_cover_every_rule_and_the_density_sets():
  c = calibration.candidates(calibration.T_GRID)
  assert len(c) == 4 * len(calibration.T_GRID) + 2 * len(calibration.DENSITY_SETS)
  assert ('density', tuple(range(len(calibration.T_GRID)))) in c
  assert ('density_mean', tuple(range(len(calibration.T_GRID)))) in c
  assert all((rule, (i,)) in c for i in range(len(calibration.T_GRID))
             for rule in calibration.Z_RULES + ('density',))  # the per-channel density at each t
  assert calibration.candidates((None,)) == [('global', (0,)), ('per_pixel', (0,)),
                                             ('two_sided', (0,)), ('density', (0,))]


def _rows_of(zs, labels, kinds):
  """Rows as `choose` ranks them: kind_score and the kind-averaged Dice of each candidate."""
  rows = []
  for z in zs:
    c = metrics.grouped_curve_metrics(z, labels, kinds)
    by_kind = {k: c['by_group'][k]['auroc'] for k in c['by_group']}
    rows.append({'score': calibration.kind_score(by_kind), 'macro_dice': c['macro_threshold'][1]})
  return rows


def test_one_se_choice_breaks_a_tie_within_the_noise_by_dice_but_not_a_real_gap():
  """B is A with the noise of two same-mask images swapped (the same pixels per kind: the same
  score, but a different map under resampling) and one positive pixel lowered: a score a hair
  below A's, far inside the bootstrap's se. B's better synthetic Dice then wins. A clearly worse
  candidate never wins, whatever its Dice, and without the tie the better score wins."""
  rng = np.random.default_rng(0)
  n, hw = 48, 64
  image_ids = np.repeat(np.arange(n), hw)
  kinds = image_ids % 4
  labels = (rng.random((n, hw)) < 0.2)
  labels[4] = labels[0]  # images 0 and 4: kind 0, the same mask
  noise = rng.normal(0.0, 1.0, (n, hw))
  a = labels + noise
  b = a.copy()
  b[0], b[4] = labels[0] + noise[4], labels[4] + noise[0]
  b[0, np.flatnonzero(labels[0])[0]] -= 0.05  # passes a few negatives
  c = 0.2 * labels + noise
  zs, labels = np.stack([a, b, c]).reshape(3, -1), labels.reshape(-1)
  rows = _rows_of(zs, labels, kinds)
  for r, dice in zip(rows, (0.5, 0.9, 1.0)):
    r['macro_dice'] = dice
  gap = rows[0]['score'] - rows[1]['score']
  assert 0.0 < gap and rows[2]['score'] < rows[0]['score'] - 0.1
  assert calibration.one_se_choice(rows, zs, labels, kinds, image_ids, seed=0) == 1
  assert rows[0]['score_gap_se'] == 0.0 and gap < rows[1]['score_gap_se']
  assert rows[0]['score'] - rows[2]['score'] > 3 * rows[2]['score_gap_se']
  # Without the tie (B removed), the better score wins against a better Dice.
  assert calibration.one_se_choice([rows[0], rows[2]], zs[[0, 2]], labels, kinds, image_ids) == 0


def test_one_se_choice_resamples_the_draws_of_one_healthy_image_together():
  """Two synthetic images drawn on one healthy image share its id and are resampled together:
  with every image present twice under one id, each bootstrap weights the pixels as the single
  copies do (AUROC is unchanged by a common factor of 2), so the gap's se is that of the single
  copies to the last bit. Counted as independent images (ids of their own), the copies would
  look like twice the evidence: a smaller se."""
  rng = np.random.default_rng(1)
  n, hw = 40, 64
  image_ids = np.repeat(np.arange(n), hw)
  kinds = image_ids % 4
  labels = rng.random((n, hw)) < 0.2
  zs = np.stack([labels + rng.normal(0.0, s, (n, hw)) for s in (1.0, 1.1)])
  def se(zs, labels, kinds, image_ids):
    zs, labels = zs.reshape(len(zs), -1), labels.reshape(-1)
    rows = _rows_of(zs, labels, kinds)
    calibration.one_se_choice(rows, zs, labels, kinds, image_ids, seed=3)
    return rows[int(np.argmin([r['score'] for r in rows]))]['score_gap_se']
  single = se(zs, labels, kinds, image_ids)
  twice = (np.concatenate([zs, zs], 1), np.concatenate([labels, labels]),
           np.concatenate([kinds, kinds]))
  assert single > 0.0
  assert se(*twice, np.concatenate([image_ids, image_ids])) == pytest.approx(single, rel=1e-12)
  assert se(*twice, np.concatenate([image_ids, image_ids + n])) < 0.85 * single
  # One healthy image under every kind (choose's draws: kinds shifted each draw): within a kind
  # it is one image, and the kinds' multiplicities are drawn apart, as for ids of their own.
  healthy = np.repeat(np.arange(n) // 4, hw)
  assert se(zs, labels, kinds, healthy) == pytest.approx(se(zs, labels, kinds, image_ids),
                                                         rel=1e-12)


def test_kind_score_is_the_geometric_mean_margin_and_prefers_finding_every_kind():
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  lopsided = {'cutpaste': 0.99, 'noise': 0.99, 'shift': 0.56}  # one kind near chance
  even = {'cutpaste': 0.8, 'noise': 0.8, 'shift': 0.8}
  assert np.mean(list(lopsided.values())) > np.mean(list(even.values()))  # the mean prefers it
  assert calibration.kind_score(even) > calibration.kind_score(lopsided)
  np.testing.assert_allclose(calibration.kind_score(lopsided),
                             0.5 + scipy_stats.gmean([0.49, 0.49, 0.06]), rtol=1e-12)
  # below the floor every AUROC counts as 0.5 + MIN_MARGIN: noise around chance cannot decide
  floor = calibration.MIN_MARGIN
  assert calibration.kind_score({'a': 0.3, 'b': 0.9}) == pytest.approx(0.5 + np.sqrt(floor * 0.4))
  assert calibration.kind_score({'a': 0.49, 'b': 0.9}) == calibration.kind_score({'a': 0.52,
                                                                                 'b': 0.9})
  assert calibration.kind_score({'a': 0.7, 'b': float('nan')}) == pytest.approx(0.7)
  assert np.isnan(calibration.kind_score({'a': float('nan')}))


def test_candidate_zmaps_are_each_candidates_localization_z():
  """The calibration's z-map program (whitening computed beforehand, each t's one-t density traced
  once for 'density' and every 'density_mean') gives each candidate the z that
  `localization.combine` gives it from the plain statistics; RGB, so the per-channel densities."""
  ts = (0.01, 0.1, 0.4)  # t-sets (0.1, 0.4) (not the leading features) and all three
  rng = np.random.default_rng(0)
  fit = [rng.gamma(2.0, 1.0, (12, 8, 8, 3)).astype(np.float32) for _ in ts]
  stats = score_stats.init_multi_stats((8, 8, 3), ts, smoothing_sigma=1.0, num_bins=64)
  stats = score_stats.finalize(score_stats.update_multi_stats(stats, fit))
  fields = [jnp.asarray(rng.gamma(2.0, 1.0, (2, 8, 8, 3)), jnp.float32) for _ in ts]
  cands = tuple(calibration.candidates(ts))
  assert {r for r, _ in cands} == set(calibration.Z_RULES) | {'density', 'density_mean'}
  for order in (cands, cands[::-1]):  # reversed: a 'density_mean' traces the one-t densities
    z = calibration.jitted_zmaps(order)(calibration.candidate_stats(stats, order), fields)
    for got, (rule, idx) in zip(np.asarray(z), order):
      want = localization.combine(stats.select(idx), [fields[i] for i in idx], rule)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f'{rule} {idx}')


def test_choose_picks_the_only_informative_t():
  """Field 1 of 3 sees structure (a high-pass of x); fields 0 and 2 are noise independent of x.
  The calibration must choose t = ts[1] with a single-t rule (at one smoothing sigma: choosing sigma
  is the next test's; the grid of three made the same choice, at the same sigma, at 3x the cost)."""
  ts = (0.01, 0.1, 0.4)
  k = jnp.ones((3, 3, 1, 1), jnp.float32) / 9.0

  def field_fn(x):
    blur = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    key = jax.random.PRNGKey(0)
    noise = [jax.random.normal(jax.random.fold_in(key, i), x.shape) for i in (0, 2)]
    return [noise[0], 4.0 * (x - blur), noise[1]]

  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:16, :16] / 16.0
  images = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(.5, 1.5) * xx + rng.uniform()))
                     + 0.0 * yy for _ in range(40)])[..., None].astype(np.float32)
  choice = calibration.choose(field_fn, ts, images, batch_size=8, seed=0, sigma_factors=(1.0,))
  assert choice['t'] == [0.1], choice
  # 40 healthy images < MIN_SYNTHETIC: each gets ceil(256 / 40) = 7 synthetic anomalies.
  assert choice['synthetic']['num_synthetic_images'] == 7 * 40 == 280
  for bad in (-1, 2.5, True):  # before any work: the setting is named with its value
    with pytest.raises(ValueError, match=rf'min_synthetic_images must be an integer >= 0 .*'
                                         rf'got {bad!r}'):
      calibration.choose(field_fn, ts, images, batch_size=8, min_synthetic=bad)
  assert choice['rule'] in calibration.Z_RULES
  best = max(choice['candidates'], key=lambda r: r['auroc'])
  assert best['auroc'] > 0.8 and choice['n_sigma'] == best['threshold']
  noise_rows = [r for r in choice['candidates'] if r['t'] in ([0.01], [0.4])]
  assert max(r['auroc'] for r in noise_rows) < 0.65  # the noise fields rank at chance


def test_choose_ranks_a_field_that_is_zero_everywhere_last_without_failing():
  """A t whose field is exactly zero (e.g. an untrained model's zero output layer) makes its z rules
  0 / 0 = NaN. The calibration must still rank the candidates (NaN pixels last) and choose the
  t that sees the structure."""
  k = jnp.ones((3, 3, 1, 1), jnp.float32) / 9.0

  def field_fn(x):
    blur = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return [jnp.zeros_like(x), 4.0 * (x - blur)]

  rng = np.random.default_rng(1)
  xx = np.mgrid[:16, :16][1] / 16.0
  images = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(.5, 1.5) * xx + rng.uniform()))
                     for _ in range(24)])[..., None].astype(np.float32)
  choice = calibration.choose(field_fn, (0.01, 0.1), images, batch_size=8, seed=0,
                              sigma_factors=(1.0,), min_synthetic=0)
  assert choice['t'] == [0.1], choice
  zero = [r for r in choice['candidates'] if r['t'] == [0.01] and r['rule'] == 'global']
  assert zero and all(r['auroc'] <= 0.5 + 1e-9 for r in zero)


def test_choose_smooths_more_when_the_field_is_pixel_noise_over_a_regional_signal():
  """Flat healthy images; the field is 4 (x - 1/2) plus iid N(0, 1) pixel noise, redrawn per call.
  The synthetic anomalies are regions of S/4..S/2, so averaging the noise over the widest kernel
  ranks them best: the choice must be the largest sigma of the grid, and the grid must be
  sigma_factors x the given sigma."""
  def field_fn(x):
    key = jax.random.PRNGKey(jnp.round(jnp.sum(x) * 1e3).astype(jnp.int32))
    return 4.0 * x + jax.random.normal(key, x.shape)  # x in [-1, 1]: 4 (x01 - 1/2) x 2

  rng = np.random.default_rng(0)
  images = (0.5 + 0.02 * rng.standard_normal((48, 32, 32, 1))).astype(np.float32)
  choice = calibration.choose(field_fn, (0.1,), images, batch_size=16, smoothing_sigma=1.0, seed=0,
                              sigma_factors=(0.5, 1.0, 2.0), min_synthetic=0)
  assert sorted({r['smoothing_sigma'] for r in choice['candidates']}) == [0.5, 1.0, 2.0]
  assert choice['smoothing_sigma'] == 2.0, choice['smoothing_sigma']
  by_sigma = {}
  for r in choice['candidates']:
    by_sigma.setdefault(r['smoothing_sigma'], []).append(r['score'])
  assert max(by_sigma[0.5]) < max(by_sigma[1.0]) < max(by_sigma[2.0])


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tiny_run):
  """The shared tiny run (copied), its config with the calibration on, and small in-memory splits
  of its data (the choice and its plumbing do not need the whole splits)."""
  config = tiny_run_config(tiny_run[0].data.data_dir,
                           **{'eval.bootstrap_runs': 0, 'localize.calibrate': True})
  config.localize.synthetic_kinds = synthetic.KINDS + ('crack',)  # every kind a default may use
  workdir = str(tmp_path_factory.mktemp('calib') / 'wd')
  shutil.copytree(tiny_run[1], workdir)
  sources = split_slices(config, train=32, val=32, test=48)
  return config, workdir, sources


class _ShuffledMasks:
  """The test split with its masks permuted across images (labels that make no sense)."""

  def __init__(self, source, seed=0):
    self.source = source
    self.perm = np.random.default_rng(seed).permutation(len(source))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    ex = dict(self.source[int(i)])
    ex['mask'] = self.source[int(self.perm[int(i)])]['mask']
    return ex


def _strip(choice):
  return {k: v for k, v in choice.items() if k != 'seconds'}


def test_calibration_reads_no_test_label_and_reaches_load_localizer(trained, tmp_path):
  config, workdir, sources = trained
  out = evaluate.evaluate(config, workdir, **sources)
  choice = out['calibration']
  assert choice is not None and choice['rule'] in localization.RULES
  assert choice['synthetic']['kinds'] == list(synthetic.KINDS) + ['crack']
  assert set(choice['candidates'][0]['auroc_by_kind']) == set(synthetic.KINDS) | {'crack'}
  cands = calibration.candidates(calibration.T_GRID)
  density = [c for c in cands if c[0] in localization.DENSITY_RULES]
  assert len(choice['candidates']) == len(calibration.SIGMA_FACTORS) * (len(cands) + len(density))
  centred = [r for r in choice['candidates'] if r['density_centred']]
  assert len(centred) == len(calibration.SIGMA_FACTORS) * len(density)
  assert {r['rule'] for r in centred} == set(localization.DENSITY_RULES)
  sigmas = {r['smoothing_sigma'] for r in choice['candidates']}
  assert sigmas == {f * config.localize.smoothing_sigma for f in calibration.SIGMA_FACTORS}
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    assert _strip(json.load(f)['calibration']) == _strip(choice)
  assert out['localization']['rule'] == choice['rule']
  assert out['localization']['t'] == choice['t']
  assert out['localization']['n_sigma'] == pytest.approx(choice['n_sigma'])
  assert out['localization']['smoothing_sigma'] == choice['smoothing_sigma']

  wd = str(tmp_path / 'copy')
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns('eval', 'inference*'))
  test = sources['test_source']
  shuffled = evaluate.evaluate(config, wd, **{**sources, 'test_source': _ShuffledMasks(test)})
  assert _strip(shuffled['calibration']) == _strip(choice)  # test labels change nothing
  assert shuffled['auroc'] != out['auroc']  # ... while the metrics do see them

  # load_localizer applies the saved choice: its mask is z > the calibrated N.
  images = np.stack([test[i]['image'] for i in range(4)]).astype(np.float32) / 255.0
  z, mask = rundir.load_localizer(workdir)(images)
  assert np.array_equal(np.asarray(mask), np.asarray(z) > choice['n_sigma'])
  bundle = rundir.load(workdir)
  assert {k: bundle.manifest['calibration'][k] for k in ('t', 'rule', 'n_sigma')} == {
      k: choice[k] for k in ('t', 'rule', 'n_sigma')}
  stats = bundle.stats
  multi = len(choice['t']) > 1 or choice['rule'] in localization.DENSITY_RULES
  assert isinstance(stats, score_stats.MultiStats) == multi
  assert stats.smoothing_sigma == choice['smoothing_sigma']  # fitted at the chosen sigma


def test_a_method_without_t_calibrates_and_evaluates_with_the_density_rule():
  """The reconstruction baselines have no t: the calibration chooses only the rule, sigma and N
  (the density rule among its candidates, modelling the one map: K = 1) and `apply` keeps the
  config's t; evaluated with the density rule at the calibrated sigma and N, the healthy statistics
  are MultiStats of the one map, and localize with them."""
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  from tests.helpers import grating_source, tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(method='ae')
  method = methods.create(config)
  assert method.ts == (None,)
  params = random_values(jax.eval_shape(method.init, jax.random.PRNGKey(0)))
  source = grating_source(16)
  choice = calibration.calibrate(config, method, params, source)
  # config.localize.min_synthetic_images (tiny config: 0): one anomaly per validation image.
  assert choice['synthetic']['num_synthetic_images'] == choice['synthetic']['num_images']
  rows = choice['candidates']
  assert choice['t'] == [None] and all(r['t'] == [None] for r in rows)
  assert len(rows) == len(calibration.SIGMA_FACTORS) * (len(calibration.candidates((None,))) + 1)
  assert {r['rule'] for r in rows} == set(calibration.Z_RULES) | {'density'}
  assert all(np.isfinite(r['score']) for r in rows if r['rule'] == 'density')
  assert choice['rule'] in localization.RULES and np.isfinite(choice['n_sigma'])
  applied = calibration.apply(config, choice)
  assert tuple(applied.localize.t) == tuple(config.localize.t)  # no t to set
  assert applied.localize.n_sigma == choice['n_sigma']

  config = applied
  config.localize.stats, config.localize.two_sided = 'density', False
  assert healthy.needs_multi_stats(method, config)
  stats = healthy.fit_stats(method, params, config, source, eval_batches.eval_mesh(config))
  assert isinstance(stats, score_stats.MultiStats) and len(stats.per_t) == 1
  assert stats.smoothing_sigma == choice['smoothing_sigma']
  images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (6,) + method.image_shape))
  lc = config.localize
  localize = jax.jit(lambda x: localization.localize(
      method.field_fn(params), x, stats, n_sigma=lc.n_sigma, smoothing_sigma=lc.smoothing_sigma,
      rule='density'))
  z, mask = localize(images)
  assert z.shape == images.shape[:3] and np.all(np.isfinite(np.asarray(z)))
  assert np.array_equal(np.asarray(mask), np.asarray(z) > choice['n_sigma'])


def test_predict_uses_the_calibrated_n(trained, tmp_path):
  """predict() applies the calibrated N like load_localizer (same N for masks and report)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sano_jax import predict  # pylint: disable=g-import-not-at-top
  config, workdir, sources = trained
  if not os.path.exists(os.path.join(workdir, rundir.MANIFEST)):
    evaluate.evaluate(config, workdir, **sources)
  choice = rundir.read_manifest(workdir)['calibration']
  test = sources['test_source']
  paths = []
  for i in range(2):
    p = str(tmp_path / f'img{i}.png')
    Image.fromarray(test[i]['image'][..., 0]).save(p)
    paths.append(p)
  out = tmp_path / 'pred'
  predict.predict(workdir, paths, str(out), batch_size=2, progress=False)
  with open(out / 'predictions.json') as f:
    assert json.load(f)['n_sigma'] == pytest.approx(choice['n_sigma'])


def test_bad_calibration_inputs_are_clear_errors():
  from tests.helpers import grating_source, tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='at least 4 healthy validation images, got 3'):
    calibration.calibrate(tiny_config(), None, None, grating_source(3))
