"""Preemption: SIGTERM makes run_train.py finish its step, save a checkpoint there and exit 0; the
same command resumes there and ends with the params of an uninterrupted run, bit for bit."""
import os
import re
import signal

import pytest

from sano_jax import checkpointing, train
from tests.helpers import (assert_same_checkpoint, build_textures, finish_process, grating_source,
                           run_train_process, tiny_config, wait_for)

# 60 steps: ample margin for the SIGTERM to land mid-run on a busy machine (steps are ~0.1 s, the set-up
# a minute); validation only at the end, on no batches (no eval step to compile).
STEPS = ['--config.training.num_train_steps=60', '--config.training.checkpoint_every=20',
         '--config.training.eval_every=60', '--config.training.log_every=5',
         '--config.training.eval_batches=0']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return build_textures(tmp_path_factory.mktemp('tfds'))


def _saved_steps(workdir):
  d = workdir / 'checkpoints'
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


def test_sigterm_saves_exits_0_and_resumes_bit_identically(tmp_path, data_dir):
  # Run 1: SIGTERM once training runs (the first metrics row is written after the first step).
  wd, log = tmp_path / 'run', tmp_path / 'run.log'
  proc = run_train_process(wd, data_dir, *STEPS, log=log)
  metrics = wd / 'metrics.jsonl'
  wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, log, 'first metrics row')
  proc.send_signal(signal.SIGTERM)
  code, out = finish_process(proc, log)
  assert code == 0, out[-4000:]
  found = re.search(r'preempted at step (\d+): saved a checkpoint at step (\d+)', out)
  assert found, out[-4000:]
  step = int(found.group(1))
  assert int(found.group(2)) == step and 0 < step < 60
  assert _saved_steps(wd)[-1] == step, _saved_steps(wd)
  # Run 2: the same command resumes at that step and finishes.
  log = tmp_path / 'resumed.log'
  code, out = finish_process(run_train_process(wd, data_dir, *STEPS, log=log), log)
  assert code == 0, out[-4000:]
  assert f'at step {step}' in out  # "resumed from ... at step N"
  assert 'preempted at step' not in out
  # Run 3: uninterrupted, same seed: the same train state at step 60, bit for bit.
  straight, log = tmp_path / 'straight', tmp_path / 'straight.log'
  code, out = finish_process(run_train_process(straight, data_dir, *STEPS, log=log), log)
  assert code == 0, out[-4000:]
  assert_same_checkpoint(wd, straight, 60)


def test_handler_is_installed_only_while_training(tmp_path):
  """Preemption sets its flag on SIGTERM and puts the previous handler back; train_and_evaluate
  does so even when it fails."""
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
  try:
    p = train.Preemption()
    p.start()
    assert signal.getsignal(signal.SIGTERM) == p._on_sigterm  # pylint: disable=protected-access
    assert not p.reached(1)
    signal.raise_signal(signal.SIGTERM)
    assert p.reached(2) and not calls
    p.stop()
    assert signal.getsignal(signal.SIGTERM) is not p._on_sigterm  # pylint: disable=protected-access
    signal.raise_signal(signal.SIGTERM)
    assert len(calls) == 1
    # A run that fails during set-up (another model's workdir) leaves the handler as it found it.
    handler = signal.getsignal(signal.SIGTERM)
    wd = str(tmp_path / 'other')
    checkpointing.save_config(tiny_config(**{'model.nf': 16}), wd)
    src = grating_source(8)
    with pytest.raises(ValueError, match='different model'):
      train.train_and_evaluate(tiny_config(), wd, train_source=src, val_source=src)
    assert signal.getsignal(signal.SIGTERM) is handler
  finally:
    signal.signal(signal.SIGTERM, previous)
