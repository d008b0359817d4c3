r"""The real-defect development benchmark: every method on KolektorSDD at one fixed CPU budget.

  PYTHONPATH=. .venv/bin/python benchmarks/kolektor.py --src=KolektorSDD_Yolov8_Datasets \
      --out=data/kolektor                                     # once (benchmarks/kolektor.py)
  PYTHONPATH=. .venv/bin/python benchmarks/real_defects.py --data=data/kolektor \
      --root=workdirs/kolektor [--methods=sano,ae,...] [--config.training.num_train_steps=1500]

Each method is trained on the defect-free train/good images with `configs/mvtec.py`'s defaults
(the label-free calibration on; grayscale), the same steps x batch for all (default 1500 x 16,
about 30 min of 2 CPU cores for SANO), then evaluated on test/ (good + crack) by run_eval's
evaluation, and `sano_jax.compare` writes the table. This script adds the AUPRO column, the
command, the commit and each run's wall time, in ROOT/real_defects.md and ROOT/real_defects.json.
Runs already evaluated in ROOT/<method> are kept (delete one to redo it). Nothing here reads a test
label to choose anything: the calibration sees the healthy validation images only.
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('data', None, 'The MVTec-layout folder benchmarks/kolektor.py wrote.',
                    required=True)
flags.DEFINE_string('root', 'workdirs/kolektor', 'One run per method in ROOT/<method>.')
flags.DEFINE_list('methods', ['sano', 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm'],
                  'The methods to train, evaluate and compare.')
config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'The config every method trains with.',
                                lock_config=False)
FLAGS = flags.FLAGS


def benchmark_config(config, data: str):
  """configs/mvtec.py on the converted folder: grayscale, 1500 steps x 16 unless overridden."""
  config.data.root = data
  config.data.num_channels = 1
  if '--config.training.num_train_steps' not in ' '.join(sys.argv):
    config.training.num_train_steps = 1500
  return config


def commit() -> str:
  try:
    out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, check=True,
                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    return out + ('+changes' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv):
  del argv
  from sano_jax import cli, compare, files  # pylint: disable=g-import-not-at-top
  cli.setup_logging()
  config = benchmark_config(FLAGS.config, FLAGS.data)
  code = commit()  # the code that trains: HEAD may move while this runs
  tic = time.perf_counter()
  workdirs = compare.train_all(config, FLAGS.root, FLAGS.methods)
  if workdirs is None:  # preempted: resume with the same command
    return
  result = compare.compare(workdirs, FLAGS.root)
  command = ' '.join(['python'] + sys.argv)
  header = (f'# Real defects: KolektorSDD ({FLAGS.data})\n\n'
            f'command: `{command}`  \ncommit: {code}  \n'
            f'budget: {config.training.num_train_steps} steps x {config.training.batch_size} '
            f'images at {config.data.image_size} px per method; this call took '
            f'{(time.perf_counter() - tic) / 60:.1f} min\n\n')
  files.atomic_write_text(os.path.join(FLAGS.root, 'real_defects.md'), header + result['markdown'])
  files.atomic_write_json(os.path.join(FLAGS.root, 'real_defects.json'),
                          {'command': command, 'commit': code, 'rows': result['rows']})
  print(header + result['markdown'])


if __name__ == '__main__':
  from sano_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
