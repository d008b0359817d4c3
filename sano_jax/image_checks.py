"""Host-side checks of image batches, numpy only (the exported localizer's loader uses them without
importing flax or the model code)."""
import numpy as np


def check_images(images) -> None:
  """Host-side check (concrete arrays): rank 4, finite, and in [0, 1] for float images.

  Raises ValueError naming the problem. Not usable under jit (it reads the values).
  """
  arr = np.asarray(images)
  if arr.ndim != 4:
    raise ValueError(f'images must be [B,H,W,C], got shape {arr.shape}')
  if arr.dtype == np.uint8:
    return
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f'images must be float in [0, 1] or uint8, got dtype {arr.dtype}')
  finite = np.isfinite(arr)
  if not finite.all():
    bad = int((~finite).sum())
    raise ValueError(f'images contain {bad} non-finite values (NaN or inf)')
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise ValueError(f'float images must lie in [0, 1], got range [{arr.min()}, {arr.max()}]')


def to_unit(images) -> np.ndarray:
  """uint8 images in [0, 255] (the data contract's examples, decoded files) -> float32 in [0, 1]:
  the one host-side scaling (`sano_jax.score_stats.to_float_images` is the one inside jit)."""
  arr = np.asarray(images)
  if arr.dtype != np.uint8:
    raise ValueError(f'expected uint8 images in [0, 255], got dtype {arr.dtype}')
  return arr.astype(np.float32) / np.float32(255.0)
