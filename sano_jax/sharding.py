"""Data parallelism over a 1-D device mesh (axis 'batch'), shared by training, evaluation and prediction.

The steps are `jax.jit(jax.shard_map(f, mesh))`: pmap's semantics (one program per device,
`lax.pmean` over 'batch'), written with global arrays so that it also spans hosts.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis 'batch': data parallelism over devices and hosts."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def local_mesh_for(batch_size: int) -> Mesh:
  """A 1-D mesh over as many local devices as divide `batch_size` (evaluation in one process)."""
  devices = jax.local_devices()
  n = len(devices)
  while batch_size % n:
    n -= 1
  return make_mesh(devices[:n])


def replicate(tree, mesh: Mesh):
  """Put a host pytree (the same on every process) on every device of the mesh."""
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))  # never aliases `tree`


def shard_batch(batch: dict, mesh: Mesh, *, stacked: bool = False) -> dict:
  """A process-local batch [local_devices, b, ...] (or [local_devices, k, b, ...]) -> global arrays
  [B, ...] ([k, B, ...]) sharded over 'batch'; process p's rows follow process p-1's."""
  spec = P(None, AXIS) if stacked else P(AXIS)
  sharding = NamedSharding(mesh, spec)

  def put(x):
    x = np.asarray(x)
    if stacked:  # [ndev, k, b, ...] -> [k, ndev*b, ...]
      x = np.swapaxes(x, 0, 1)
      local = x.reshape((x.shape[0], -1) + x.shape[3:])
    else:
      local = x.reshape((-1,) + x.shape[2:])
    return jax.make_array_from_process_local_data(sharding, local)
  return {k: put(v) for k, v in batch.items()}


def to_host(tree):
  """A replicated pytree as numpy (this process's first copy)."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))
