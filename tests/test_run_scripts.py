"""run_demo.py and run_eval.py as a user runs them: child processes on the embedded data at the
tiny config's 16 px (10 training steps), checked for the files they promise and a printed summary
that names them and agrees with metrics.json. (run_train.py's success path: the uninterrupted run
of tests/test_run_train.py.)"""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from sano_jax import input_pipeline
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_BY = ('anomaly_source', 'anomaly_size')  # the demo's groups
TINY = ['--config=configs/tiny.py', '--config.training.num_train_steps=10',
        '--config.training.eval_every=10', '--config.training.checkpoint_every=10',
        '--config.training.log_every=5', '--config.training.eval_batches=1',
        '--config.training.ema_rate=0.5', '--config.eval.num_figures=2',
        '--config.eval.bootstrap_runs=3', '--config.localize.stats=per_pixel',  # the demo's rule
        f'--config.eval.group_by={GROUP_BY!r}']


def _run(script, *args, log):
  """`python script args` in the repository on 4 simulated CPU devices; (exit code, output)."""
  with open(log, 'w') as f:  # a file, not a pipe that nobody reads while the test waits
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                            stdout=f, stderr=subprocess.STDOUT, env=helpers.subprocess_env(4))
  return helpers.finish_process(proc, log)


def _metrics(workdir):
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    return json.load(f)


def _summary_numbers(out: str) -> dict:
  """The printed summary's AUROC, AUPRC and Dice values (the last summary in `out`)."""
  num = r'(-?[\d.]+|n/a) ± (-?[\d.]+|n/a)'
  found = {k: re.findall(rf'{pattern}\s+{num}', out) for k, pattern in
           (('auroc', 'pixel AUROC'), ('auprc', 'pixel AUPRC'), ('op_dice', r'best F1.*Dice'),
            ('ns_dice', r'sigma \(healthy data only\):\s+Dice'))}
  assert all(found.values()), (found, out[-3000:])
  return {k: v[-1] for k, v in found.items()}


def _expected_numbers(m: dict) -> dict:
  f = lambda v: 'n/a' if v is None else f'{v:.3f}'
  return {'auroc': (f(m['auroc']), f(m['auroc_std'])), 'auprc': (f(m['auprc']), f(m['auprc_std'])),
          'op_dice': (f(m['operating_point']['dice']), f(m['operating_point']['dice_std'])),
          'ns_dice': (f(m['n_sigma']['dice']), f(m['n_sigma']['dice_std']))}


def _check_evaluation(workdir, out, data_dir, bootstrap_runs):
  """metrics.json, figures and the printed summary of an evaluation of `workdir`."""
  m = _metrics(workdir)
  config = helpers.tiny_config(**{'data.dataset': 'sano_textures/brick', 'data.data_dir': data_dir})
  test = input_pipeline.get_source(config, 'test')
  assert m['num_images'] == len(test) > 0
  assert m['num_subjects'] == len({test[i]['subject'] for i in range(len(test))})
  assert m['bootstrap_runs'] == bootstrap_runs
  for v in (m['auroc'], m['auprc'], m['baseline']['auroc'], m['operating_point']['dice'],
            m['n_sigma']['dice']):
    assert 0.0 <= v <= 1.0, m
  assert os.path.exists(m['score_stats']['path']) and os.path.exists(
      os.path.join(workdir, 'inference.json'))
  # The figures it lists: PNGs in eval/figures, with the ROC, PR, histogram and group figures.
  figures_dir = os.path.join(workdir, 'eval', 'figures')
  listed = m['figures'] + list(m['curves']['figures'].values()) + \
      [m['groups'][a]['figure'] for a in GROUP_BY]
  names = {os.path.basename(p) for p in listed}
  assert {'roc.png', 'pr.png', 'z_histogram.png'} | {f'groups_{a}.png' for a in GROUP_BY} <= names
  assert any(n.startswith('test_grid_') for n in names), names
  for p in listed:
    assert os.path.dirname(p) == figures_dir, p
    with Image.open(p) as im:
      assert im.format == 'PNG'
  # The summary: the paths, the numbers of metrics.json, a table per group attribute.
  assert f"metrics: {os.path.join(workdir, 'eval', 'metrics.json')}" in out, out[-3000:]
  assert f'figures: {figures_dir}/' in out
  assert (f'TensorBoard: tensorboard --logdir={workdir}' in out) == bool(m['tensorboard'])
  assert f"{m['num_images']} test images, {m['num_subjects']} subjects" in out
  assert f"{m['localization']['rule']} healthy statistics" in out
  for a in GROUP_BY:
    assert f'by {a} ' in out
  assert _summary_numbers(out) == _expected_numbers(m)
  return m


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """run_demo.py on the tiny settings: (workdir, data_dir, exit code, output)."""
  root = tmp_path_factory.mktemp('demo')
  data_dir = helpers.build_textures(root / 'tfds')
  workdir = str(root / 'wd')
  code, out = _run('run_demo.py', *TINY, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                   log=root / 'demo.log')
  return workdir, data_dir, code, out


def test_run_demo_trains_evaluates_and_reports(demo):
  workdir, data_dir, code, out = demo
  assert code == 0, out[-4000:]
  assert f'[1/2] training sano_textures/brick at 16 px for 10 steps in {workdir}' in out
  assert '[2/2] evaluating the best checkpoint: calibration' in out
  # Training's outputs: the config, the log (validation at step 10), the checkpoints.
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['data']['image_size'] == 16 and saved['training']['num_train_steps'] == 10
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'validation/loss' in r] == [10]
  assert [r['step'] for r in rows if 'train/loss' in r] == [5, 10]
  assert [s for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()] == ['10']
  assert os.listdir(os.path.join(workdir, 'best'))
  with open(os.path.join(workdir, 'eval', 'summary.txt')) as f:
    summary = f.read()  # the full summary; the console ends with five lines
  m = _check_evaluation(workdir, summary, data_dir, bootstrap_runs=3)
  assert m['localization']['rule'] == 'per_pixel' and m['data']['dataset'] == 'sano_textures/brick'
  brief = out.rstrip().splitlines()[-5:]
  assert brief[0].startswith('done in ') and f"pixel AUROC {m['auroc']:.3f} ± " in brief[0], brief
  assert f"AUPRO {m['aupro']:.3f}" in brief[0] and f"{m['num_images']} test images" in brief[0]
  assert f"Dice at the label-free threshold (per_pixel, N = {m['n_sigma']['n']:.3g}): " \
      f"{m['n_sigma']['dice']:.3f}" in brief[1], brief
  assert f"figures: {os.path.join(workdir, 'eval', 'figures')}/" in brief[2]
  assert f"all metrics: {os.path.join(workdir, 'eval', 'metrics.json')}" in brief[3]
  assert brief[4] == f'look at them: tensorboard --logdir={workdir}'


def test_run_eval_reproduces_the_demo_and_takes_overrides(demo, tmp_path):
  workdir, data_dir, code, demo_out = demo
  assert code == 0, demo_out[-4000:]
  first = _metrics(workdir)
  # The run's own config.json: the same evaluation, the same numbers.
  code, out = _run('run_eval.py', f'--workdir={workdir}', log=tmp_path / 'eval.log')
  assert code == 0, out[-4000:]
  again = _check_evaluation(workdir, out, data_dir, bootstrap_runs=3)
  assert _expected_numbers(again) == _expected_numbers(first)
  assert again['auroc'] == first['auroc'] and again['auprc'] == first['auprc']
  # --config with an override, and --method naming the run's method.
  code, out = _run('run_eval.py', *TINY, f'--workdir={workdir}', '--method=sano',
                   f'--config.data.data_dir={data_dir}', '--config.eval.bootstrap_runs=2',
                   log=tmp_path / 'eval_config.log')
  assert code == 0, out[-4000:]
  other = _check_evaluation(workdir, out, data_dir, bootstrap_runs=2)
  assert other['auroc'] == first['auroc']  # the bootstrap changes only the spreads
