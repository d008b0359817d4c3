"""The evaluation's passes over a split: the mesh of this process's devices, its share of each
global batch (`input_pipeline.eval_iterator`), and the progress bar (process 0 shows it)."""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from sano_jax import input_pipeline
from sano_jax import sharding
from sano_jax import summaries


def eval_mesh(config):
  """The mesh of this process's devices that score its share of each evaluation batch: as many
  local devices as divide eval.batch_size / the number of processes."""
  bs, n = int(config.eval.batch_size), jax.process_count()
  if bs % n:
    raise ValueError(f'eval.batch_size={bs} is not divisible by the {n} processes: set '
                     f'--config.eval.batch_size to a multiple of {n}')
  return sharding.local_mesh_for(bs // n)


def batches(source, config, mesh, extra_keys=()) -> Iterator[dict]:
  """This process's share of each global evaluation batch (`input_pipeline.eval_iterator`)."""
  return input_pipeline.eval_iterator(source, global_batch_size=int(config.eval.batch_size),
                                      num_local_devices=mesh.devices.size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count(), dtype=np.float32,
                                      extra_keys=extra_keys)


def unit_images(batch) -> np.ndarray:
  """eval_iterator's [-1, 1] images [ndev, b, H, W, C] -> [0, 1] images [ndev, b, H, W, C]."""
  return np.clip((batch['image'] + np.float32(1.0)) * np.float32(0.5), 0.0, 1.0)


def flat(x) -> np.ndarray:
  x = np.asarray(x)
  return x.reshape((-1,) + x.shape[2:])


def progress(iterable, total: int, desc: str):
  return summaries.progress(iterable, total=total, desc=desc, unit='batch',
                            enabled=jax.process_index() == 0)


def num_batches(source, config) -> int:
  return -(-len(source) // int(config.eval.batch_size))
