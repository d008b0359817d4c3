"""Preemption's SIGTERM handler in-process. run_train.py preempted by a real SIGTERM (it saves, exits
0, and its resumed run ends bit-identical to an uninterrupted one) is tested beside the kill
harness, whose uninterrupted reference run it shares
(tests/test_kill_harness.py::test_sigterm_saves_exits_0_and_resumes_bit_identically)."""
import signal

import pytest

from sano_jax import checkpointing, preemption, train
from tests.helpers import grating_source, tiny_config


def test_handler_is_installed_only_while_training(tmp_path):
  """Preemption sets its flag on SIGTERM and puts the previous handler back; train_and_evaluate
  does so even when it fails."""
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
  try:
    p = preemption.Preemption()
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
