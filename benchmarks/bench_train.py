r"""Training-step throughput, compile time, XLA flops and peak memory on synthetic data (not a test).

  PYTHONPATH=. .venv/bin/python benchmarks/bench_train.py --config=configs/demo.py \
      [--config.training.batch_size=32] [--config.training.steps_per_call=4] [--preset=issue64] \
      [--steps=20] [--warmup=2] [--mode=step|grad] [--nodonate] [--out=results.jsonl]

mode=step times the real `train.make_steps` step (jit + shard_map over a 1-D mesh of all devices,
state donated; lax.scan of `steps_per_call` steps per call): forward, backward, clip, Adam, EMA.
mode=grad times only jit(value_and_grad(DSM loss)) of the same model on the same batch: forward +
backward, no optimizer. Prints one JSON line: images/s, steps/s, ms/step, compile seconds, XLA's
flops per step (cost_analysis of the compiled program, divided by steps_per_call), peak RSS
(ru_maxrss) and, on GPU/TPU, the device's peak bytes in use.
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from benchmarks import common
from sano_jax import methods, train

def apply_preset(config, preset: str | None, argv=None) -> None:
  """Applies a PRESETS shape, then re-applies explicit --config.x=y flags so that they win."""
  if not preset:
    return
  common.config_overrides(config, common.PRESETS[preset])
  for arg in argv or sys.argv:
    if arg.startswith('--config.') and '=' in arg:
      key, value = arg[len('--config.'):].split('=', 1)
      node = config
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      old = node[leaf]
      import ast  # pylint: disable=g-import-not-at-top
      try:
        parsed = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        parsed = value
      node[leaf] = type(old)(parsed) if isinstance(old, (int, float)) and not isinstance(old, bool) \
          else parsed


def synthetic_images(config, k: int = 1, seed: int = 0) -> np.ndarray:
  """Uniform [-1, 1] images [B,H,W,C] (or [k,B,H,W,C])."""
  b, s, c = config.training.batch_size, config.data.image_size, config.data.num_channels
  shape = (b, s, s, c) if k == 1 else (k, b, s, s, c)
  x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
  return np.asarray(jnp.asarray(x, jnp.dtype(config.model.dtype)))  # as the input pipeline's dtype


def make_train_fn(config, method, tx, mesh, donate: bool):
  """train.make_steps' train step, or the same jit + shard_map without donation."""
  if donate:
    return train.make_steps(config, method, tx, mesh)[0]
  kw = dict(method=method, tx=tx, config=config)
  multi = config.training.steps_per_call > 1
  step_fn = functools.partial(train.train_steps if multi else train.train_step, **kw)
  spec = P(None, train.AXIS) if multi else P(train.AXIS)
  return jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), spec), out_specs=(P(), P()),
                               check_vma=False))


def make_grad_fn(method):
  """jit(value_and_grad(mean loss)) of the method: the forward + backward of one step, nothing else."""
  def loss_fn(params, images, rng):
    ids = jnp.arange(images.shape[0])
    return jnp.mean(method.losses(params, images, ids, rng, train=True,
                                  dropout_rng=jax.random.fold_in(rng, 1))['loss'])
  return jax.jit(jax.value_and_grad(loss_fn))


def prepare(config, *, mode: str = 'step', donate: bool = True) -> tuple:
  """Builds and compiles one configuration: (call, info); call() runs one (blocked-on-able) call."""
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  k = config.training.steps_per_call if mode == 'step' else 1
  state = train.create_train_state(config, method, tx, jax.random.PRNGKey(0))
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  images = synthetic_images(config, k)
  if mode == 'step':
    mesh = train.make_mesh()
    fn = make_train_fn(config, method, tx, mesh, donate)
    spec = P(None, train.AXIS) if k > 1 else P(train.AXIS)
    args = [train.replicate(state, mesh),
            {'image': jax.device_put(images, NamedSharding(mesh, spec))}]
    compiled, compile_s, flops = common.compile_with_cost(fn, *args)

    def call():
      args[0], metrics = compiled(*args)
      return metrics
  else:
    fn = make_grad_fn(method)
    args = [state.params, jnp.asarray(images), jax.random.PRNGKey(1)]
    compiled, compile_s, flops = common.compile_with_cost(fn, *args)
    call = lambda: compiled(*args)
  info = {'steps_per_call': k, 'compile_s': compile_s, 'flops': flops, 'params_m': n_params / 1e6}
  return call, info


def result(config, info: dict, t: dict, *, mode: str, donate: bool) -> dict:
  """The JSON record of a timing `t` (common.time_calls) of a prepared configuration."""
  k, flops, batch = info['steps_per_call'], info['flops'], config.training.batch_size
  step_s = t['median_s'] / k
  return {
      'bench': 'train', 'mode': mode, 'machine': common.machine(),
      'image_size': config.data.image_size, 'channels': config.data.num_channels,
      'batch_size': batch, 'steps_per_call': k, 'donate': donate, 'dtype': config.model.dtype,
      'model': {'nf': config.model.nf, 'ch_mult': list(config.model.ch_mult),
                'num_res_blocks': config.model.num_res_blocks,
                'attn_resolutions': list(config.model.attn_resolutions),
                'dropout': config.model.dropout, 'resblock_updown': config.model.resblock_updown,
                'params_m': info['params_m']},
      'images_per_s': batch / step_s, 'steps_per_s': 1.0 / step_s, 'ms_per_step': 1e3 * step_s,
      'ms_per_step_min': 1e3 * t['min_s'] / k, 'timed_calls': t['calls'],
      'compile_s': info['compile_s'],
      'gflops_per_step': flops / k / 1e9 if flops else None,
      'achieved_gflops_per_s': flops / k / step_s / 1e9 if flops else None,
      'peak_rss_mib': common.peak_rss_mib(), 'device_peak_mib': common.device_peak_mib(),
  }


def run(config, *, mode: str = 'step', steps: int = 10, warmup: int = 2, donate: bool = True,
        min_seconds: float = 0.0) -> dict:
  """Builds, compiles and times one configuration; returns the result dict."""
  call, info = prepare(config, mode=mode, donate=donate)
  t = common.time_calls(call, warmup=warmup, iters=steps, min_seconds=min_seconds)
  return result(config, info, t, mode=mode, donate=donate)


def main(argv):
  del argv
  config = _CONFIG.value
  apply_preset(config, _PRESET.value)
  result = run(config, mode=_MODE.value, steps=_STEPS.value, warmup=_WARMUP.value,
               donate=_DONATE.value, min_seconds=_MIN_SECONDS.value)
  result['label'] = _LABEL.value
  result['preset'] = _PRESET.value
  common.print_json(result, _OUT.value)


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
  _PRESET = flags.DEFINE_string('preset', None, f'Shape preset applied before --config.* overrides '
                                f'are re-applied: one of {sorted(common.PRESETS)}.')
  _STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls (at least).')
  _WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
  _MIN_SECONDS = flags.DEFINE_float('min_seconds', 0.0, 'Keep timing until this many seconds.')
  _MODE = flags.DEFINE_enum('mode', 'step', ['step', 'grad'], 'Full train step or fwd+bwd only.')
  _DONATE = flags.DEFINE_bool('donate', True, 'Donate the train state (as train.make_steps does).')
  _OUT = flags.DEFINE_string('out', None, 'Also append the JSON line to this file.')
  _LABEL = flags.DEFINE_string('label', '', 'Free-text label copied into the JSON.')
  app.run(main)
