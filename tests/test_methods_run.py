"""Every method through the ONE training / evaluation / inference path: it learns (validation loss
well below the initial one), is evaluated with the label-free threshold, and its checkpoint restores
through `load_localizer`, whose output equals `localize` with the method's field."""
import json
import os

import jax
import numpy as np
import pytest

from sano_jax import checkpointing, evaluate, localization, methods, train
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


@pytest.mark.parametrize('name', methods.METHODS)
def test_method_trains_evaluates_and_restores(name, tmp_path):
  config = tiny_config(**{'method': name, 'training.num_train_steps': 100,
                          'training.eval_every': 50, 'training.checkpoint_every': 50,
                          'training.log_every': 50, 'training.eval_batches': -1,
                          'optim.warmup_steps': 10, 'training.ema_rate': 0.9, 'seed': 3})
  train_src, val_src = grating_source(64), grating_source(16, seed=1, subject_offset=100)
  test_src = anomalous_source(12)
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
  assert out['localization']['method'] == name and out['auroc'] is not None and 0.0 <= out['auroc'] <= 1.0
  assert out['n_sigma']['dice'] is not None  # the label-free threshold works for every method

  loc = localization.load_localizer(workdir, method=name)
  _, restored_method, params = checkpointing.restore_for_inference(workdir)
  images = np.stack([ex['image'] for ex in test_src[:4]]).astype(np.float32) / 255.0
  stats = localization.load_stats(os.path.join(workdir, 'score_stats.npz'))
  z, mask = loc(images)
  z0, mask0 = localization.localize(restored_method.field_fn(params), images, stats)
  np.testing.assert_allclose(z, z0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(loc)(images)[0], z, rtol=1e-4, atol=1e-5)
  if name == 'vqvae':  # the codebook is in use: more than one code after training
    x = 2.0 * images - 1.0
    assert float(autoencoders.code_perplexity(restored_method.codes(params, x),
                                              restored_method.num_codes)) > 1.0
