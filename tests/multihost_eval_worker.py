"""One process of the multi-host evaluation test (tests/test_multihost_eval.py), always on CPU.

  python tests/multihost_eval_worker.py WORKDIR OUT LOCAL_DEVICES

evaluates the run in WORKDIR (trained by the test on `sources()`['train']) with `evaluate.evaluate`
twice, on the exact path and on the binned path (`config('exact')`, `config('binned')`), and
copies WORKDIR/eval/metrics.json after each to OUT + '.{path}.json' (process 0; the others must not
write it). It prints
  'process I initialized'       once it has joined the others (several processes only),
  'process I returned R'        per evaluation: 'metrics' (process 0) or 'None' (the others),
  'process I wrote [...]'       the paths in WORKDIR outside checkpoints/ and best/ that it opened
                                for writing, renamed, removed or created (Python's audit hooks),
  'process I of N done'         at the end.

Several processes: env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (read by
`distributed.maybe_initialize`). The test's own process imports `sources` and `config` from here,
so that it trains on, and evaluates, the same data as the workers.
"""
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sizes chosen so that the last global batch (eval.batch_size 8) is partial and its rows fall to
# the two processes unevenly (test: 21 = 8 + 8 + 5, the last batch 4 real images to process 0 and
# 1 to process 1), and subjects (4 images each) straddle the processes' shares.
NUM_TRAIN, NUM_VAL, NUM_TEST = 16, 13, 21


def sources() -> dict:
  """In-memory contract sources: healthy gratings for train and validation; for test, gratings of
  which two in three carry a bright square (its mask), each with a `kind` attribute (group_by)."""
  sys.path.insert(0, REPO)
  from tests.helpers import grating_source  # pylint: disable=g-import-not-at-top
  test = grating_source(NUM_TEST, seed=2, subject_offset=100)
  rng = np.random.default_rng(0)
  for i, ex in enumerate(test):
    ex['kind'] = ('square', 'wide', 'none')[i % 3]
    if i % 3 != 2:
      h, w = (4, 4) if i % 3 == 0 else (3, 7)
      y, x = rng.integers(0, 16 - h), rng.integers(0, 16 - w)
      image = ex['image'].copy()
      image[y:y + h, x:x + w] = 250
      ex['image'] = image
      ex['mask'] = np.zeros_like(ex['mask'])
      ex['mask'][y:y + h, x:x + w] = 1
  return {'train': grating_source(NUM_TRAIN, seed=0),
          'validation': grating_source(NUM_VAL, seed=1, subject_offset=50), 'test': test}


def config(path: str = 'exact'):
  """The tiny config of the test: 8 images a batch, the kind groups, 3 figures; 'exact' or
  'binned' metrics (eval.exact_max_pixels: all test pixels, or 0)."""
  sys.path.insert(0, REPO)
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  if path not in ('exact', 'binned'):
    raise ValueError(f'path must be exact or binned, got {path!r}')
  return tiny_config(**{
      'training.num_train_steps': 4, 'training.eval_every': 4, 'training.checkpoint_every': 4,
      'training.log_every': 2, 'training.eval_batches': 1, 'training.ema_rate': 0.5,
      'eval.group_by': ('kind',), 'eval.num_figures': 3, 'eval.bootstrap_runs': 7,
      'eval.num_bins': 2**12, 'eval.exact_max_pixels': 10**6 if path == 'exact' else 0})


def main(workdir: str, out: str, local_devices: int) -> None:
  import shutil  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sano_jax import distributed, evaluate  # pylint: disable=g-import-not-at-top
  from tests.helpers import audit_writes  # pylint: disable=g-import-not-at-top

  me, n = jax.process_index(), jax.process_count()
  assert jax.local_device_count() == local_devices, jax.devices()
  data = sources()
  wrote = audit_writes(workdir)
  for path in ('exact', 'binned'):
    result = evaluate.evaluate(config(path), workdir, train_source=data['train'],
                               val_source=data['validation'], test_source=data['test'])
    print(f'process {me} returned', 'None' if result is None else 'metrics', flush=True)
    if me == 0:
      shutil.copy(os.path.join(workdir, 'eval', 'metrics.json'), f'{out}.{path}.json')
    distributed.barrier(f'copied_{path}')  # the next evaluation rewrites metrics.json
  print(f'process {me} wrote', sorted(set(wrote)), flush=True)
  print(f'process {me} of {n} done', flush=True)


if __name__ == '__main__':
  workdir_arg, out_arg, devices_arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
  # Always CPU, whatever the parent environment says (e.g. JAX_PLATFORMS=cuda on a GPU machine).
  _other = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  os.environ['XLA_FLAGS'] = ' '.join(_other + [f'--xla_force_host_platform_device_count={devices_arg}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, REPO)
  sys.modules['flax.metrics.tensorboard'] = None  # no TensorFlow import: evaluate skips TensorBoard
  from sano_jax import distributed as _distributed  # pylint: disable=g-import-not-at-top

  _distributed.maybe_initialize()
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:  # the test retries a pair that fails before this
    print('process', os.environ['JAX_PROCESS_ID'], 'initialized', flush=True)
  main(workdir_arg, out_arg, devices_arg)
