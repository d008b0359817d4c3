r"""`make demo`: SANO end to end on the embedded data, on a CPU, in a few minutes.

Builds the embedded texture dataset (offline), trains configs/demo.py, evaluates the best checkpoint
(label-free calibration, healthy statistics, test-split metrics with subject bootstrap, figures),
writes the full summary to WORKDIR/eval/summary.txt and prints five lines: the metrics, where the
figures are, the command to look at them.

  python run_demo.py --workdir=workdirs/demo [--config=configs/demo.py:grass] [--config.x.y=...]
"""
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

flags.DEFINE_string('workdir', 'workdirs/demo', 'Where the run writes checkpoints, metrics and figures.')
config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Demo configuration.', lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from sano_jax import cli
  cli.setup_logging()
  from sano_jax import evaluate, report, train
  config, workdir = FLAGS.config, FLAGS.workdir
  tic = time.perf_counter()
  print(f'[1/2] training {config.data.dataset} at {config.data.image_size} px for '
        f'{config.training.num_train_steps} steps in {workdir} (resumes if interrupted)', flush=True)
  if not train.finished(train.train_and_evaluate(config, workdir), config):
    print('preempted: the checkpoint is saved; run the same command again to resume', flush=True)
    return
  print('[2/2] evaluating the best checkpoint: calibration on healthy validation images, healthy '
        'statistics, the test split', flush=True)
  metrics = evaluate.evaluate(config, workdir)
  seconds = time.perf_counter() - tic
  from sano_jax import files  # pylint: disable=g-import-not-at-top
  files.atomic_write_text(os.path.join(workdir, 'eval', report.SUMMARY_FILE),
                          report.format_summary(metrics, workdir, seconds) + '\n')
  print('\n' + report.brief_summary(metrics, workdir, seconds), flush=True)


if __name__ == '__main__':
  from sano_jax import cli
  app.run(main, flags_parser=cli.parse_flags)
