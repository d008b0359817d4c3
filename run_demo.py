r"""`make demo`: SANO end to end on the embedded data, on a CPU, in a few minutes.

Builds the embedded texture dataset (offline), trains configs/demo.py, evaluates the best checkpoint
(healthy statistics, test-split metrics with subject bootstrap, figures) and prints a summary.

  python run_demo.py --workdir=workdirs/demo [--config=configs/demo.py:grass] [--config.x.y=...]
"""
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', 'workdirs/demo', 'Where the run writes checkpoints, metrics and figures.')
config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Demo configuration.', lock_config=True)
FLAGS = flags.FLAGS


def summary(metrics: dict, workdir: str, seconds: float) -> str:
  """The demo's closing table."""
  op, ns, base = metrics['operating_point'], metrics['n_sigma'], metrics.get('baseline') or {}
  pm = lambda key, d=metrics: f"{d[key]:.3f} ± {d.get(key + '_std') or 0:.3f}"
  rows = [
      f"SANO on {metrics.get('dataset', 'the embedded data')}: {metrics['num_images']} test images, "
      f"{metrics['num_subjects']} subjects ({seconds / 60:.1f} min)",
      f"  pixel AUROC   {pm('auroc')}     trivial baseline {base.get('auroc', float('nan')):.3f}",
      f"  pixel AUPRC   {pm('auprc')}     trivial baseline {base.get('auprc', float('nan')):.3f}",
      f"  operating point (best F1, uses test labels): Dice {pm('dice', op)}  IoU {pm('iou', op)}",
      f"  N = {ns['n']:g} sigma (healthy data only):       Dice {pm('dice', ns)}  IoU {pm('iou', ns)}",
      f"  metrics: {os.path.join(workdir, 'eval', 'metrics.json')}",
      f"  figures: {os.path.join(workdir, 'eval', 'figures')}/",
  ]
  return '\n'.join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from sano_jax import cli
  cli.setup_logging()
  from sano_jax import evaluate, train
  config, workdir = FLAGS.config, FLAGS.workdir
  tic = time.perf_counter()
  print(f'[1/2] training {config.data.dataset} at {config.data.image_size} px for '
        f'{config.training.num_train_steps} steps in {workdir} (resumes if interrupted)', flush=True)
  train.train_and_evaluate(config, workdir)
  print('[2/2] evaluating the best checkpoint on the test split', flush=True)
  metrics = evaluate.evaluate(config, workdir)
  print('\n' + summary(metrics, workdir, time.perf_counter() - tic), flush=True)


if __name__ == '__main__':
  app.run(main)
