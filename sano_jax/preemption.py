"""Preemption: a SIGTERM (or, with several processes, JAX's preemption notice) asks a training run
to stop; it finishes its step, saves a checkpoint there and returns, so that the same command
resumes it (`sano_jax.train`)."""
from __future__ import annotations

import signal
import threading

from absl import logging
import jax


class Preemption:
  """Whether the run has been asked to stop: SIGTERM (a preempted Cloud TPU VM gets it, then a
  short grace period) or, with several processes, JAX's preemption sync point.

  With one process, a SIGTERM handler (installed by `start`, the previous one put back by `stop`)
  sets a flag. With several, every host must stop at the same step: `jax.distributed.initialize`
  starts JAX's preemption service, which catches SIGTERM on any host and agrees on a step with the
  others (`multihost_utils.reached_preemption_sync_point`, asked at every step); no Python handler
  is installed then, as it would replace the service's."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False
    self._sync = None  # with several processes: whether the preemption service is on (asked once)

  def start(self) -> None:
    # Several processes: JAX's service catches SIGTERM. Python runs handlers in the main thread only.
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int, k: int = 1) -> bool:
    """Whether to stop after the call that ran steps step-k+1 .. step (called after every call)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._sync is None:
      try:
        multihost_utils.reached_preemption_sync_point(step - k)
        self._sync = True
      except RuntimeError:  # the service is off: a local flag could stop hosts at different steps
        self._sync = False
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service): a "
                        'SIGTERM ends this run without a checkpoint (it resumes from the last '
                        'periodic one).')
    if self._sync:
      # The agreed step is one past the furthest host's last report: report every step, in order.
      hits = [multihost_utils.reached_preemption_sync_point(s)
              for s in range(step - k + 1, step + 1)]
      self.requested = self.requested or any(hits)
    return self.requested

  def stop(self) -> None:
    """Puts the previous SIGTERM handler back (the default where it was not set from Python)."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False
