"""Shared set-up of the command-line entry points (run_train.py, run_eval.py, run_demo.py)."""
import logging

from absl import logging as absl_logging


class _QuietOrbax(logging.Filter):
  """Orbax logs every save step by step at INFO: keep its warnings, drop its chatter."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def setup_logging() -> None:
  """absl INFO logs without Orbax's per-save chatter."""
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())
