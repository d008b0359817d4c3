"""Dataset helpers that import nothing of this package: the subject split and TF's GPU hiding.

The builders (``sano_jax.datasets.folder``, ``tfds_11k_hands.hands11k``) import these from here, so
that a builder module never has to import ``sano_jax.datasets`` (whose ``register_builders`` imports
the builders). ``from sano_jax.datasets import split_subjects`` keeps working.
"""
import hashlib

_GPUS_HIDDEN = False


def hide_gpus_from_tf() -> None:
  """Makes TensorFlow (used only to write TFDS datasets) never take accelerator memory."""
  global _GPUS_HIDDEN
  if _GPUS_HIDDEN:
    return
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:  # Reading needs no TF; only writing does.
    return
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialized: nothing more we can do.
    pass
  _GPUS_HIDDEN = True


def split_subjects(counts: dict[str, int], holdout_fraction: float) -> tuple[set, set]:
  """Deterministic subject split: (kept, held_out) with ~holdout_fraction of the images held out.

  Subjects are ordered by sha256 of their id; held-out subjects are taken in that order while the
  held-out image count stays closest to the target. With >= 2 subjects both parts are nonempty.
  """
  order = sorted(counts, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  target = holdout_fraction * sum(counts.values())
  held, total = [], 0
  for s in order:
    if total + counts[s] / 2 > target:
      break
    held.append(s)
    total += counts[s]
  if not held and holdout_fraction > 0 and len(order) >= 2:
    held = [order[0]]
  if len(held) == len(order) and len(order) >= 2:
    held = held[:-1]
  return set(order) - set(held), set(held)
