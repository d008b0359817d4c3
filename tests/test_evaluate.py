"""The evaluation run end to end: train a tiny model once, evaluate it, check metrics.json against an
independent sklearn recomputation on z-maps pulled through `load_localizer`."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
from sklearn import metrics as skm

from sano_jax import checkpointing, evaluate, groups, input_pipeline, report, rundir
from sano_jax import metrics as metrics_lib
from tests.helpers import tiny_run_config
from tests.sklearn_oracle import whole_set_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_BY = ('anomaly_source', 'anomaly_size')  # the embedded data's group attributes


def _config(data_dir):
  return tiny_run_config(data_dir, **{'eval.num_figures': 3, 'eval.group_by': GROUP_BY})


@pytest.fixture(scope='module')
def run(tmp_path_factory, tiny_run):
  """The shared tiny run (tests/conftest.py), copied and evaluated with figures and groups."""
  config = _config(tiny_run[0].data.data_dir)
  workdir = str(tmp_path_factory.mktemp('eval') / 'wd')
  shutil.copytree(tiny_run[1], workdir)
  checkpointing.save_config(config, workdir)  # as if trained with it: evaluate(None, ...) reads it
  out = evaluate.evaluate(config, workdir)
  return config, workdir, out


def _in01(x):
  return x is not None and 0.0 <= x <= 1.0


def test_metrics_json_schema(run):
  config, workdir, out = run
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    m = json.load(f)
  assert m == json.loads(json.dumps(out))
  for k in ('auroc', 'auprc', 'operating_point', 'n_sigma', 'baseline', 'localization', 'timing',
            'num_images', 'num_subjects'):
    assert k in m, k
  assert _in01(m['auroc']) and _in01(m['auprc']) and _in01(m['aupro'])
  assert m['aupro_max_fpr'] == 0.3 and m['num_regions'] > 0
  for k in ('auroc_std', 'auprc_std', 'aupro_std'):
    assert m[k] is not None and m[k] >= 0
  op = m['operating_point']
  for k in ('threshold', 'dice', 'iou', 'threshold_std', 'dice_std', 'iou_std'):
    assert op[k] is not None, k
  assert _in01(op['dice']) and _in01(op['iou']) and op['iou'] <= op['dice'] + 1e-12
  ns = m['n_sigma']
  assert ns['n'] == config.localize.n_sigma
  for k in ('dice', 'iou', 'dice_std', 'iou_std'):
    assert ns[k] is not None, k
  assert _in01(ns['dice']) and _in01(ns['iou'])
  assert _in01(m['baseline']['auroc']) and _in01(m['baseline']['auprc'])
  assert m['localization']['t'] == list(config.localize.t) and m['localization']['rule'] == 'global'
  assert m['timing']['images_per_s'] > 0 and m['timing']['num_devices'] == 4
  src = input_pipeline.get_source(config, 'test')
  assert m['num_images'] == len(src) == m['num_anomalous_images'] + m['num_healthy_images']
  assert m['num_subjects'] == len({src[i]['subject'] for i in range(len(src))})
  assert m['bootstrap_runs'] == config.eval.bootstrap_runs and m['method'] == 'exact'
  # Figures: valid PNGs.
  from PIL import Image
  figs = sorted(os.listdir(os.path.join(workdir, 'eval', 'figures')))
  assert figs and m['figures']
  for p in m['figures']:
    with Image.open(p) as im:
      im.verify()
      assert im.format == 'PNG'


def _test_arrays(config):
  src = input_pipeline.get_source(config, 'test')
  ex = [src[i] for i in range(len(src))]
  return (np.stack([e['image'] for e in ex]), np.stack([e['mask'][..., 0] for e in ex]),
          np.array([e['subject'] for e in ex]))


def test_metrics_match_sklearn_on_localize_maps(run, oracle):
  config, workdir, out = run
  assert os.path.exists(out['score_stats']['path'])
  images, masks, _ = _test_arrays(config)
  z = oracle['z']  # load_localizer's z-maps
  y = masks.reshape(-1) > 0
  assert abs(skm.roc_auc_score(y, z.reshape(-1)) - out['auroc']) < 1e-3
  assert abs(skm.average_precision_score(y, z.reshape(-1)) - out['auprc']) < 1e-3
  # AUPRO: metrics.aupro on the whole maps (itself checked against a brute force in test_metrics).
  assert abs(metrics_lib.aupro(z, masks) - out['aupro']) < 1e-3
  prec, rec, thr = skm.precision_recall_curve(y, z.reshape(-1))
  f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)[:-1]
  k = int(np.argmax(f1))
  assert abs(f1[k] - out['operating_point']['dice']) < 1e-3
  pred = z.reshape(-1) >= thr[k]
  assert abs(skm.jaccard_score(y, pred) - out['operating_point']['iou']) < 1e-3
  pred_n = z.reshape(-1) > config.localize.n_sigma
  dice_n = skm.f1_score(y, pred_n, zero_division=1.0)
  assert abs(dice_n - out['n_sigma']['dice']) < 1e-3
  # The trivial baseline: gaussian(|x - mean training intensity|).
  tr = input_pipeline.get_source(config, 'train')
  mean = np.mean([tr[i]['image'].astype(np.float64).mean() for i in range(len(tr))]) / 255
  base = np.stack([ndi.gaussian_filter(np.abs(im[..., 0] / 255.0 - mean), 2.0) for im in images])
  assert abs(mean - out['baseline']['mean_intensity'][0]) < 1e-6
  assert abs(skm.roc_auc_score(y, base.reshape(-1)) - out['baseline']['auroc']) < 1e-3
  assert abs(skm.average_precision_score(y, base.reshape(-1)) - out['baseline']['auprc']) < 1e-3
  assert abs(metrics_lib.aupro(base, masks) - out['baseline']['aupro']) < 1e-3


@pytest.fixture(scope='module')
def binned(run, tmp_path_factory):
  """The same run evaluated on the binned two-pass path (1 device, a padded last batch)."""
  _, workdir, _ = run
  wd = str(tmp_path_factory.mktemp('binned') / 'copy')
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns('eval', 'inference*'))
  config = checkpointing.load_config(wd)  # evaluate(None, ...) reads the same file
  config.eval.exact_max_pixels = 0
  config.eval.bootstrap_runs = 2
  config.eval.num_figures = 0
  config.eval.batch_size = 7  # indivisible by 4 devices: falls back to 1; 300 % 7 pads the last
  return wd, evaluate.evaluate(config, wd)


def test_binned_two_pass_agrees_with_exact(run, binned):
  _, _, exact = run
  _, out = binned
  assert out['method'] == 'binned' and out['timing']['test_passes'] == 2
  for k in ('auroc', 'auprc', 'aupro'):
    assert abs(out[k] - exact[k]) < 1e-3, k
  assert abs(out['operating_point']['dice'] - exact['operating_point']['dice']) < 2e-3
  assert abs(out['n_sigma']['dice'] - exact['n_sigma']['dice']) < 1e-3
  assert out['timing']['num_devices'] == 1
  assert out['num_images'] == exact['num_images']


# ---------------------------------------------------------------------------------------------
# Per-group metrics, curves and TensorBoard summaries.


@pytest.fixture(scope='module')
def oracle(run):
  """z-maps of the whole test split through load_localizer, with masks, subjects and attributes."""
  config, workdir, _ = run
  src = input_pipeline.get_source(config, 'test')
  assert set(GROUP_BY) <= set(src.attributes)
  ex = [src[i] for i in range(len(src))]
  images = np.stack([e['image'] for e in ex])
  localizer = rundir.load_localizer(workdir)
  zs = []
  for s in range(0, len(images), 50):
    z, mask = localizer(images[s:s + 50])
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(z) > config.localize.n_sigma)
    zs.append(np.asarray(z))
  return {'z': np.concatenate(zs).astype(np.float64),
          'y': np.stack([e['mask'][..., 0] for e in ex]) > 0,
          'subject': np.array([e['subject'] for e in ex]),
          **{a: np.array([e[a] for e in ex]) for a in GROUP_BY}}


def _check_groups(out, oracle, n, tol):
  assert list(out['groups']) == list(GROUP_BY)
  for attr in GROUP_BY:
    section = out['groups'][attr]
    assert sorted(section['values']) == sorted(set(oracle[attr]))
    assert sum(e['num_images'] for e in section['values'].values()) == out['num_images']
    for value, e in section['values'].items():
      keep = oracle[attr] == value
      assert e['num_images'] == keep.sum(), (attr, value)
      assert e['num_subjects'] == len(set(oracle['subject'][keep]))
      if value == 'none':  # the healthy crops: no anomalous pixel, so no AUROC/AUPRC/OP
        assert e['auroc'] is None and e['auprc'] is None and 'no anomalous pixels' in e['reason']
        assert e['n_sigma']['dice'] is None
        assert abs(e['n_sigma']['fpr'] - (oracle['z'][keep] > n).mean()) < 1e-3
        continue
      ref = whole_set_metrics(oracle['z'][keep], oracle['y'][keep], n)
      for got, want in ((e['auroc'], 'auroc'), (e['auprc'], 'auprc'),
                        (e['operating_point']['dice'], 'op_dice'),
                        (e['operating_point']['iou'], 'op_iou'),
                        (e['n_sigma']['dice'], 'ns_dice'), (e['n_sigma']['iou'], 'ns_iou')):
        assert abs(got - ref[want]) < tol, (attr, value, want, got, ref[want])
    for m, g in section['gap'].items():
      vals = {v: groups.value_at(e, groups.METRICS[m][1]) for v, e in section['values'].items()
              if v != 'none'}
      assert g['gap'] == pytest.approx(max(vals.values()) - min(vals.values()), abs=1e-12), m
      assert g['gap_std'] is not None and g['gap_ci95'][0] <= g['gap_ci95'][1]


def test_group_metrics_equal_sklearn_on_each_groups_images(run, oracle):
  config, workdir, out = run
  _check_groups(out, oracle, config.localize.n_sigma, tol=1e-3)
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    text = f.read()
  json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in metrics.json'))  # no NaN/inf
  for attr in GROUP_BY:
    from PIL import Image
    with Image.open(out['groups'][attr]['figure']) as im:
      assert im.format == 'PNG'
  assert out['groups']['anomaly_size']['values']['none']['num_images'] == out['num_healthy_images']


def test_binned_group_metrics_equal_sklearn_on_each_groups_images(run, binned, oracle):
  config, _, _ = run
  _, out = binned
  assert out['method'] == 'binned'
  _check_groups(out, oracle, config.localize.n_sigma, tol=2e-3)


def _integrated(points_path):
  d = np.load(points_path)
  auroc = float(np.trapezoid(d['roc_tpr'], d['roc_fpr']))
  auprc = float(np.sum(np.diff(d['pr_recall'], prepend=0.0) * d['pr_precision']))
  return d, auroc, auprc


def test_curve_points_integrate_to_metrics_json(run, binned):
  for workdir in (run[1], binned[0]):
    with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
      m = json.load(f)
    d, auroc, auprc = _integrated(m['curves']['points'])
    assert abs(auroc - m['auroc']) < 1e-9 and abs(auprc - m['auprc']) < 1e-9, workdir
    # The marked points: the OP's F1 is its Dice; N sigma's rates are metrics.json's.
    p, r = float(d['op_precision']), float(d['op_tpr'])
    assert abs(2 * p * r / (p + r) - m['operating_point']['dice']) < 1e-9
    assert float(d['n_sigma_tpr']) == m['n_sigma']['tpr']
    assert float(d['n_sigma_threshold']) == m['localization']['n_sigma_threshold']
    assert d['hist_anomalous'].sum() == m['num_positive_pixels']
    from PIL import Image
    for name in ('roc', 'pr', 'z_histogram'):
      with Image.open(m['curves']['figures'][name]) as im:
        assert im.format == 'PNG'


def test_tensorboard_holds_the_evaluation(run):
  from tensorboard.backend.event_processing import event_accumulator
  _, workdir, out = run
  ea = event_accumulator.EventAccumulator(out['tensorboard'],
                                          size_guidance={event_accumulator.IMAGES: 0,
                                                         event_accumulator.TENSORS: 0})
  ea.Reload()
  tensors = {t: ea.Tensors(t) for t in ea.Tags()['tensors']}
  step = out['checkpoint_step']
  assert step == 10  # the run trained 10 steps; the best checkpoint is its last
  for tag in ('auroc', 'aupro'):
    value = tensors[f'eval/{tag}'][0]
    assert value.step == step
    assert abs(float(np.asarray(tf_value(value))) - out[tag]) < 1e-6
  gap = tensors['eval_groups/anomaly_size/gap/auroc'][0]
  want = out['groups']['anomaly_size']['gap']['auroc']['gap']
  assert abs(float(np.asarray(tf_value(gap))) - want) < 1e-6
  for tag in ('eval/roc', 'eval/pr', 'eval/z_histogram', 'eval/groups_anomaly_source',
              'eval/test_grid_00'):
    assert tag in tensors, sorted(tensors)
  assert 'tensorboard' in os.listdir(workdir)  # training's summaries sit beside: one --logdir


def tf_value(event):
  from tensorboard.util import tensor_util
  return tensor_util.make_ndarray(event.tensor_proto)


def test_unknown_group_attribute_names_the_available_ones(run):
  config, workdir, _ = run
  bad = _config(config.data.data_dir)
  bad.eval.group_by = ('anomaly_source', 'skin_color')
  with pytest.raises(ValueError, match=r"'skin_color'.*available are \['anomaly_size', "
                                       r"'anomaly_source'\]"):
    evaluate.evaluate(bad, workdir)


def test_empty_validation_is_a_clear_error(run):
  config, workdir, _ = run
  with pytest.raises(ValueError, match='validation split.*empty'):
    evaluate.evaluate(config, workdir, val_source=[])
  # One validation image and the per_pixel rule: a std of 0 at every pixel flagged everything.
  one = config.copy_and_resolve_references()
  one.localize.stats = 'per_pixel'
  val = input_pipeline.get_source(config, 'validation')
  with pytest.raises(ValueError, match=r"per_pixel rule .* holds 1, it needs at least 2 .*"
                                       r"--config\.localize\.stats=global"):
    evaluate.evaluate(one, workdir, val_source=[val[0]])


def test_config_of_another_model_is_rejected(run):
  config, workdir, _ = run
  other = _config(config.data.data_dir)
  other.model.nf = 16
  with pytest.raises(ValueError, match='nf'):
    evaluate.evaluate(other, workdir)


def test_run_eval_without_checkpoint(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'run_eval.py'), f'--workdir={empty}'],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert 'train first' in proc.stderr and str(empty) in proc.stderr
  # A run directory with its config but no checkpoint yet.
  wd = tmp_path / 'wd'
  checkpointing.save_config(_config(tmp_path / 'tfds'), str(wd))
  with pytest.raises(FileNotFoundError, match='no checkpoint.*train first'):
    evaluate.evaluate(None, str(wd))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    evaluate.evaluate(None, str(tmp_path / 'missing'))


def test_summary_reports_the_metrics(run):
  _, workdir, out = run
  text = report.format_summary(out, workdir, 90.0)
  assert f"pixel AUROC   {out['auroc']:.3f}" in text
  assert f"AUPRO@0.3     {out['aupro']:.3f} ± {out['aupro_std']:.3f}" in text
  assert f"trivial baseline {out['baseline']['auroc']:.3f}" in text
  assert 'N = 3 sigma' in text and os.path.join(workdir, 'eval', 'metrics.json') in text


def test_compare_writes_table_and_side_by_side_figure(run, tmp_path):
  """run_compare.py on a real evaluated run (twice, as two columns): the table repeats its metrics
  and the figure localizes the same test images through load_localizer."""
  _, workdir, out = run
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'run_compare.py'),
                         f'--workdirs={workdir},{workdir}', f'--out={tmp_path}'],
                        capture_output=True, text=True, cwd=REPO, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.load(open(tmp_path / 'compare.json'))['rows']
  assert len(rows) == 2 and rows[0]['auroc'] == out['auroc'] and rows[0]['method'] == 'sano'
  assert f"{out['auroc']:.3f}" in proc.stdout
  from PIL import Image
  with Image.open(tmp_path / 'compare.png') as im:
    assert im.size[0] > 400 and im.size[1] > 300


def test_figure_rows_span_the_anomaly_sizes_and_include_healthy_images():
  sizes = np.array([0, 50, 3, 0, 20, 7, 0, 100, 1, 12])
  picks = report.pick_rows(sizes, 6)
  anomalous = [i for i in picks if sizes[i] > 0]
  assert anomalous[0] == 7 and anomalous[-1] == 8  # the largest and the smallest anomaly
  assert [sizes[i] for i in anomalous] == sorted((sizes[i] for i in anomalous), reverse=True)
  assert sum(sizes[i] == 0 for i in picks) == 1 and len(set(picks)) == len(picks) == 6
  assert report.pick_rows(np.zeros(5), 3) == [0, 2, 4]  # all healthy: spread over them
  assert report.pick_rows(sizes, 0) == []
  assert sorted(report.pick_rows(sizes, 50)) == list(range(10))  # fewer images than rows
