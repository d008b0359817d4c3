"""Multi-host start-up: `jax.distributed.initialize()` when asked for, before any other JAX call."""
import os

import jax

_ENV_ARGS = (('JAX_COORDINATOR_ADDRESS', 'coordinator_address', str),
             ('JAX_NUM_PROCESSES', 'num_processes', int),
             ('JAX_PROCESS_ID', 'process_id', int))


def maybe_initialize(flag: bool = False) -> bool:
  """Initialize jax.distributed if `flag`, SANO_DISTRIBUTED=1, or a coordinator address is set;
  returns whether JAX is distributed (True also where it already was: no second initialize).

  On Cloud TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` finds its peers itself;
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (those set are passed
  on; JAX's cluster detection fills in the others where it can)."""
  wanted = flag or os.environ.get('SANO_DISTRIBUTED') == '1' or 'JAX_COORDINATOR_ADDRESS' in os.environ
  if not wanted:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  for var, arg, kind in _ENV_ARGS:
    if var in os.environ:
      try:
        kwargs[arg] = kind(os.environ[var])
      except ValueError:
        raise ValueError(f'{var}={os.environ[var]!r} is not an integer') from None
  # Cross-process collectives for CPU devices (harmless where accelerators do the work).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True
