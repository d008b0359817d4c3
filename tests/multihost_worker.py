"""One process of the multi-host test: 3 training steps on the tiny config, params to an .npz.

  python tests/multihost_worker.py OUT LOCAL_DEVICES  (env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
                                                      JAX_PROCESS_ID for several processes)
"""
import os
import sys

out, local_devices = sys.argv[1], int(sys.argv[2])
# Always CPU, whatever the parent environment says (e.g. JAX_PLATFORMS=cuda on a GPU machine).
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={local_devices}'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sano_jax import distributed  # noqa: E402

distributed.maybe_initialize()
if 'JAX_COORDINATOR_ADDRESS' in os.environ:  # the test retries a pair that fails before this line
  print('process', os.environ['JAX_PROCESS_ID'], 'initialized', flush=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sano_jax import input_pipeline, methods, train  # noqa: E402
from tests.helpers import grating_source, tiny_config  # noqa: E402

config = tiny_config(**{'optim.warmup_steps': 0, 'model.dropout': 0.1})
assert jax.device_count() == 4, jax.devices()
method = methods.create(config)
tx = train.create_optimizer(config, method)
state = train.create_train_state(config, method, tx, jax.random.PRNGKey(0))
mesh = train.make_mesh()
step, _ = train.make_steps(config, method, tx, mesh)
state = train.replicate(state, mesh)
batches = input_pipeline.train_iterator(
    grating_source(32), global_batch_size=8, seed=0, num_local_devices=jax.local_device_count(),
    process_index=jax.process_index(), process_count=jax.process_count())
for _ in range(3):
  state, metrics = step(state, train.shard_batch(next(batches), mesh))
host = train.to_host(state)
if jax.process_index() == 0:
  np.savez(out, *jax.tree.leaves(host.params), loss=np.asarray(train.to_host(metrics['loss'])))
print('process', jax.process_index(), 'of', jax.process_count(), 'done', flush=True)
