"""Decoding image and mask files, the same way for training data and for prediction.

Imports nothing of this package but ``sano_jax.files`` (files are read through etils.epath: local
or gs://), and no TensorFlow: ``sano_jax.predict`` uses it too, so that an image file becomes the
same pixels whether the folder builder reads it for training or ``predict`` reads it for
localization.

* ``open_image``: decodes fully (a truncated file fails here, not later), applies the EXIF
  orientation (a phone photo is seen upright, as every viewer shows it) and turns any failure
  (including Pillow's decompression-bomb guard) into a ValueError naming the file.
* ``to_8bit``: 16/32-bit integer and float gray images -> 'L', scaled by their type's range
  (65535 for integer, 1.0 for float), never per image; values outside it are an error.
* ``flatten_alpha``: alpha composited over white.
* ``center_square``: the central square of an image, which the dataset keeps (short side, no
  stretching) and ``predict`` scores.
* ``mask_to_binary``: a mask file -> bool [H, W]; it must hold 0 (healthy) and at most one
  nonzero value (anomalous), else a ValueError naming the file and its values.
"""
from __future__ import annotations

import io
import os

import numpy as np

from sano_jax import files

_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')


def open_image(source: str | os.PathLike | bytes, where: str | None = None):
  """A fully decoded, EXIF-oriented PIL image; ValueError naming `where` (or the path) on failure."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  if where is None:
    where = os.fspath(source) if not isinstance(source, bytes) else '<bytes>'
  try:
    if isinstance(source, bytes):
      data = source
    else:
      data = files.read_bytes(source)
    img = Image.open(io.BytesIO(data))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # no-op without an orientation tag
  except Exception as e:  # pylint: disable=broad-except
    # UnidentifiedImageError, OSError (truncated), SyntaxError, DecompressionBombError, ...
    raise ValueError(f'cannot decode image file {where}: {e}') from e
  return img


def to_8bit(im, where: str = 'image'):
  """16/32-bit integer and float gray images -> 'L', by one rule per type, never per image:
  integer (modes 'I;16*' and 'I', which is how Pillow opens a 16-bit PNG) / 65535, float ('F') in
  [0, 1] as is. Values outside the type's range are a ValueError naming `where`, the range and the
  fix (a per-image choice of scale made the same value 200 stay 200 in one file and 255 in another).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if im.mode.startswith('I;16') or im.mode in ('I', 'F'):
    a = np.asarray(im).astype(np.float64)
    top = 1.0 if im.mode == 'F' else 65535.0
    if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= top):
      kind = 'float' if im.mode == 'F' else '16-bit integer'
      raise ValueError(f'{where} is a {kind} image (mode {im.mode}) with values in '
                       f'[{np.nanmin(a):g}, {np.nanmax(a):g}]; {kind} images must lie in [0, '
                       f'{top:g}]. Rescale the file to that range (or save it as 8-bit).')
    return Image.fromarray((a / top * 255.0 + 0.5).astype(np.uint8), 'L')
  return im


# Datasets that store each image whole, resized to a square (stretched, as the paper's 11k Hands);
# every other dataset keeps the central square of each image, aspect ratio kept.
STRETCHED = ('hands11k',)


def stored_geometry(dataset: str) -> str:
  """How `dataset` (a config.data.dataset) stored its images: 'stretch' (the whole image resized to
  S x S) or 'square' (the central square, resized to S x S: the scale is S / the short side)."""
  return 'stretch' if str(dataset).split('/')[0] in STRETCHED else 'square'


def center_square(width: int, height: int) -> tuple[int, int, int]:
  """(left, top, side) of the largest centred square: side = min(width, height)."""
  side = min(int(width), int(height))
  return (int(width) - side) // 2, (int(height) - side) // 2, side


def crop_center_square(im):
  """A PIL image cut to its central square (the aspect ratio is kept, nothing is stretched)."""
  left, top, side = center_square(*im.size)
  return im if im.size == (side, side) else im.crop((left, top, left + side, top + side))


def has_alpha(im) -> bool:
  return im.mode in _ALPHA_MODES or (im.mode == 'P' and 'transparency' in im.info)


def flatten_alpha(im):
  """Alpha composited over white (RGBA -> RGBA, opaque); other images unchanged."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not has_alpha(im):
    return im
  rgba = im.convert('RGBA')
  white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba)


def mask_to_binary(im, where: str, threshold: float | None = None) -> np.ndarray:
  """bool [H, W] (True = anomalous) from a decoded mask image.

  Gray, 16-bit, float and palette masks: nonzero value (palette index) = anomalous. Colour masks:
  nonzero in any channel. Masks with alpha: transparent pixels are healthy; opaque pixels are
  anomalous where their colour is nonzero, or, when every opaque pixel is black (a mask drawn in
  the alpha channel only), wherever alpha is nonzero. The values must be 0 and at most ONE nonzero
  value: a JPEG-compressed, anti-aliased or multi-label mask raises ValueError naming the file,
  unless `threshold` is given: then anomalous = value > threshold (asked for explicitly, e.g.
  --config.data.mask_threshold=127 for masks saved with anti-aliased edges).
  """
  arr = np.asarray(im)
  if im.mode in _ALPHA_MODES and arr.ndim == 3:
    alpha, colour = arr[..., -1], arr[..., :-1].max(axis=-1)
    opaque = alpha != 0
    values = alpha if not colour[opaque].any() else np.where(opaque, colour, 0)
  elif arr.ndim == 3:
    values = arr.max(axis=-1)
  else:
    values = arr
  if threshold is not None:
    return values > threshold
  nonzero = np.unique(values[values != 0])
  if nonzero.size > 1:
    shown = ', '.join(str(v) for v in nonzero[:5]) + (', ...' if nonzero.size > 5 else '')
    raise ValueError(
        f'mask {where} is not binary: besides 0 it holds {nonzero.size} distinct values ({shown}). '
        'A mask must hold 0 (healthy) and one nonzero value (anomalous); JPEG compression and '
        'anti-aliasing make other values. Set --config.data.mask_threshold=127 to count the '
        'values above 127 as anomalous, or binarize the file (np.where(mask > 127, 255, 0)) and '
        'save it as PNG.')
  return values != 0
