"""Shared test fixtures: tiny in-memory data sources of the data contract."""
import numpy as np


def grating_source(n: int, size: int = 16, channels: int = 1, seed: int = 0, subject_offset: int = 0):
  """n smooth images (random-phase gratings) as a list of contract dicts: an easy healthy distribution."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[:size, :size] / size
  out = []
  for i in range(n):
    f, phase, angle = rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    img = 0.5 + 0.4 * np.sin(2 * np.pi * f * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = np.repeat(img[..., None], channels, -1)
    out.append({'image': (255 * img).round().astype(np.uint8),
                'mask': np.zeros((size, size, 1), np.uint8),
                'subject': str(subject_offset + i // 4), 'name': f'img{i}'})
  return out


def tiny_config(**overrides):
  from configs import tiny
  config = tiny.get_config()
  config.data.dataset = 'in-memory'
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config
