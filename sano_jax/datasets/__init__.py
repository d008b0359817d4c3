"""Datasets of the sano-jax data contract (docs/design.md, "The data contract").

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
# The helpers live in a module that imports nothing of this package (the builders import them
# from there; register_builders below imports the builders): no import circle.
from sano_jax.datasets.splits import hide_gpus_from_tf
from sano_jax.datasets.splits import split_subjects

__all__ = ['hide_gpus_from_tf', 'register_builders', 'split_subjects']


def register_builders() -> None:
  """Imports every builder of this project so that ``tfds.builder(name)`` finds it."""
  # pylint: disable=g-import-not-at-top,unused-import
  from sano_jax.datasets import folder
  from sano_jax.datasets import textures
  import tfds_11k_hands.hands11k
  # pylint: enable=g-import-not-at-top,unused-import
