"""The comparison table (Table 1's layout) from evaluated runs' metrics.json."""
import json
import os

import numpy as np
import pytest

from sano_jax import compare


def _write_run(workdir, method, auroc, dataset='sano_textures/brick_32', speeds=(10.0, 30.0, 20.0),
               aupro=None, rule='per_pixel', n_sigma=3.0, smoothing_sigma=None, baseline=0.65):
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  metrics = {
      'auroc': auroc, 'auroc_std': 0.01, 'auprc': auroc / 2, 'auprc_std': 0.02,
      'operating_point': {'threshold': 2.0, 'dice': 0.5, 'dice_std': 0.03, 'iou': 0.33,
                          'iou_std': 0.02},
      'n_sigma': {'n': n_sigma, 'dice': None, 'dice_std': None, 'iou': 0.1, 'iou_std': 0.01},
      'baseline': {'auroc': baseline}, 'num_images': 300,
      'data': {'dataset': dataset, 'test_split': 'test'},
      'localization': {'method': method, 'rule': rule}}
  if smoothing_sigma is not None:  # metrics.json of older runs has none
    metrics['localization']['smoothing_sigma'] = smoothing_sigma
  if aupro is not None:  # metrics.json written before AUPRO existed has none
    metrics.update(aupro=aupro, aupro_std=0.04)
  with open(os.path.join(workdir, 'eval', 'metrics.json'), 'w') as f:
    json.dump(metrics, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for i, s in enumerate(speeds):
      f.write(json.dumps({'step': i, 'perf/images_per_s': s, 'perf/wall_s': 10.0 * (i + 1)}) + '\n')
  return str(workdir)


def test_table_json_and_best_values(tmp_path):
  a = _write_run(tmp_path / 'a', 'sano', 0.9, aupro=0.7)
  b = _write_run(tmp_path / 'b', 'vqvae', 0.8, speeds=(50.0,))
  out = compare.compare([a, b], str(tmp_path / 'out'), figure=False)
  md = open(tmp_path / 'out' / 'compare.md').read()
  assert md == out['markdown']
  lines = md.splitlines()
  assert lines[0].startswith('| method | AUROC | AUPRC | AUPRO | Dice @ OP | IoU @ OP | Dice @ Nσ* |'
                             ' IoU @ Nσ*')
  sano, vq = lines[2].split(' | '), lines[3].split(' | ')
  assert sano[0] == '| sano' and sano[1] == '**0.900 ± 0.010**' and vq[1] == '0.800 ± 0.010'
  assert sano[3] == '**0.700 ± 0.040**' and vq[3] == 'n/a ± n/a'
  assert sano[6] == 'n/a ± n/a'  # a null Dice (no positive pixel) is n/a, not 0 or NaN
  assert sano[-2:] == ['20', '30 |'] and vq[-2] == '50'  # median img/s, last wall seconds
  rows = json.load(open(tmp_path / 'out' / 'compare.json'))['rows']
  assert [r['method'] for r in rows] == ['sano', 'vqvae'] and rows[1]['auroc'] == 0.8


def test_calibrated_runs_show_their_own_rule_and_n(tmp_path):
  """Calibrated runs each choose a rule and N: the table shows them per row, not one for all."""
  a = _write_run(tmp_path / 'a', 'sano', 0.9)
  b = _write_run(tmp_path / 'b', 'ae', 0.8, rule='density', n_sigma=1.25)
  md = compare.compare([a, b], str(tmp_path / 'out'), figure=False)['markdown']
  lines = md.splitlines()
  assert '| rule, N |' in lines[0]
  assert '| per_pixel, 3 |' in lines[2] and '| density, 1.25 |' in lines[3]
  assert "each run's own rule and N" in md


def test_errors_name_the_problem(tmp_path):
  a = _write_run(tmp_path / 'a', 'sano', 0.9)
  b = _write_run(tmp_path / 'b', 'ae', 0.8, dataset='sano_textures/grass_32')
  with pytest.raises(ValueError, match='not evaluated on the same test data.*brick_32.*grass_32'):
    compare.compare([a, b], str(tmp_path / 'out'), figure=False)
  with pytest.raises(FileNotFoundError, match='run_eval.py --workdir=.*missing'):
    compare.compare([a, str(tmp_path / 'missing')], str(tmp_path / 'out'), figure=False)


def test_pick_examples_spans_anomaly_sizes():
  sizes = [0, 5, 40, 0, 12, 1, 7]
  masks = np.zeros((len(sizes), 8, 8), np.uint8)
  for i, s in enumerate(sizes):
    masks[i].flat[:s] = 1
  # anomalous by size: 40 (2), 12 (4), 7 (6), 5 (1), 1 (5): largest, median, smallest; healthy 0.
  assert compare.pick_examples(masks) == [2, 6, 5, 0]


def test_anoddpm_reuses_a_trained_sano_model(tmp_path):
  """AnoDDPM trains SANO's model with SANO's loss: train_all copies SANO's checkpoints (not its
  statistics or evaluation) and writes the anoddpm config; a different model is never reused."""
  from sano_jax import checkpointing
  from tests.helpers import tiny_config
  sano = tmp_path / 'sano'
  (sano / 'best' / '10').mkdir(parents=True)
  (sano / 'best' / '10' / 'params').write_text('checkpoint bytes')
  (sano / 'eval').mkdir()
  (sano / 'score_stats.npz').write_text('stats')  # the layout before the inference bundle
  (sano / 'inference.json').write_text('{}')
  (sano / 'inference').mkdir()
  checkpointing.save_config(tiny_config(method='sano'), str(sano))
  assert compare.reuse_model(str(sano), str(tmp_path / 'anoddpm'), tiny_config(method='anoddpm'))
  copied = tmp_path / 'anoddpm'
  assert (copied / 'best' / '10' / 'params').read_text() == 'checkpoint bytes'
  assert not any((copied / n).exists() for n in ('eval', 'score_stats.npz', 'inference.json',
                                                 'inference'))
  assert checkpointing.load_config(str(copied)).method == 'anoddpm'
  assert not compare.reuse_model(str(sano), str(tmp_path / 'other'),
                                 tiny_config(**{'method': 'anoddpm', 'model.nf': 16}))
  assert not (tmp_path / 'other').exists()
  assert not compare.reuse_model(str(sano), str(tmp_path / 'ae'), tiny_config(method='ae'))


def test_a_preempted_training_is_not_evaluated(tmp_path, monkeypatch):
  """train_all after a SIGTERM: train_and_evaluate returns the state it saved (step < the budget);
  evaluating it would put a half-trained model in the table and mark the run done."""
  import types
  from configs import tiny
  from sano_jax import evaluate, train
  config = tiny.get_config()
  config.training.num_train_steps = 20
  calls = []
  monkeypatch.setattr(train, 'train_and_evaluate',
                      lambda cfg, wd: types.SimpleNamespace(step=np.int32(7)))
  monkeypatch.setattr(evaluate, 'evaluate', lambda *a, **k: calls.append(a))
  assert compare.train_all(config, str(tmp_path), ['sano', 'ae']) is None
  assert calls == [] and not (tmp_path / 'sano' / 'eval').exists()
  assert train.finished(types.SimpleNamespace(step=np.int32(20)), config)
  assert not train.finished(types.SimpleNamespace(step=np.int32(19)), config)


def test_the_trivial_baseline_is_given_at_each_runs_smoothing_sigma(tmp_path):
  """The baseline's AUROC depends on the smoothing each run applies (its calibrated sigma): the
  note gives one value per sigma, smallest sigma first, not the first run's value for all."""
  runs = [_write_run(tmp_path / name, name, 0.8, smoothing_sigma=sigma, baseline=baseline)
          for name, sigma, baseline in (('sano', 4.0, 0.770), ('vqvae', 2.0, 0.847),
                                        ('ae', 4.0, 0.770))]
  last = compare.compare(runs, str(tmp_path / 'out'), figure=False)['markdown'].splitlines()[-1]
  assert last.endswith('smooths its map): 0.847 at sigma 2, 0.770 at sigma 4.')
  one = compare.compare(runs[:1], str(tmp_path / 'one'), figure=False)['markdown']
  assert one.rstrip().endswith('smooths its map): 0.770 at sigma 4.')
  # metrics.json without the sigma (older runs): the value alone.
  plain = _write_run(tmp_path / 'plain', 'sano', 0.8)
  assert compare.compare([plain], str(tmp_path / 'p'), figure=False)['markdown'].rstrip().endswith(
      'smooths its map): 0.650.')
