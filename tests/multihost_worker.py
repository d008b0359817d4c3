"""One process of the multi-host test (tests/test_multihost.py), always on CPU.

  python tests/multihost_worker.py WORKDIR NUM_STEPS LOCAL_DEVICES OUT

runs `train.train_and_evaluate` on the tiny config (in-memory gratings; dropout on, no warm-up; log,
evaluate and checkpoint every 2 steps) to NUM_STEPS in WORKDIR, resuming from its latest checkpoint,
and saves this process's final params (and step) to OUT + '.{process index}.npz'. It prints
  'process I initialized'           once it has joined the others (several processes only),
  'process I restored step S'       for the checkpoint it resumed from (CheckpointStore.restore_latest),
  "process I wrote [...]"           the files it wrote in WORKDIR outside checkpoints/ and best/:
                                    opened for writing, created, renamed, deleted or made as folders,
                                    as Python's audit hooks see them (TensorFlow writes the
                                    TensorBoard event files from C++: their names carry its pid),
  'process I of N pid P done'       at the end.

Several processes: env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (read by
`distributed.maybe_initialize`). SANO_TEST_NO_TENSORBOARD=1: no TensorBoard (saves importing
TensorFlow where the test does not look at it).
"""
import os
import sys

workdir, num_steps, local_devices, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# Always CPU, whatever the parent environment says (e.g. JAX_PLATFORMS=cuda on a GPU machine).
_other = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
os.environ['XLA_FLAGS'] = ' '.join(_other + [f'--xla_force_host_platform_device_count={local_devices}'])
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get('SANO_TEST_NO_TENSORBOARD') == '1':
  sys.modules['flax.metrics.tensorboard'] = None  # unimportable: MetricsLog skips TensorBoard

from sano_jax import distributed  # noqa: E402

distributed.maybe_initialize()
if 'JAX_COORDINATOR_ADDRESS' in os.environ:  # the test retries a pair that fails before this line
  print('process', os.environ['JAX_PROCESS_ID'], 'initialized', flush=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sano_jax import checkpointing, train  # noqa: E402
from tests.helpers import audit_writes, grating_source, tiny_config  # noqa: E402

assert jax.device_count() == 4, jax.devices()
me = jax.process_index()


restore_latest = checkpointing.CheckpointStore.restore_latest


def reporting_restore(self, target):
  state = restore_latest(self, target)
  print('process', me, 'restored step', int(state.step), flush=True)
  return state


checkpointing.CheckpointStore.restore_latest = reporting_restore

config = tiny_config(**{'optim.warmup_steps': 0, 'model.dropout': 0.1,
                        'training.num_train_steps': num_steps, 'training.log_every': 2,
                        'training.eval_every': 2, 'training.checkpoint_every': 2,
                        'training.eval_batches': 1})
source = grating_source(32)
wrote = audit_writes(workdir)
state = train.train_and_evaluate(config, workdir, train_source=source, val_source=source)
print('process', me, 'wrote', sorted(set(wrote)), flush=True)
np.savez(f'{out}.{me}.npz', *jax.tree.leaves(state.params), step=np.asarray(state.step))
print('process', me, 'of', jax.process_count(), 'pid', os.getpid(), 'done', flush=True)
