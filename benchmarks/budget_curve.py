r"""What training budget buys on real defects: pixel AUROC and AUPRO against steps, per model width.

  PYTHONPATH=. .venv/bin/python benchmarks/budget_curve.py --data=data/kolektor \
      --root=workdirs/budget --widths=16,32 [--config.training.num_train_steps=1500] \
      [--config.data.image_size=256 --config.data.crop_size=64 ...]

For each width (config.model.nf) one SANO run trains with `configs/mvtec.py` (pointed at the
converted folder as benchmarks/real_defects.py does), keeping a checkpoint every
config.training.checkpoint_every steps; then each kept checkpoint is evaluated on its own (copied
into ROOT/nf<W>_step<S>, so the evaluation sees that step's parameters), with the label-free
calibration on, as a user's run_eval.py would. Writes ROOT/budget.jsonl (one line per width and
step: steps, training wall seconds up to that step, AUROC, AUPRO, AUPRC, Dice at N) and
ROOT/budget.png (AUROC and AUPRO against training steps, one line per width). Runs and
evaluations already done are kept.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import real_defects  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('widths', ['16', '32'], 'Model widths (config.model.nf) to train.')
FLAGS = flags.FLAGS


def wall_seconds_at(workdir: str, step: int) -> float | None:
  """Training wall seconds logged at the last logged step <= `step` (metrics.jsonl)."""
  best = None
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'perf/wall_s' in row and row['step'] <= step:
        best = row['perf/wall_s']
  return best


def evaluate_step(workdir: str, step: int, out: str) -> dict:
  """Evaluates checkpoints/<step> of `workdir` alone, in OUT (a copy holding only that step)."""
  from sano_jax import evaluate, files  # pylint: disable=g-import-not-at-top
  metrics_path = os.path.join(out, 'eval', 'metrics.json')
  if not os.path.exists(metrics_path):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, 'checkpoints'))
    shutil.copy(os.path.join(workdir, 'config.json'), out)
    shutil.copytree(os.path.join(workdir, 'checkpoints', str(step)),
                    os.path.join(out, 'checkpoints', str(step)))
    evaluate.evaluate(None, out)
  return files.read_json(metrics_path)


def main(argv):
  del argv
  from sano_jax import cli, curves, train  # pylint: disable=g-import-not-at-top
  cli.setup_logging()
  rows = []
  for width in (int(w) for w in FLAGS.widths):
    config = real_defects.benchmark_config(FLAGS.config.copy_and_resolve_references(), FLAGS.data)
    config.method = 'sano'
    config.model.nf = width
    config.training.keep_checkpoints = 1000  # every checkpoint is a point of the curve
    workdir = os.path.join(FLAGS.root, f'nf{width}')
    last = os.path.join(workdir, 'checkpoints', str(config.training.num_train_steps))
    if not os.path.isdir(last) and not train.finished(train.train_and_evaluate(config, workdir),
                                                      config):
      return  # preempted: resume with the same command
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
    for step in steps:
      m = evaluate_step(workdir, step, os.path.join(FLAGS.root, f'nf{width}_step{step}'))
      rows.append({'nf': width, 'steps': step, 'train_seconds': wall_seconds_at(workdir, step),
                   'auroc': m['auroc'], 'aupro': m['aupro'], 'auprc': m['auprc'],
                   'dice_at_n': m['n_sigma']['dice'],
                   'calibration': {k: m['calibration'][k] for k in ('t', 'rule', 'n_sigma')}
                   if m.get('calibration') else None})
      print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(FLAGS.root, 'budget.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  plt = curves.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key in zip(axes, ('auroc', 'aupro')):
    for width in sorted({r['nf'] for r in rows}):
      pts = [(r['steps'], r[key]) for r in rows if r['nf'] == width and r[key] is not None]
      ax.plot(*zip(*pts), marker='o', label=f'nf {width}')
    ax.set_xlabel(f'training steps (batch {config.training.batch_size})')
    ax.set_ylabel(f'pixel {key.upper()}')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('SANO on KolektorSDD: what the training budget buys (label-free calibration)',
               fontsize=10)
  fig.tight_layout()
  curves.save_figure(fig, os.path.join(FLAGS.root, 'budget.png'))
  print('wrote', os.path.join(FLAGS.root, 'budget.jsonl'), 'and budget.png')


if __name__ == '__main__':
  from sano_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
