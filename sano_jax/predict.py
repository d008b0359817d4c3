r"""Localize anomalies in your own image files with a trained, calibrated SANO run.

  python -m sano_jax.predict --workdir=workdirs/demo --images='photos/*.jpg' --out=predictions

Each image (any size; any format Pillow reads; gray, RGB, RGBA, palette or 16-bit) is converted to
the model's channel count and scored WHOLE, at the geometry its training data was stored with:
for the folder, MVTec and embedded datasets (which keep each image's central square) it is resized
so that its short side is the model's size, aspect ratio kept, and covered by windows of the
model's size at most half a window apart, each pixel taking the window whose centre is nearest;
for 11k Hands (stored stretched to a square) it is resized to the model's size. The windows are
localized with the run's localizer (`rundir.load`) in batches, and the z-map is resized back to the
image (bilinear), its mask with nearest neighbour: every pixel of every input gets a score.
Writes O/<stem>_mask.png (0/255), O/<stem>_heatmap.png (the z-map over the image) and
O/predictions.json (per image: max z, anomalous fraction, the scored square). The run needs its
inference bundle (sano_jax/rundir.py), written by run_eval.py.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
from absl import logging
import numpy as np

from sano_jax import cli
from sano_jax import files
from sano_jax import image_checks
from sano_jax import rundir
from sano_jax import summaries
from sano_jax.datasets import images as images_lib

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                    '.pgm')


def find_images(pattern: str) -> list[str]:
  """Files matching a glob (or all image files of a directory; local or gs://), sorted;
  FileNotFoundError if none."""
  if files.isdir(pattern):
    paths = [os.path.join(pattern, f) for f in files.listdir(pattern)
             if f.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    paths = [p for p in files.glob(pattern) if files.isfile(p)]
  if not paths:
    raise FileNotFoundError(f'no image file matches {pattern!r} (quote the glob so that the shell '
                            "does not expand it, e.g. --images='dir/*.jpg')")
  return paths


def read_image(path: str, channels: int) -> np.ndarray:
  """float32 [H, W, channels] in [0, 1]. Alpha is composited over white; 16-bit is rescaled.

  Decoded as the folder builder decodes training images (``sano_jax.datasets.images``): EXIF
  orientation applied (a phone photo is upright, as viewers show it), 16-bit scaled by 1/65535,
  float by its range, CMYK converted to RGB. Raises ValueError naming the file when it cannot be
  read as an image (corrupt, truncated, or over Pillow's decompression-bomb limit).
  """
  if channels not in (1, 3):
    raise ValueError(f'the model has {channels} channels; predict supports 1 (gray) or 3 (RGB)')
  try:
    im = images_lib.open_image(path, repr(path))
  except ValueError as e:
    raise ValueError(f'cannot read {path!r} as an image: {e.__cause__ or e}') from e
  try:
    im = images_lib.flatten_alpha(images_lib.to_8bit(im, repr(path)))
    im = im.convert('L' if channels == 1 else 'RGB')
    arr = image_checks.to_unit(np.asarray(im))
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'cannot read {path!r} as an image: {e}') from e
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f'{path!r} is an empty image ({arr.shape[1]}x{arr.shape[0]})')
  return arr


def _check_readable(path: str) -> None:
  """Header-only check (cheap); a file cut off after its header fails later, in read_image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with files.path(path).open('rb') as f, Image.open(f):
      pass
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot read {path!r} as an image: {e}') from e


def _resize(x: np.ndarray, shape: tuple[int, int], order: int, anti_aliasing: bool) -> np.ndarray:
  from skimage import transform  # pylint: disable=g-import-not-at-top
  return transform.resize(x, shape, order=order, anti_aliasing=anti_aliasing, preserve_range=True,
                          mode='edge').astype(np.float32)


def _at_model_scale(image: np.ndarray, size: int, geometry: str) -> np.ndarray:
  """The whole image at the scale its training data was stored at (anti-aliased, in [0, 1]):
  'stretch': resized to size x size; 'square': its short side resized to `size`, aspect ratio kept
  (the dataset stored the central square at that scale)."""
  h, w = image.shape[:2]
  if geometry == 'stretch':
    shape = (size, size)
  else:
    shape = (max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w))))
  return np.clip(_resize(image, shape, order=1, anti_aliasing=True), 0.0, 1.0)


def window_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
  """(top, left) of size x size windows covering a height x width image, at most size / 2 apart
  along each axis (one window per axis of length `size`)."""
  def starts(n):
    k = 1 if n <= size else -(-2 * (n - size) // size) + 1
    return np.unique(np.linspace(0, n - size, k).round().astype(int)).tolist()
  return [(t, l) for t in starts(height) for l in starts(width)]


def assemble(zs: np.ndarray, masks: np.ndarray, offsets, shape) -> tuple[np.ndarray, np.ndarray]:
  """The z-map and mask of a whole image from its windows' (zs, masks [K, size, size]): each pixel
  takes the window whose centre is nearest (the first on a tie), so mask = z > the threshold holds
  everywhere as it does in each window, and no window's border decides a pixel another centres."""
  size = zs.shape[1]
  ys, xs = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
  dist = np.stack([np.maximum(np.abs(ys + 0.5 - t - size / 2), np.abs(xs + 0.5 - l - size / 2))
                   for t, l in offsets])
  pick = np.argmin(dist, axis=0)  # [H, W]: the window of each pixel
  top, left = (np.asarray(o)[pick] for o in zip(*offsets))
  rows, cols = ys - top, xs - left  # each pixel's place in its window
  return zs[pick, rows, cols].astype(np.float32), masks[pick, rows, cols].astype(bool)


def heatmap_overlay(image: np.ndarray, z: np.ndarray, n_sigma: float) -> np.ndarray:
  """uint8 RGB [H, W, 3]: the z-map (inferno, 0..max(2N, z_max)) blended over the image where z is
  high (opacity rising to 0.7 at z >= N), the image alone where z is low."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  base = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  vmax = max(2.0 * n_sigma, float(np.max(z)) if z.size else 0.0, 1e-6)
  colour = colormaps['inferno'](np.clip(z / vmax, 0.0, 1.0))[..., :3]
  alpha = 0.25 + 0.45 * np.clip(z / max(n_sigma, 1e-6), 0.0, 1.0)[..., None]
  out = (1.0 - alpha) * base + alpha * colour
  return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _out_names(paths: Sequence[str]) -> list[str]:
  """Output stems: the file stem, made unique when two inputs share one (a.jpg, a.png)."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  out = []
  for p, s in zip(paths, stems):
    if counts[s] > 1:
      s = f'{s}_{os.path.splitext(p)[1].lstrip(".").lower() or "noext"}'
    out.append(s)
  if len(set(out)) != len(out):  # same stem and extension in different folders
    out = [f'{s}_{i:04d}' for i, s in enumerate(out)]
  return out


def _check_outputs(paths: Sequence[str], out_dir: str, names: Sequence[str]) -> None:
  """ValueError when OUT is a folder of the input images (predict never writes among its inputs);
  a warning listing the files of an earlier prediction that this one replaces."""
  out = files.absolute(out_dir).rstrip('/')
  folders = {os.path.dirname(files.absolute(p)).rstrip('/') for p in paths}
  if out in folders:
    raise ValueError(f'--out={out_dir} is a folder of the input images: predict writes its masks '
                     'and heatmaps elsewhere. Choose another --out.')
  outputs = ['predictions.json'] + [f'{s}_{k}.png' for s in names for k in ('mask', 'heatmap')]
  present = [n for n in outputs if files.exists(os.path.join(out_dir, n))]
  if present:
    shown = ', '.join(present[:6]) + (', ...' if len(present) > 6 else '')
    logging.warning('replacing %d file(s) of an earlier prediction in %s: %s', len(present),
                    out_dir, shown)


def predict(workdir: str, images: str | Sequence[str], out_dir: str, *, batch_size: int = 16,
            progress: bool = True, method: str | None = None) -> list[dict]:
  """Localizes every image of `images` (a glob, a folder, or a list of paths) into `out_dir`.

  Returns per image {path, mask, heatmap, height, width, max_z, anomalous_fraction}.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  paths = find_images(images) if isinstance(images, str) else list(images)
  if not paths:
    raise FileNotFoundError('no image files given')
  bundle = rundir.load(workdir, method=method)  # the model and its checked inference bundle
  config = bundle.config  # with the localize settings the evaluation used (calibrated N included)
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  n_sigma = float(config.localize.n_sigma)
  for p in paths:  # header-only check of every file before any work is done
    _check_readable(p)
  names = _out_names(paths)
  _check_outputs(paths, out_dir, names)
  localizer = rundir.localizer(bundle)
  files.makedirs(out_dir)
  batch_size = max(1, int(batch_size))
  results = []
  bar = summaries.progress(total=len(paths), unit='img', enabled=progress)
  geometry = images_lib.stored_geometry(config.data.dataset)
  try:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      originals = [read_image(p, channels) for p in chunk]
      scaled = [_at_model_scale(im, size, geometry) for im in originals]
      windows = [window_offsets(x.shape[0], x.shape[1], size) for x in scaled]
      crops = [x[t:t + size, l:l + size] for x, offs in zip(scaled, windows) for t, l in offs]
      zs, masks = [], []
      for c in range(0, len(crops), batch_size):  # fixed batch shape: one compile
        batch = np.zeros((batch_size, size, size, channels), np.float32)
        part = crops[c:c + batch_size]
        batch[:len(part)] = part
        z, mask = localizer(batch)
        zs.append(np.asarray(z)[:len(part)])
        masks.append(np.asarray(mask)[:len(part)])
      zs, masks = np.concatenate(zs), np.concatenate(masks)
      first = 0
      for i, (path, im, x, offs) in enumerate(zip(chunk, originals, scaled, windows)):
        h, w = im.shape[:2]
        k = len(offs)
        z_s, m_s = assemble(zs[first:first + k], masks[first:first + k], offs, x.shape[:2])
        first += k
        z_full = _resize(z_s, (h, w), order=1, anti_aliasing=False)
        m_full = _resize(m_s.astype(np.float32), (h, w), order=0, anti_aliasing=False) > 0.5
        stem = names[start + i]
        mask_path = os.path.join(out_dir, f'{stem}_mask.png')
        heat_path = os.path.join(out_dir, f'{stem}_heatmap.png')
        files.save_png(Image.fromarray(m_full.astype(np.uint8) * 255, 'L'), mask_path)
        files.save_png(Image.fromarray(heatmap_overlay(im, z_full, n_sigma), 'RGB'), heat_path)
        results.append({'path': path, 'mask': mask_path, 'heatmap': heat_path, 'height': h,
                        'width': w, 'max_z': float(z_s.max()),
                        'anomalous_fraction': float(m_full.mean()),
                        'scored_at': {'height': int(x.shape[0]), 'width': int(x.shape[1]),
                                      'windows': k, 'geometry': geometry}})
      bar.update(len(chunk))
  finally:
    bar.close()
  files.atomic_write_json(os.path.join(out_dir, 'predictions.json'),
                          {'workdir': workdir, 'n_sigma': n_sigma, 'images': results})
  return results


_FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'run directory (trained and evaluated)', flag_values=_FLAGS)
flags.DEFINE_string('images', None, "glob (quoted, e.g. 'dir/*.jpg') or folder", flag_values=_FLAGS)
flags.DEFINE_string('out', None, 'output folder', flag_values=_FLAGS)
flags.DEFINE_integer('batch_size', 16, 'images per batch', flag_values=_FLAGS)
flags.DEFINE_string('method', None, 'check that WORKDIR holds this method (sano, ae, vae, cevae, '
                    "vqvae, anovaegan, anoddpm; default: whatever its config.json says)",
                    flag_values=_FLAGS)
flags.mark_flags_as_required(['workdir', 'images', 'out'], flag_values=_FLAGS)


def main(argv: Sequence[str]) -> int:
  """Anomaly masks and heatmaps for image files with a trained run (flags: module docstring)."""
  cli.parse_args(_FLAGS, argv, 'python -m sano_jax.predict')
  args = _FLAGS
  try:
    results = predict(args.workdir, args.images, args.out, batch_size=args.batch_size,
                      method=args.method)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote masks and heatmaps of {len(results)} image(s) to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
