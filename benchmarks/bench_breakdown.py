r"""Where one training step's time goes, by layer type (not a test).

  PYTHONPATH=. .venv/bin/python benchmarks/bench_breakdown.py --config=configs/demo.py \
      [--preset=issue64] [--steps=5] [--variants=step,grad,no_groupnorm,...] [--out=FILE]

Times, each compiled on its own, with pieces of the U-Net replaced by the identity while tracing
(monkeypatching `unet.group_norm`, `unet.AttentionBlock`, `flax.linen.silu`):

  step           the real train step (train.make_steps: fwd + bwd + clip + Adam + EMA, donated)
  grad           jit(value_and_grad(DSM loss)): forward + backward only
  no_groupnorm   grad with every GroupNorm -> identity
  no_attention   grad with every AttentionBlock -> identity
  no_silu        grad with SiLU -> identity
  no_dropout     grad with model.dropout = 0 (only when the config has dropout)
  flax_groupnorm grad with flax.linen.GroupNorm instead of unet.GroupNorm (the code before the
                 speed-up; flax_groupnorm_step: the same for the full step)
  convs_net      grad with all of the above removed: convolutions + the rest of the graph (skip
                 concatenation, up/down-sampling, time-embedding Dense, scale-shift, loss, RNG)
  convs          the convolutions alone: every nn.Conv of the model (shapes recorded while tracing)
                 as bare lax.conv_general_dilated, forward + vjp (input and kernel gradients)

All variants are compiled first, then timed round-robin (one call of each per round, --steps
rounds, median), so that a drifting machine load hits all of them alike. Prints one JSON line per
variant plus a summary line with each piece's share of `grad`
(time(grad) - time(grad without it)) and the ratios step/convs and grad/convs.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks import bench_train
from benchmarks import common
from sano_jax import models
from sano_jax.models import unet

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
_PRESET = flags.DEFINE_string('preset', None, 'Shape preset (benchmarks/common.py PRESETS).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed rounds (one call of each variant per round).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls per variant.')
_VARIANTS = flags.DEFINE_list(
    'variants', 'step,grad,no_groupnorm,no_attention,no_silu,no_dropout,convs_net,convs',
    'Variants to time.')
_OUT = flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')
_LABEL = flags.DEFINE_string('label', '', 'Free-text label copied into the JSON.')


class _NoAttention(nn.Module):
  """AttentionBlock's signature, identity."""
  num_head_channels: int = 64
  num_groups: int = 32
  dtype: Any = jnp.float32

  def __call__(self, x):
    return x


@contextlib.contextmanager
def patched(*, no_groupnorm=False, no_attention=False, no_silu=False, flax_groupnorm=False):
  """Replaces U-Net pieces by the identity (or GroupNorm by flax's) while tracing inside the block."""
  saved = (unet.group_norm, unet.AttentionBlock, nn.silu)
  try:
    if flax_groupnorm:
      unet.group_norm = lambda g, c, dtype, name=None: nn.GroupNorm(
          num_groups=math.gcd(g, c), dtype=dtype, name=name)
    if no_groupnorm:
      unet.group_norm = lambda *a, **k: (lambda x: x)
    if no_attention:
      unet.AttentionBlock = _NoAttention
    if no_silu:
      nn.silu = lambda x: x
    yield
  finally:
    unet.group_norm, unet.AttentionBlock, nn.silu = saved


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def record_convs(config) -> list[dict]:
  """Every nn.Conv call of the model at the training batch: input shape, kernel, strides."""
  model = models.create_model(config)
  b, s, c = config.training.batch_size, config.data.image_size, config.data.num_channels
  records = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      m = context.module
      records.append({'x': tuple(args[0].shape), 'dtype': args[0].dtype, 'features': m.features,
                      'kernel': tuple(m.kernel_size), 'strides': _pair(m.strides or 1),
                      'padding': m.padding})
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((b, s, s, c)),
                                      jnp.ones((b,)), train=False))
  return records


def prepare_convs(records) -> tuple:
  """Forward + vjp of every recorded convolution, bare, in one jitted program: (call, info)."""
  rng = np.random.default_rng(0)
  xs, ws = [], []
  for r in records:
    x = rng.standard_normal(r['x']).astype(np.float32)
    w = rng.standard_normal(r['kernel'] + (r['x'][-1], r['features'])).astype(np.float32) * 0.05
    xs.append(jnp.asarray(x, r['dtype']))
    ws.append(jnp.asarray(w, r['dtype']))
  pads = [r['padding'] for r in records]
  strides = [r['strides'] for r in records]

  def forward(ws, xs):
    return [jax.lax.conv_general_dilated(x, w, s, p, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
            for x, w, s, p in zip(xs, ws, strides, pads)]

  outs = jax.eval_shape(forward, ws, xs)
  gs = [jnp.asarray(rng.standard_normal(o.shape).astype(np.float32), o.dtype) for o in outs]

  @jax.jit
  def fwd_bwd(ws, xs, gs):
    ys, vjp = jax.vjp(forward, ws, xs)
    return ys, vjp(gs)

  compiled, compile_s, flops = common.compile_with_cost(fwd_bwd, ws, xs, gs)
  return (lambda: compiled(ws, xs, gs)), {'compile_s': compile_s, 'flops': flops,
                                          'steps_per_call': 1, 'num_convs': len(records)}


def prepare_variant(config, name: str) -> tuple | None:
  """(call, info) of one variant, compiled under its patches; None when it does not apply."""
  if name == 'convs':
    return prepare_convs(record_convs(config))
  if name == 'step':
    return bench_train.prepare(config, mode='step')
  if name == 'flax_groupnorm':  # the U-Net as first written: flax.linen.GroupNorm
    with patched(flax_groupnorm=True):
      return bench_train.prepare(config, mode='grad')
  if name == 'flax_groupnorm_step':
    with patched(flax_groupnorm=True):
      return bench_train.prepare(config, mode='step')
  cfg = config
  flags_ = dict(no_groupnorm=name in ('no_groupnorm', 'convs_net'),
                no_attention=name in ('no_attention', 'convs_net'),
                no_silu=name in ('no_silu', 'convs_net'))
  if name in ('no_dropout', 'convs_net'):
    if name == 'no_dropout' and not config.model.dropout:
      return None
    cfg = config.copy_and_resolve_references()
    cfg.model.dropout = 0.0
  with patched(**flags_):
    return bench_train.prepare(cfg, mode='grad')


def run_all(config, variants, *, rounds: int, warmup: int) -> dict:
  """Compiles every variant, then times them round-robin (one call each per round), so that a
  drifting machine load hits all alike; returns {name: (info, timing)}."""
  prepared = {}
  for name in variants:
    p = prepare_variant(config, name)
    if p is not None:
      prepared[name] = p
  for call, _ in prepared.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = {name: [] for name in prepared}
  for _ in range(rounds):
    for name, (call, _) in prepared.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return {name: (prepared[name][1], {'median_s': statistics.median(ts), 'min_s': min(ts),
                                     'calls': len(ts)}) for name, ts in times.items()}


def main(argv):
  del argv
  config = _CONFIG.value
  bench_train.apply_preset(config, _PRESET.value)
  ms = {}
  for name, (info, t) in run_all(config, _VARIANTS.value, rounds=_STEPS.value,
                                 warmup=_WARMUP.value).items():
    k = info['steps_per_call']
    ms[name] = 1e3 * t['median_s'] / k
    flops = info.get('flops')
    common.print_json({'bench': 'breakdown', 'variant': name, 'label': _LABEL.value,
                       'preset': _PRESET.value, 'image_size': config.data.image_size,
                       'batch_size': config.training.batch_size, 'ms_per_step': ms[name],
                       'ms_per_step_min': 1e3 * t['min_s'] / k, 'timed_calls': t['calls'],
                       'compile_s': info['compile_s'],
                       'gflops_per_step': flops / k / 1e9 if flops else None,
                       'num_convs': info.get('num_convs')}, _OUT.value)
  summary = {'bench': 'breakdown_summary', 'label': _LABEL.value, 'preset': _PRESET.value,
             'image_size': config.data.image_size, 'batch_size': config.training.batch_size,
             'machine': common.machine(), 'ms': ms}
  if 'grad' in ms:
    g = ms['grad']
    share = {}
    for name, piece in (('no_groupnorm', 'groupnorm'), ('no_attention', 'attention'),
                        ('no_silu', 'silu'), ('no_dropout', 'dropout')):
      if name in ms:
        share[piece] = (g - ms[name]) / g
    if 'convs' in ms:
      share['convs'] = ms['convs'] / g
    if 'convs_net' in ms and 'convs' in ms:
      share['rest_of_graph'] = (ms['convs_net'] - ms['convs']) / g
    summary['share_of_grad'] = share
    if 'step' in ms:
      summary['optimizer_ema_share_of_step'] = (ms['step'] - g) / ms['step']
  if 'convs' in ms:
    summary['grad_over_convs'] = ms.get('grad', float('nan')) / ms['convs']
    summary['step_over_convs'] = ms.get('step', float('nan')) / ms['convs']
    if 'convs_net' in ms:
      summary['convs_net_over_convs'] = ms['convs_net'] / ms['convs']
  if 'flax_groupnorm' in ms and 'grad' in ms:
    summary['grad_speedup_vs_flax_groupnorm'] = ms['flax_groupnorm'] / ms['grad']
  if 'flax_groupnorm_step' in ms and 'step' in ms:
    summary['step_speedup_vs_flax_groupnorm'] = ms['flax_groupnorm_step'] / ms['step']
  common.print_json(summary, _OUT.value)


if __name__ == '__main__':
  app.run(main)
