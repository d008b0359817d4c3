"""Multi-host start-up: `jax.distributed.initialize()` when asked for, before any other JAX call."""
import os

import jax


def maybe_initialize(flag: bool = False) -> bool:
  """Initialize jax.distributed if `flag`, SANO_DISTRIBUTED=1, or a coordinator address is set.

  On Cloud TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers itself;
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  wanted = flag or os.environ.get('SANO_DISTRIBUTED') == '1' or 'JAX_COORDINATOR_ADDRESS' in os.environ
  if not wanted:
    return False
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    kwargs = dict(coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(os.environ['JAX_NUM_PROCESSES']),
                  process_id=int(os.environ['JAX_PROCESS_ID']))
  # Cross-process collectives for CPU devices (harmless where accelerators do the work).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True
