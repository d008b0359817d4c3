"""train_and_evaluate and run_train.py: learning, kill-and-resume, clear errors."""
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from sano_jax import checkpointing, methods, train
from tests import helpers
from tests.helpers import grating_source, read_log, subprocess_timeout, tiny_config



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


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The embedded dataset at 16 px, built once."""
  return helpers.build_textures(tmp_path_factory.mktemp('tfds'))


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path, data_dir):
  steps = ['--config.training.num_train_steps=60', '--config.training.checkpoint_every=10',
           '--config.training.eval_every=10', '--config.training.log_every=10']
  # Run 1: SIGKILL as soon as its checkpoint at step 10 is on disk.
  killed = tmp_path / 'killed'
  log = tmp_path / 'killed.log'
  proc = helpers.run_train_process(killed, data_dir, *steps, log=log)
  deadline = time.monotonic() + subprocess_timeout()
  while not (killed / 'checkpoints' / '10').is_dir():
    assert proc.poll() is None, read_log(log)
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'no checkpoint at step 10 after {subprocess_timeout():.0f} s:\n{read_log(log)}')
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(s) for s in os.listdir(killed / 'checkpoints') if s.isdigit())
  assert saved and saved[-1] < 60, saved
  # Run 2: the same command resumes from the latest checkpoint and finishes.
  log = tmp_path / 'resumed.log'
  code, out = helpers.finish_process(helpers.run_train_process(killed, data_dir, *steps, log=log), log)
  assert code == 0, out[-4000:]
  assert f'at step {saved[-1]}' in out  # "resumed from ... at step k"
  # Run 3: uninterrupted, same seed.
  log = tmp_path / 'straight.log'
  code, out = helpers.finish_process(helpers.run_train_process(tmp_path / 'straight', data_dir, *steps, log=log), log)
  assert code == 0, out[-4000:]
  a = checkpointing.CheckpointStore(str(killed)).latest
  b = checkpointing.CheckpointStore(str(tmp_path / 'straight')).latest
  assert a.latest_step() == b.latest_step() == 60
  from orbax import checkpoint as ocp
  ra = a.restore(60, args=ocp.args.StandardRestore())
  rb = b.restore(60, args=ocp.args.StandardRestore())
  for x, y in zip(jax.tree.leaves(ra), jax.tree.leaves(rb)):
    np.testing.assert_array_equal(x, y)
