"""Shared helpers of the benchmarks (not a test): config loading, timing, compile cost, memory, JSON.

Timings are wall-clock around calls that are blocked on (`jax.block_until_ready`), after warm-up
calls, so compilation is never counted in a throughput; compile time is measured separately with
`jit(...).lower(...).compile()`.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far (ru_maxrss), MiB."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r / 2**20 if sys.platform == 'darwin' else r / 2**10  # bytes on macOS, KiB on Linux


def device_peak_mib() -> float | None:
  """Peak device memory (GPU/TPU `memory_stats()['peak_bytes_in_use']`), MiB; None on CPU."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2**20


def machine() -> dict:
  """What ran the benchmark."""
  d = jax.devices()[0]
  return {'platform': d.platform, 'device': getattr(d, 'device_kind', str(d)),
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(), 'jax': jax.__version__,
          'code': os.path.dirname(os.path.dirname(sys.modules['sano_jax'].__file__))
          if 'sano_jax' in sys.modules else None}


def compile_with_cost(fn, *args) -> tuple[Any, float, float | None]:
  """(compiled, compile seconds (lower + compile), XLA's flops estimate or None) of jitted `fn`."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if cost and 'flops' in cost:
      flops = float(cost['flops'])
  except Exception:  # pylint: disable=broad-except
    pass
  return compiled, seconds, flops


def time_calls(call: Callable[[], Any], *, warmup: int = 1, iters: int = 5,
               min_seconds: float = 0.0, max_iters: int = 1000) -> dict:
  """Times `call()` (blocked on) `iters` times after `warmup` calls; keeps going until `min_seconds`
  of timed calls (at most `max_iters`). Returns median/min/mean seconds per call and the count."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  total = 0.0
  while len(times) < iters or (total < min_seconds and len(times) < max_iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    dt = time.perf_counter() - t0
    times.append(dt)
    total += dt
  return {'median_s': statistics.median(times), 'min_s': min(times),
          'mean_s': total / len(times), 'calls': len(times)}


def rounded(obj, digits: int = 4):
  """Floats rounded to `digits` significant digits, recursively (for printing)."""
  if isinstance(obj, float):
    return float(f'{obj:.{digits}g}')
  if isinstance(obj, dict):
    return {k: rounded(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [rounded(v, digits) for v in obj]
  return obj


def print_json(obj: dict, path: str | None = None) -> None:
  """Prints `obj` as one JSON line (and appends it to `path` when given)."""
  line = json.dumps(rounded(obj))
  print(line, flush=True)
  if path:
    with open(path, 'a') as f:
      f.write(line + '\n')


def config_overrides(config, pairs: dict) -> None:
  """Sets dotted fields of an ml_collections config: {'model.nf': 64, ...}."""
  for key, value in pairs.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    with config.unlocked() if hasattr(config, 'unlocked') else _null():
      node[leaf] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# The shape the issue measured: 64 px, nf 64, ch_mult (1,2,2,2), 2 res blocks, no attention resolutions
# (the middle block keeps its attention, at 8x8), batch 8, RGB. Pass as `--preset=issue64`.
PRESETS = {
    'issue64': {'data.image_size': 64, 'data.num_channels': 3, 'model.nf': 64,
                'model.ch_mult': (1, 2, 2, 2), 'model.num_res_blocks': 2,
                'model.attn_resolutions': (), 'model.num_groups': 32,
                'training.batch_size': 8},
}
