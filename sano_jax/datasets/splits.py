"""Dataset helpers that import nothing of this package: the subject split and TF's GPU hiding.

The builders (``sano_jax.datasets.folder``, ``tfds_11k_hands.hands11k``) import these from here, so
that a builder module never has to import ``sano_jax.datasets`` (whose ``register_builders`` imports
the builders). ``from sano_jax.datasets import split_subjects`` keeps working.
"""
import hashlib
import logging

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

  Subjects are visited in the order of the sha256 of their id; each is held out when that brings
  the held-out image count closer to the target (a subject that would overshoot is skipped, not the
  end of the walk: subjects of 95 and 5 images at 0.2 hold out the 5). With >= 2 subjects and
  0 < fraction < 1 both parts are nonempty (else the smallest subject is held out, or the last
  held-out one kept). A split more than half the target away from it is logged as a warning that
  says what it got.
  """
  order = sorted(counts, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  total_images = sum(counts.values())
  target = holdout_fraction * total_images
  held, total = [], 0
  for s in order:
    if abs(total + counts[s] - target) < abs(total - target):
      held.append(s)
      total += counts[s]
  if not held and holdout_fraction > 0 and len(order) >= 2:
    held = [min(order, key=lambda s: counts[s])]  # the first smallest, in the sha256 order
  if len(held) == len(order) and len(order) >= 2:
    held = held[:-1]
  got = sum(counts[s] for s in held)
  if total_images and abs(got - target) > 0.5 * target:
    logging.warning('subject split: %d of %d images (%.0f%%) held out for a target of %.0f%%; the '
                    'subjects (%d, the largest with %d images) cannot come closer. Add subjects or '
                    'change the fraction.', got, total_images, 100 * got / total_images,
                    100 * holdout_fraction, len(order), max(counts.values()))
  return set(order) - set(held), set(held)
