"""Multi-process evaluation: each process's objects gathered to all, merged in a fixed order.

Every process scores its share of a split on its own devices with no collective in the loop; the
healthy statistics, the baseline mean, the histogram range and the metric accumulators are then
gathered (`gather_from_processes`) and merged in an order fixed by the global device order
(`pairwise`), so that the numbers do not depend on which process saw which image.
"""
from __future__ import annotations

import pickle

import jax
import numpy as np

from sano_jax import distributed
from sano_jax import score_stats


def gather_from_processes(obj, name: str) -> list:
  """[process 0's obj, process 1's obj, ...] on every process ([obj] in one process): pickled,
  padded to the longest and exchanged by `multihost_utils.process_allgather` (bytes, so float64 and
  int64 survive whatever jax_enable_x64 says). Every process calls it with the same names in the
  same order. They meet first at the coordination service (`distributed.barrier`, a long limit):
  gloo, the CPU collectives, gives a process only 30 s to join a collective."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  distributed.barrier(f'sano_eval_{name}')
  blob = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
  if blob.size >= 2**31:
    raise ValueError(f'{name}: {blob.size} bytes to gather from one process (at most 2**31 - 1)')
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int32),
                                                       tiled=True))
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(blobs[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def pairwise(items: list, merge):
  """items merged by a fixed tree, adjacent pairs level by level: ((x0 x1) (x2 x3)) ... (an odd
  last one moves up a level). An aligned block of 2^k items is one subtree of it."""
  while len(items) > 1:
    items = [merge(*items[i:i + 2]) if i + 1 < len(items) else items[i]
             for i in range(0, len(items), 2)]
  return items[0]


def merge_device_stats(per_device, name: str = 'score_stats'):
  """This process's per-device stats (leaves [local devices, ...]) -> the stats of every device of
  every process, merged (`score_stats.merge_stats`) by `pairwise` over the global device order;
  a power-of-two number of local devices merges its own subtree before the gather."""
  n = jax.tree.leaves(per_device)[0].shape[0]
  devices = [jax.tree.map(lambda x, i=i: x[i], per_device) for i in range(n)]
  if n & (n - 1) == 0:
    devices = [pairwise(devices, score_stats.merge_stats)]
  parts = gather_from_processes(devices, name)
  return jax.device_get(pairwise([d for part in parts for d in part], score_stats.merge_stats))
