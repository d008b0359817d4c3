"""train_and_evaluate and run_train.py: learning and clear errors. (Kill-and-resume of run_train.py:
tests/test_kill_harness.py, ten SIGKILLs and a SIGTERM, each ending bit-identical to an
uninterrupted run.)"""
import json
import os

import jax
import numpy as np
import pytest

from sano_jax import checkpointing, methods, train
from tests import helpers
from tests.helpers import grating_source, tiny_config



def _val_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r['validation/loss'] for r in rows if 'validation/loss' in r]


def test_200_steps_lower_the_validation_loss(tmp_path):
  config = tiny_config(**{'training.num_train_steps': 200, 'training.eval_every': 100,
                          'training.checkpoint_every': 100, 'training.log_every': 50,
                          'training.eval_batches': -1, 'optim.warmup_steps': 20,
                          'optim.lr': 1e-3, 'training.ema_rate': 0.9, 'seed': 7})
  train_src, val_src = grating_source(64), grating_source(32, seed=1, subject_offset=100)
  # Untrained: the zero-initialised output predicts eps_hat = 0, so the loss is E|z|^2 / D ~ 1.
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  state = train.create_train_state(config, method, tx, jax.random.PRNGKey(config.seed))
  mesh = train.make_mesh()
  _, evaluate = train.make_steps(config, method, tx, mesh)
  initial = train.evaluate_loss(evaluate, train.replicate(state.ema_params, mesh), val_src, config, mesh)
  final_state = train.train_and_evaluate(config, str(tmp_path), train_source=train_src, val_source=val_src)
  losses = _val_losses(tmp_path)
  assert int(final_state.step) == 200 and len(losses) == 2
  assert 0.9 < initial < 1.1
  assert losses[-1] < 0.5 * initial, (initial, losses)
  # The best checkpoint is the one with the lowest validation loss.
  best = checkpointing._manager(os.path.join(tmp_path, 'best'), keep=1, best=True)
  assert best.best_step() == 100 + 100 * int(np.argmin(losses))


@pytest.mark.four_devices
def test_errors_are_clear(tmp_path):
  src = grating_source(32)
  with pytest.raises(ValueError, match='batch_size=6 is not divisible by the 4 devices'):
    train.train_and_evaluate(tiny_config(**{'training.batch_size': 6}), str(tmp_path / 'a'),
                             train_source=src, val_source=src)
  # Non-finite loss: stop with a clear message, keep the last good checkpoint.
  wd = str(tmp_path / 'nan')
  config = tiny_config(**{'training.num_train_steps': 10})
  train.train_and_evaluate(config, wd, train_source=src, val_source=src)
  blowup = tiny_config(**{'training.num_train_steps': 30, 'optim.lr': 1e38})
  with pytest.raises(FloatingPointError, match=r'non-finite loss .* last good checkpoint \(step 10\)'):
    train.train_and_evaluate(blowup, wd, train_source=src, val_source=src)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['10']
  # A workdir holding another model.
  with pytest.raises(ValueError, match='different model.*nf: checkpoint 8 vs config 16'):
    train.train_and_evaluate(tiny_config(**{'model.nf': 16}), wd, train_source=src, val_source=src)


def test_unknown_config_key_is_a_clear_error(tmp_path):
  log = tmp_path / 'log.txt'
  proc = helpers.run_train_process(tmp_path / 'w', tmp_path / 'd', '--config.training.bogus_key=3', log=log)
  code, out = helpers.finish_process(proc, log)
  assert code != 0
  assert 'bogus_key' in out
