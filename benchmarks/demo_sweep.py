r"""Sweep the localization time t and rule of a trained run (no retraining), against the trivial baseline.

  PYTHONPATH=. python benchmarks/demo_sweep.py --workdir=workdirs/demo \
      [--ts=0.001,0.003,0.01,0.02,0.05,0.1] [--rules=global,two_sided]

For each t: healthy statistics are fitted on the validation split (``score_stats.fit_score_stats``,
one forward pass per image), then the test split is scored once; for each rule the z-map is formed
as ``localization.localize`` does and the test pixels give AUROC, AUPRC (exact, ``sano_jax.metrics``),
Dice at z > n_sigma (threshold from healthy validation statistics only) and Dice at the best-F1
operating point (an oracle threshold on test, an upper bound). One JSON line per (t, rule), then one
for the trivial baseline: A = G_2 * mean_c |x - mean training intensity|, x in [-1, 1], with its
Dice at 3 sigma using the std of the signed healthy validation residuals (the same global rule).
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sano_jax import checkpointing
from sano_jax import input_pipeline
from sano_jax import anomaly_maps
from sano_jax import score_stats
from sano_jax import metrics

flags.DEFINE_string('workdir', None, 'A trained run directory (best/ or checkpoints/).')
flags.DEFINE_list('ts', ['0.001', '0.003', '0.01', '0.02', '0.05', '0.1'], 'Localization times t.')
flags.DEFINE_list('rules', ['global', 'two_sided'], 'Rules of localization.localize.')
flags.DEFINE_float('n_sigma', 3.0, 'N of the threshold z > N.')
flags.DEFINE_float('smoothing_sigma', 2.0, 'Gaussian smoothing of the anomaly map.')
flags.DEFINE_integer('batch_size', 128, 'Inference batch size.')
flags.DEFINE_bool('baseline', True, 'Also evaluate the trivial baseline.')
flags.DEFINE_bool('no_ema', False, 'Use the raw params instead of the EMA params.')
flags.DEFINE_string('tag', '', 'A label copied into every JSON line.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def load_split(config, split):
  """(images [N,H,W,C] float32 in [-1,1], masks [N,H,W] bool) of a whole split."""
  source = input_pipeline.get_source(config, split)
  images, masks = [], []
  for batch in input_pipeline.eval_iterator(source, global_batch_size=256, num_local_devices=1):
    v = batch['valid'][0]
    images.append(np.asarray(batch['image'][0][v], np.float32))
    masks.append(np.asarray(batch['mask'][0][v])[..., 0] > 0)
  return np.concatenate(images), np.concatenate(masks)


def batched(fn, x, bs):
  """fn over x in fixed-size (padded) batches, so that fn compiles once."""
  out = []
  for i in range(0, len(x), bs):
    xb = x[i:i + bs]
    n = len(xb)
    if n < bs:
      xb = np.concatenate([xb, np.zeros((bs - n,) + xb.shape[1:], xb.dtype)])
    out.append(np.asarray(fn(jnp.asarray(xb)))[:n])
  return np.concatenate(out)


def curve(z, masks, n_sigma):
  m = metrics.exact_curve_metrics(z, masks)
  return {'auroc': round(m['auroc'], 4), 'auprc': round(m['auprc'], 4),
          'dice_at_n': round(metrics.dice(z > n_sigma, masks), 4),
          'dice_op': round(m['dice'], 4), 'op_threshold': round(m['threshold'], 3)}


def main(argv):
  del argv
  tic = time.perf_counter()
  config, method, params, _ = checkpointing.restore_for_inference(
      FLAGS.workdir, ema=False if FLAGS.no_ema else None)
  model, sde = method.model, method.sde  # a SANO run
  val_x, _ = load_split(config, config.data.validation_split)
  test_x, test_m = load_split(config, config.data.test_split)
  sig = FLAGS.smoothing_sigma
  bs = FLAGS.batch_size
  base = {'tag': FLAGS.tag, 'workdir': FLAGS.workdir, 'n_val': len(val_x), 'n_test': len(test_x),
          'anomalous_pixel_fraction': round(float(test_m.mean()), 4)}

  @jax.jit
  def score(x, t):  # t traced: one compilation for all t
    t_vec = jnp.full((x.shape[0],), t, jnp.float32)
    return -model.apply({'params': params}, x, t_vec, train=False) / sde.marginal_std(t)

  amap = jax.jit(lambda s: anomaly_maps.anomaly_map(s, sig))
  for t_str in FLAGS.ts:
    t0 = time.perf_counter()
    t = jnp.float32(float(t_str))
    score_fn = lambda x: score(x, t)
    # Healthy statistics on validation, through the library's streaming fit (images in [0, 1]).
    val01 = (val_x + 1.0) / 2.0
    stats = score_stats.fit_score_stats(
        score_fn, ((val01[i:i + bs], np.ones(len(val01[i:i + bs]), bool))
                   for i in range(0, len(val01), bs)), smoothing_sigma=sig)
    a = batched(lambda x: amap(score_fn(x)), test_x, bs)
    for rule in FLAGS.rules:
      if rule == 'global':
        z = a / float(stats.std)
      elif rule == 'two_sided':
        z = np.abs(a - float(stats.map_mean)) / float(stats.map_std)
      elif rule == 'per_pixel':
        z = (a - np.asarray(stats.pixel_mean)) / np.maximum(np.asarray(stats.pixel_std), 1e-12)
      else:
        raise ValueError(f'rule {rule!r} not supported here')
      row = dict(base, method='sano', t=float(t_str), rule=rule, **curve(z, test_m, FLAGS.n_sigma),
                 healthy_std=float(stats.std), healthy_map_mean=float(stats.map_mean),
                 healthy_map_std=float(stats.map_std), seconds=round(time.perf_counter() - t0, 2))
      print(json.dumps(row), flush=True)

  if FLAGS.baseline:
    train_x, _ = load_split(config, config.data.train_split)
    mu = float(train_x.mean())
    resid = lambda x: x - mu
    std = float(np.std(resid(val_x)))
    val_a = np.asarray(amap(jnp.asarray(resid(val_x))))
    a = np.asarray(amap(jnp.asarray(resid(test_x))))
    for rule in FLAGS.rules:
      if rule == 'global':
        z = a / std
      elif rule == 'two_sided':
        z = np.abs(a - val_a.mean()) / val_a.std()
      else:
        continue
      print(json.dumps(dict(base, method='trivial_baseline', rule=rule, train_mean=round(mu, 4),
                            **curve(z, test_m, FLAGS.n_sigma))), flush=True)
  print(json.dumps(dict(base, method='timing', total_seconds=round(time.perf_counter() - tic, 1))))


if __name__ == '__main__':
  app.run(main)
