"""Every method through the ONE training / evaluation / inference path: it learns (validation loss
well below the initial one), is evaluated with the demo's label-free calibration (t, rule, sigma
and N from synthetic anomalies on the healthy validation images) and finds the planted anomalies,
and its checkpoint restores through `load_localizer`, whose output equals `localize` with the
method's field and the calibrated settings."""
import json
import os

import jax
import numpy as np
import pytest

from sano_jax import calibration, checkpointing, evaluate, localization, methods, train
from sano_jax import rundir
from sano_jax.baselines import autoencoders
from tests.helpers import grating_source, tiny_config


def anomalous_source(n: int, seed: int = 5):
  """Gratings with a flat square pasted in (mask 1 there); every third image healthy."""
  rng = np.random.RandomState(seed)
  out = grating_source(n, seed=seed, subject_offset=200)
  for i, ex in enumerate(out):
    if i % 3 == 2:
      continue
    s = rng.randint(3, 7)
    y, x = rng.randint(0, 16 - s, size=2)
    ex['image'] = ex['image'].copy()
    ex['image'][y:y + s, x:x + s] = rng.randint(0, 256)
    ex['mask'] = ex['mask'].copy()
    ex['mask'][y:y + s, x:x + s] = 1
  return out


def _val_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r['validation/loss'] for r in rows if 'validation/loss' in r]


# The planted anomalies are found: the AUROC clears chance and the trivial baseline (|x - mean
# training intensity|, smoothed: 0.41-0.42 here) by MARGIN. On these 96 test images a noise map
# smoothed like the z-maps (sigma 1-4) scores 0.50 +- 0.03 (99th percentile 0.57, 1000 draws).
# Measured, seed 3: sano 0.969, ae 0.753, vae 0.662, cevae 0.731, vqvae 0.697, anovaegan 0.710,
# anoddpm 0.795 (seeds 0-3: every method >= 0.65).
MARGIN = 0.1


@pytest.mark.parametrize('name', methods.METHODS)
def test_method_trains_evaluates_and_restores(name, tmp_path):
  """Trains 100 steps, evaluates with the demo's calibration on (config.localize as configs/demo.py;
  the VQ-VAE's codebook lookup once crashed under its jit), finds the planted anomalies, and
  restores: load_localizer == localize with the method's field and the calibrated settings."""
  config = tiny_config(**{'method': name, 'training.num_train_steps': 100,
                          'training.eval_every': 50, 'training.checkpoint_every': 50,
                          'training.log_every': 50, 'training.eval_batches': -1,
                          'optim.warmup_steps': 10, 'training.ema_rate': 0.9, 'seed': 3,
                          'localize.calibrate': True, 'localize.stats': 'per_pixel',
                          'eval.num_figures': 0, 'eval.bootstrap_runs': 0})
  train_src, val_src = grating_source(64), grating_source(32, seed=1, subject_offset=100)
  test_src = anomalous_source(96)
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  state = train.create_train_state(config, method, tx, jax.random.PRNGKey(config.seed))
  mesh = train.make_mesh()
  _, eval_fn = train.make_steps(config, method, tx, mesh)
  initial = train.evaluate_loss(eval_fn, train.replicate(state.ema_params, mesh), val_src, config,
                                mesh)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, train_source=train_src, val_source=val_src)
  losses = _val_losses(workdir)
  assert len(losses) == 2 and min(losses) < 0.6 * initial, (initial, losses)

  out = evaluate.evaluate(config, workdir, train_source=train_src, val_source=val_src,
                          test_source=test_src)
  used, choice = out['localization'], out['calibration']
  assert used['method'] == name and choice is not None  # the settings used are the choice's
  assert out['auroc'] >= max(0.5, out['baseline']['auroc']) + MARGIN, (
      out['auroc'], out['baseline']['auroc'], choice['t'], choice['rule'])
  assert out['n_sigma']['dice'] is not None  # the label-free threshold works for every method

  loc = rundir.load_localizer(workdir, method=name)
  run_config, _, params, _ = checkpointing.restore_for_inference(workdir)
  restored_method = methods.create(calibration.apply(run_config, choice))  # the calibrated t
  images = np.stack([ex['image'] for ex in test_src[:4]]).astype(np.float32) / 255.0
  stats = rundir.load(workdir).stats
  z, mask = loc(images)
  z0, mask0 = localization.localize(restored_method.field_fn(params), images, stats,
                                    n_sigma=used['n_sigma'], rule=used['rule'],
                                    smoothing_sigma=used['smoothing_sigma'])
  np.testing.assert_allclose(z, z0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(loc)(images)[0], z, rtol=1e-4, atol=1e-5)
  if name == 'vqvae':  # the codebook is in use: more than one code after training
    x = 2.0 * images - 1.0
    assert float(autoencoders.code_perplexity(restored_method.codes(params, x),
                                              restored_method.num_codes)) > 1.0
