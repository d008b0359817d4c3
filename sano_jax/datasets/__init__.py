"""Datasets of the sano-jax data contract (DESIGN.md, "Contracts" and "Data").

Every dataset yields ``{image: uint8 [H,W,C], mask: uint8 [H,W,1] (0 healthy, 1 anomalous),
subject: str, name: str}``; ``train`` and ``validation`` are healthy and subject-disjoint, ``test``
holds the anomalous images with their masks (and may hold healthy ones).

* ``sano_textures`` (:mod:`sano_jax.datasets.textures`): embedded, built offline from the CC0
  images inside scikit-image's wheel.
* ``sano_folder`` (:mod:`sano_jax.datasets.folder`): the user's own folders of images and masks.
* ``hands11k`` (:mod:`tfds_11k_hands.hands11k`): 11k Hands with the jewelry masks (manual download).

Builders register themselves with TFDS when their module is imported; ``register_builders()``
imports them all.
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


def register_builders() -> None:
  """Imports every builder of this project so that ``tfds.builder(name)`` finds it."""
  # pylint: disable=g-import-not-at-top,unused-import
  from sano_jax.datasets import folder
  from sano_jax.datasets import textures
  import tfds_11k_hands.hands11k
  # pylint: enable=g-import-not-at-top,unused-import
