r"""Train the SANO score model.

  python run_train.py --config=configs/demo.py --workdir=workdirs/demo [--config.training.batch_size=8]
  python run_train.py --config=configs/default.py --workdir=/data/runs/hands --distributed

Rerunning the same command resumes from the newest intact checkpoint in --workdir. Preempted (SIGTERM,
e.g. on a preemptible Cloud TPU VM; JAX's preemption notice with --distributed), the run finishes its
step, saves a checkpoint there on all hosts and exits 0.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and TensorBoard summaries.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host; also when '
                  'SANO_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS is set).')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from sano_jax import cli
  cli.setup_logging()
  from sano_jax import distributed
  distributed.maybe_initialize(FLAGS.distributed)
  from sano_jax import train
  logging.info('config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  from sano_jax import cli
  app.run(main, flags_parser=cli.parse_flags)
