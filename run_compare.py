r"""Table 1 in our harness: compare evaluated runs of any methods, or train them all first.

  # compare runs that run_eval.py has evaluated (same test data):
  python run_compare.py --workdirs=workdirs/sano,workdirs/vqvae --out=workdirs/compare
  # train + evaluate every method on one config (skipping runs already evaluated), then compare:
  python run_compare.py --config=configs/demo.py --root=workdirs/compare \
      [--methods=sano,ae,vae,cevae,vqvae,anovaegan,anoddpm] [--config.training.num_train_steps=600]

Writes OUT/compare.md, OUT/compare.json and OUT/compare.png (OUT defaults to ROOT, or to the
first workdir's parent folder).
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

flags.DEFINE_list('workdirs', [], 'Evaluated run directories to compare.')
flags.DEFINE_string('root', None, 'With --config: one run per method in ROOT/<method>.')
flags.DEFINE_list('methods', ['sano', 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm'],
                  'With --config: the methods to train, evaluate and compare.')
flags.DEFINE_string('out', None, 'Output folder (default: ROOT, or the parent of the first workdir).')
flags.DEFINE_bool('figure', True, 'Also write compare.png.')
config_flags.DEFINE_config_file('config', None, 'Config to train every method with (optional).',
                                lock_config=False)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from sano_jax import cli, compare  # pylint: disable=g-import-not-at-top
  cli.setup_logging()
  workdirs = list(FLAGS.workdirs)
  try:
    if FLAGS.config is not None:
      if not FLAGS.root:
        raise app.UsageError('--config needs --root (one run per method goes in ROOT/<method>)')
      trained = compare.train_all(FLAGS.config, FLAGS.root, FLAGS.methods)
      if trained is None:  # preempted: resume with the same command
        return
      workdirs += trained
    if not workdirs:
      raise app.UsageError('give --workdirs=W1,W2,... or --config=... --root=...')
    from sano_jax import files  # pylint: disable=g-import-not-at-top
    out = FLAGS.out or FLAGS.root or os.path.dirname(files.absolute(workdirs[0]))
    result = compare.compare(workdirs, out, figure=FLAGS.figure)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(result['markdown'])
  print(f'wrote {os.path.join(out, "compare.md")}, compare.json'
        + (', compare.png' if result['figure'] else ''))


if __name__ == '__main__':
  from sano_jax import cli
  app.run(main, flags_parser=cli.parse_flags)
