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


def subprocess_timeout() -> float:
  """Seconds a test waits for a subprocess: SANO_TEST_SUBPROCESS_TIMEOUT, default 600 (generous on
  a busy 2-core machine; a hung child still ends the test)."""
  import os  # pylint: disable=g-import-not-at-top
  return float(os.environ.get('SANO_TEST_SUBPROCESS_TIMEOUT', '600'))


def subprocess_env(local_devices: int = 4, **extra) -> dict:
  """The environment of a child Python that runs JAX: CPU only with `local_devices` simulated
  devices, whatever JAX_* or XLA_FLAGS the parent has (e.g. JAX_PLATFORMS=cuda), plus `extra`."""
  import os  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_') and k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={local_devices}',
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1')
  env.update({k: str(v) for k, v in extra.items()})
  return env


def read_log(path, tail: int = 4000) -> str:
  """The end of a subprocess's log file ('' if it does not exist yet)."""
  try:
    with open(path, errors='replace') as f:
      return f.read()[-tail:]
  except FileNotFoundError:
    return ''
