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


_barriers: dict = {}  # name -> how many times this process has waited at it


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process has reached barrier `name` (at most `timeout_s`); a no-op in one process.

  It waits at JAX's coordination service, not in a device collective: gloo (the CPU collectives)
  gives a process only 30 s, not configurable, to join the first collective of a set of devices,
  and Orbax's `sync_global_processes` is such a collective (it ignores its `timeout` unless
  Orbax's experimental distributed-barrier flag is on). Processes that compile or initialize at
  different speeds meet here first. Every process must pass the same barriers in the same order
  (the n-th wait at `name` is the service's barrier 'name:n', so a name may be used again)."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError(f'barrier {name!r}: {jax.process_count()} processes but no jax.distributed '
                       'client (call distributed.maybe_initialize first)')
  n = _barriers.get(name, 0)
  _barriers[name] = n + 1
  client.wait_at_barrier(f'{name}:{n}', int(timeout_s * 1000))
