r"""Localize anomalies in your own image files with a trained, calibrated SANO run.

  python -m sano_jax.predict --workdir=workdirs/demo --images='photos/*.jpg' --out=predictions

Each image (any size; any format Pillow reads; gray, RGB, RGBA, palette or 16-bit) is converted to
the model's channel count; its central square (side = the short side, as the dataset builders
keep it: no stretching) is resized (anti-aliased) to the model's size, localized with
`load_localizer(workdir)` in batches, and its z-map resized back into that square (bilinear), its
mask with nearest neighbour; outside the square (non-square images) z = 0 and nothing is flagged.
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

from sano_jax import files

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
  from sano_jax.datasets import images as images_lib  # pylint: disable=g-import-not-at-top
  if channels not in (1, 3):
    raise ValueError(f'the model has {channels} channels; predict supports 1 (gray) or 3 (RGB)')
  try:
    im = images_lib.open_image(path, repr(path))
  except ValueError as e:
    raise ValueError(f'cannot read {path!r} as an image: {e.__cause__ or e}') from e
  try:
    im = images_lib.flatten_alpha(images_lib.to_8bit(im, repr(path)))
    im = im.convert('L' if channels == 1 else 'RGB')
    arr = np.asarray(im, np.float32) / 255.0
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
  from sano_jax import rundir
  from sano_jax.datasets.images import center_square  # pylint: disable=g-import-not-at-top

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
  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=len(paths), unit='img', disable=not progress, dynamic_ncols=True)
  try:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      originals = [read_image(p, channels) for p in chunk]
      batch = np.zeros((batch_size, size, size, channels), np.float32)  # fixed shape: one compile
      boxes = [center_square(im.shape[1], im.shape[0]) for im in originals]
      for i, (im, (left, top, side)) in enumerate(zip(originals, boxes)):
        square = im[top:top + side, left:left + side]
        batch[i] = np.clip(_resize(square, (size, size), order=1, anti_aliasing=True), 0.0, 1.0)
      z, mask = localizer(batch)
      z, mask = np.asarray(z)[:len(chunk)], np.asarray(mask)[:len(chunk)]
      for i, (path, im, (left, top, side)) in enumerate(zip(chunk, originals, boxes)):
        h, w = im.shape[:2]
        z_full, m_full = np.zeros((h, w), np.float32), np.zeros((h, w), bool)
        box = (slice(top, top + side), slice(left, left + side))
        z_full[box] = _resize(z[i], (side, side), order=1, anti_aliasing=False)
        m_full[box] = _resize(mask[i].astype(np.float32), (side, side), order=0,
                              anti_aliasing=False) > 0.5
        stem = names[start + i]
        mask_path = os.path.join(out_dir, f'{stem}_mask.png')
        heat_path = os.path.join(out_dir, f'{stem}_heatmap.png')
        files.save_png(Image.fromarray(m_full.astype(np.uint8) * 255, 'L'), mask_path)
        files.save_png(Image.fromarray(heatmap_overlay(im, z_full, n_sigma), 'RGB'), heat_path)
        results.append({'path': path, 'mask': mask_path, 'heatmap': heat_path, 'height': h,
                        'width': w, 'max_z': float(z[i].max()),
                        'anomalous_fraction': float(m_full.mean()),
                        'scored_box': {'top': top, 'left': left, 'height': side, 'width': side}})
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
  from sano_jax import cli  # pylint: disable=g-import-not-at-top
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
