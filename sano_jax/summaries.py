"""What long work shows while it runs: the console progress bar, the TensorBoard writer and
training's metrics log (metrics.jsonl), one definition each for training, evaluation and
prediction."""
from __future__ import annotations

import json
import os

from absl import logging
import tqdm

from sano_jax import files

METRICS_LOG = 'metrics.jsonl'  # a run directory's training log (`MetricsLog`)


def progress(iterable=None, *, total: int, unit: str, desc: str | None = None, initial: int = 0,
             enabled: bool = True, mininterval: float = 1.0) -> tqdm.tqdm:
  """A tqdm bar (items/s shown as `unit`/s), off when not `enabled` (processes other than the
  first)."""
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                   disable=not enabled, dynamic_ncols=True, mininterval=mininterval)


def tensorboard_writer(log_dir: str, *, auto_flush: bool = True):
  """flax.metrics.tensorboard.SummaryWriter on `log_dir` (local or gs://), or None with a warning
  when TensorFlow, which writes the event files, is not installed. TensorFlow is kept off the GPUs:
  JAX owns the accelerators."""
  try:
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top  (needs TensorFlow)
  except ImportError:
    logging.warning('TensorFlow not installed: no TensorBoard summaries in %s.', log_dir)
    return None
  from sano_jax.datasets import splits  # pylint: disable=g-import-not-at-top  (the package imports TFDS)
  splits.hide_gpus_from_tf()
  return tensorboard.SummaryWriter(log_dir, auto_flush=auto_flush)


def _rows_up_to(text: str, step: int) -> str:
  """The lines of a metrics.jsonl text whose step is <= `step`. A resumed run restarts at its
  checkpoint's step and logs again every step after it, so the rows that a killed run wrote after
  its last checkpoint go, and with them a half-written last line (a kill during the write)."""
  kept = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= step:
      kept.append(line + '\n')
  return ''.join(kept)


class MetricsLog:
  """metrics.jsonl, TensorBoard event files and absl log lines; only process 0 writes.

  Opened at `start_step` (a resumed run's checkpoint step), it first drops the file's rows of
  later steps (see `_rows_up_to`): after a resume every step appears once, as in a run that was
  never killed.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int):
    self.enabled = enabled
    self.writer = None
    if enabled:
      path = os.path.join(workdir, METRICS_LOG)  # local or gs://
      kept = ''
      if files.exists(path):
        text = files.read_text(path)
        kept = _rows_up_to(text, start_step)
        if kept != text:
          files.atomic_write_text(path, kept)
      self.jsonl = files.LineAppender(path, text=kept)  # read once, also on a bucket
      self.writer = tensorboard_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.append(json.dumps({'step': step, **scalars}))
    if self.writer is not None:
      for k, v in scalars.items():
        self.writer.scalar(k, v, step)
      self.writer.flush()
    logging.info('step %d: %s', step, ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))

  def close(self):
    if self.enabled:
      self.jsonl.close()
      if self.writer is not None:
        self.writer.close()
