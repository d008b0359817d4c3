r"""Evaluate the best checkpoint of a run (SANO or a baseline): calibrate, score the test split, report.

  python run_eval.py --workdir=workdirs/demo            # the run's own config.json
  python run_eval.py --config=configs/demo.py --workdir=workdirs/demo [--config.eval.bootstrap_runs=10]
  python run_eval.py --workdir=gs://bucket/runs/hands --distributed     # on every host of a slice

Writes the run's inference bundle (WORKDIR/inference.json and WORKDIR/inference/: the healthy
statistics with the settings and checkpoint step they belong to, read by load_localizer, predict
and export), WORKDIR/eval/metrics.json and WORKDIR/eval/figures/*.png. With
--distributed each process scores its share of the splits and process 0 writes (sano_jax/evaluate.py).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Run directory holding config.json and the checkpoints.')
config_flags.DEFINE_config_file('config', None, 'Evaluation configuration file (default: the '
                                "run's WORKDIR/config.json).", lock_config=True)
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; also when '
                  'SANO_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set).')
flags.DEFINE_string('method', None, 'The method WORKDIR must hold (sano, ae, vae, cevae, vqvae, '
                    'anovaegan, anoddpm); default: config.method of the run or of --config.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from sano_jax import cli
  cli.setup_logging()
  from sano_jax import distributed
  distributed.maybe_initialize(FLAGS.distributed)
  from sano_jax import evaluate, report
  config = FLAGS.config  # None: evaluate() reads WORKDIR/config.json
  if config is not None:
    logging.info('config:\n%s', config)
  if FLAGS.method is not None:
    from sano_jax import checkpointing, methods
    held = methods.method_name(config if config is not None else
                               checkpointing.load_config(FLAGS.workdir))
    if methods.check_name(FLAGS.method) != held:
      print(f'error: --method={FLAGS.method} but {"--config" if config is not None else FLAGS.workdir} '
            f'holds method {held!r}', file=sys.stderr)
      sys.exit(1)
  try:
    out = evaluate.evaluate(config, FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:  # no run, another method: a message, not a traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if out is not None:  # None: a process other than 0 (process 0 reports)
    print(report.format_summary(out, FLAGS.workdir, out['timing']['total_seconds']))


if __name__ == '__main__':
  from sano_jax import cli
  app.run(main, flags_parser=cli.parse_flags)
