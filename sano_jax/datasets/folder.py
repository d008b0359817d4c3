"""``sano_folder``: the user's own images as a dataset of the data contract.

Inputs (``configs/folder.py``: ``--config.data.normal_dir=... --config.data.test_dir=...
--config.data.mask_dir=... [--config.data.subjects_csv=...]``):

* ``normal_dir``: healthy images (any format Pillow reads: png, jpg, bmp, tif, webp, ...; top
  level of the folder only). They make ``train`` and ``validation``, split by subject,
  deterministically (subjects ordered by a hash of their id; about ``validation_fraction`` of
  the images go to validation, at least one subject each).
* ``test_dir`` (optional): test images, anomalous or not; ``mask_dir``: one mask per test image with
  the same file stem, any format and size with the image's aspect ratio (nonzero = anomalous).
  The MVTec AD layout works too: ``test_dir/<type>/NAME`` with masks ``mask_dir/<type>/STEM`` or
  ``STEM_mask`` (``--config.data.test_dir=X/test --config.data.mask_dir=X/ground_truth``); images in
  ``test_dir/good/`` need no mask. Such an image is named ``<type>/NAME``, its subject
  ``<type>/STEM``.
* ``subjects_csv`` (optional): columns ``name,subject``; ``name`` is a file name or stem. Without
  it (or for files it does not list), the subject is the file stem.

Folders and the CSV may be local paths or gs:// URIs (read through ``sano_jax.files``).

Images keep their aspect ratio: the central square (side = the short side) is cut and resized to
``image_size`` x ``image_size`` with anti-aliasing (Lanczos), masks the same way with nearest
neighbour; ``predict`` scores the same square. Training may then draw smaller random crops of it
(``config.data.crop_size``). Files are decoded as ``sano_jax.predict`` decodes them
(``sano_jax/datasets/images.py``): EXIF orientation applied, 16-bit scaled by 1/65535, float by its
range, alpha composited over white. ``num_channels`` 3 reads RGB (and CMYK); 1 reads grayscale; an
image with the other number of channels is an error naming it. A mask must hold 0 and at most one
nonzero value (a JPEG-compressed or anti-aliased mask is an error naming it).

The builder config carries the folders and the size; its name is a fingerprint of them and of the
listing (names, sizes, modification times) so a changed folder is rebuilt into a new directory:
``{data_dir}/sano_folder/{size}px_{C}c_{fingerprint}/``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os

from etils.epath import Path
import numpy as np
import tensorflow_datasets as tfds

from sano_jax import files
from sano_jax.datasets import images as images_lib
from sano_jax.datasets.base import ArrayRecordBuilder

from sano_jax.datasets.splits import hide_gpus_from_tf
from sano_jax.datasets.splits import split_subjects

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.gif', '.webp', '.ppm',
                    '.pgm')


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  normal_dir: str = ''
  test_dir: str = ''
  mask_dir: str = ''
  subjects_csv: str = ''
  image_size: int = 256
  num_channels: int = 3
  validation_fraction: float = 0.2
  mask_threshold: float | None = None


def list_images(folder: str | os.PathLike, *, folders_expected: bool = False) -> list[Path]:
  """The image files at the top level of `folder`, sorted. Other entries (files of other types,
  subfolders unless `folders_expected`) are skipped with a warning that lists them; hidden files
  (a leading dot) silently."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f'Image folder {folder} does not exist or is not a directory.')
  images, skipped = [], []
  for p in folder.iterdir():
    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
      images.append(p)
    elif not p.name.startswith('.') and not (folders_expected and p.is_dir()):
      skipped.append(p.name + ('/' if p.is_dir() else ''))
  if skipped:
    shown = ', '.join(sorted(skipped)[:10]) + (', ...' if len(skipped) > 10 else '')
    logging.warning('%s: skipped %d entr%s that %s not an image file (%s) at the top level: %s',
                    folder, len(skipped), 'y' if len(skipped) == 1 else 'ies',
                    'is' if len(skipped) == 1 else 'are', ' '.join(IMAGE_EXTENSIONS), shown)
  return sorted(images)


def _masks_by_stem(folder: Path) -> dict[str, Path]:
  """stem -> mask file of a folder (a trailing '_mask' dropped, as MVTec AD names them)."""
  masks: dict[str, Path] = {}
  for m in list_images(folder):
    stem = m.stem[:-len('_mask')] if m.stem.endswith('_mask') else m.stem
    if stem in masks:
      raise ValueError(f'Two masks share the stem {stem!r} in {folder}: {masks[stem].name} and '
                       f'{m.name}.')
    masks[stem] = m
  return masks


def list_test_items(test_dir: str, mask_dir: str) -> list[tuple[Path, Path | None, str]]:
  """(image, mask or None = all healthy, name) of every test image: the images of ``test_dir``
  with their masks in ``mask_dir``, or, when ``test_dir`` holds only folders (MVTec AD), the images
  of ``test_dir/<type>/`` with masks in ``mask_dir/<type>/``, named ``<type>/NAME`` (``good/``
  needs no mask). FileNotFoundError naming the image whose mask is missing."""
  test, masks = Path(test_dir), Path(mask_dir)
  flat = list_images(test, folders_expected=True)
  groups = [(flat, masks, '')] if flat else [
      (list_images(sub), masks / sub.name, sub.name + '/')
      for sub in sorted(p for p in test.iterdir() if p.is_dir())]
  items = []
  for images, mask_folder, prefix in groups:
    by_stem = _masks_by_stem(mask_folder) if mask_folder.is_dir() or not prefix else {}
    for p in images:
      if p.stem not in by_stem and prefix != 'good/':
        raise FileNotFoundError(f'No mask for test image {p}: expected {mask_folder}/'
                                f'{p.stem}.<png|jpg|...> (or {p.stem}_mask.<...>).')
      items.append((p, by_stem.get(p.stem), prefix + p.name))
  if not items:
    raise ValueError(f'test_dir {test_dir} holds no images (nor folders of images).')
  return items


def _fingerprint(parts: dict) -> str:
  listing = {}
  if parts.get('normal_dir'):
    listing['normal_dir'] = [(p.name, *files.stat(p)) for p in list_images(parts['normal_dir'])]
  if parts.get('test_dir'):
    listing['test'] = [(name, *files.stat(p), *(files.stat(m) if m else ()))
                       for p, m, name in list_test_items(parts['test_dir'], parts['mask_dir'])]
  if parts.get('subjects_csv'):
    listing['subjects_csv'] = files.stat(parts['subjects_csv'])
  blob = json.dumps([parts, listing], sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def make_config(*, normal_dir, test_dir=None, mask_dir=None, subjects_csv=None, image_size=256,
                num_channels=3, validation_fraction=0.2, mask_threshold=None,
                root=None) -> FolderConfig:
  """A FolderConfig with absolute paths, named by a fingerprint of inputs and listing.

  root: an MVTec AD category folder; it supplies normal_dir = ROOT/train/good, test_dir =
  ROOT/test and mask_dir = ROOT/ground_truth where those are not given."""
  if root:
    if not files.isdir(os.path.join(root, 'train', 'good')):
      raise FileNotFoundError(f'config.data.root={root} is not an MVTec AD category folder: it has '
                              f'no train/good/ (expected train/good, test/<type>/, '
                              'ground_truth/<type>/).')
    normal_dir = normal_dir or os.path.join(root, 'train', 'good')
    if not test_dir and files.isdir(os.path.join(root, 'test')):
      test_dir = os.path.join(root, 'test')
      mask_dir = mask_dir or os.path.join(root, 'ground_truth')
  if not normal_dir:
    raise ValueError('The folder dataset needs config.data.normal_dir (a folder of healthy images).')
  if test_dir and not mask_dir:
    raise ValueError('config.data.test_dir is set but config.data.mask_dir is not: every test '
                     'image needs a mask with the same file stem.')
  if num_channels not in (1, 3):
    raise ValueError(f'num_channels must be 1 or 3, got {num_channels}.')
  parts = dict(
      normal_dir=files.absolute(normal_dir),
      test_dir=files.absolute(test_dir) if test_dir else '',
      mask_dir=files.absolute(mask_dir) if mask_dir else '',
      subjects_csv=files.absolute(subjects_csv) if subjects_csv else '',
      image_size=int(image_size), num_channels=int(num_channels),
      validation_fraction=float(validation_fraction),
      mask_threshold=None if mask_threshold is None else float(mask_threshold))
  if parts['subjects_csv'] and not files.isfile(parts['subjects_csv']):
    raise FileNotFoundError(f'subjects_csv {parts["subjects_csv"]} does not exist.')
  name = f'{parts["image_size"]}px_{parts["num_channels"]}c_{_fingerprint(parts)}'
  return FolderConfig(name=name, description='User folders: ' + json.dumps(parts), **parts)


def builder_from_config(data, data_dir=None) -> 'SanoFolder':
  """The builder for ``config.data`` (``normal_dir``, ``test_dir``, ``mask_dir``, ...)."""
  cfg = make_config(
      normal_dir=data.get('normal_dir', None), test_dir=data.get('test_dir', None),
      mask_dir=data.get('mask_dir', None), subjects_csv=data.get('subjects_csv', None),
      image_size=data.image_size, num_channels=data.num_channels,
      validation_fraction=data.get('validation_fraction', 0.2),
      mask_threshold=data.get('mask_threshold', None), root=data.get('root', None))
  return SanoFolder(config=cfg, data_dir=data_dir)


def _open(path: Path):
  """Decoded and EXIF-oriented (as predict reads it); ValueError naming the file."""
  return images_lib.open_image(path, str(path))


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
  """uint8 [size, size, channels]: the central square, anti-aliased resize; error naming the file.

  Decoded as ``sano_jax.predict`` decodes (``sano_jax.datasets.images``): EXIF orientation
  applied, 16-bit scaled by 1/65535 and float by its range (not per-image min-max), alpha
  composited over white, CMYK converted to RGB.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = _open(path)
  mode = img.mode
  if mode in ('RGB', 'RGBA', 'RGBa', 'P', 'CMYK', 'YCbCr', 'PA', 'LAB', 'HSV'):
    have = 3
  elif mode in ('L', 'LA', 'La', '1', 'I', 'F') or mode.startswith('I;16'):
    have = 1
  else:
    raise ValueError(f'Image file {path} has unsupported mode {mode!r}.')
  if have != channels:
    raise ValueError(f'Image file {path} has {have} channel(s) (mode {mode}) but the dataset '
                     f'expects {channels} (config.data.num_channels).')
  img = images_lib.flatten_alpha(images_lib.to_8bit(img, f'Image file {path}'))
  img = images_lib.crop_center_square(img.convert('RGB' if have == 3 else 'L'))
  if img.size != (size, size):
    img = img.resize((size, size), Image.LANCZOS, reducing_gap=3.0)
  arr = np.asarray(img, np.uint8)
  return arr.reshape(size, size, channels)


def load_mask(path: Path, size: int, image_wh: tuple[int, int], image_path: Path,
              threshold: float | None = None) -> np.ndarray:
  """uint8 {0,1} [size, size, 1]: nonzero = anomalous; the central square, nearest-neighbour resize.

  ValueError naming the file when the aspect ratio differs from the image's or the mask is not
  binary (see ``sano_jax.datasets.images.mask_to_binary``).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = _open(path)
  w, h = img.size
  iw, ih = image_wh
  if abs(w / h - iw / ih) > 0.01 * (iw / ih):
    raise ValueError(f'Mask file {path} is {w}x{h} (aspect {w / h:.3f}) but its image '
                     f'{image_path} is {iw}x{ih} (aspect {iw / ih:.3f}).')
  arr = images_lib.mask_to_binary(img, str(path), threshold)
  binary = images_lib.crop_center_square(Image.fromarray(arr.astype(np.uint8) * 255))
  binary = binary.resize((size, size), Image.NEAREST)
  return (np.asarray(binary) > 0).astype(np.uint8)[..., None]


def _check_disjoint(normal: list[Path], test: list[Path]) -> None:
  """ValueError naming the first test image whose bytes equal a healthy training image's (a defect
  trained on as healthy, or a test image that tests nothing new)."""
  def digest(p):
    return hashlib.sha256(files.read_bytes(p)).hexdigest()
  by_size: dict[int, list[Path]] = {}
  for p in normal:
    by_size.setdefault(files.stat(p)[0], []).append(p)
  healthy = {}
  for p in test:
    same_size = by_size.get(files.stat(p)[0], [])
    if not same_size:
      continue
    for q in same_size:
      if q not in healthy:
        healthy[q] = digest(q)
    d = digest(p)
    twin = next((q for q in same_size if healthy[q] == d), None)
    if twin is not None:
      raise ValueError(f'Test image {p} is the same file as healthy image {twin} (normal_dir): the '
                       'test and healthy folders must not share images. Remove it from one.')


def _check_subjects_listed(table: dict[str, str], csv_path: str, images: list[Path]) -> None:
  """ValueError listing the subjects_csv names that match no image file (a typo would otherwise
  make each of those images a subject of its own)."""
  names = {p.name for p in images} | {p.stem for p in images}
  unmatched = sorted(n for n in table if n not in names)
  if unmatched:
    shown = ', '.join(unmatched[:10]) + (', ...' if len(unmatched) > 10 else '')
    raise ValueError(f'subjects_csv {csv_path}: {len(unmatched)} name(s) match no image file in '
                     f'the folders: {shown}. Names are file names or stems; fix or remove them.')


def _read_subjects(csv_path: str) -> dict[str, str]:
  """name -> subject; ValueError naming the file on missing columns, empty or conflicting rows."""
  if not csv_path:
    return {}
  text = files.read_bytes(csv_path).decode('utf-8-sig')
  with io.StringIO(text, newline='') as f:
    reader = csv.DictReader(f)
    cols = {c.strip() for c in (reader.fieldnames or ()) if c is not None}
    if not {'name', 'subject'} <= cols:
      raise ValueError(f'subjects_csv {csv_path} needs columns name,subject; it has '
                       f'{sorted(cols)}.')
    table: dict[str, str] = {}
    for line, raw in enumerate(reader, start=2):
      row = {k.strip(): (v or '').strip() for k, v in raw.items() if k is not None}
      name, subject = row['name'], row['subject']
      if not name or not subject:
        raise ValueError(f'subjects_csv {csv_path}, line {line}: empty name or subject: {row}.')
      if name in table and table[name] != subject:
        raise ValueError(f'subjects_csv {csv_path}, line {line}: {name!r} is listed again with '
                         f'subject {subject!r} (earlier: {table[name]!r}).')
      table[name] = subject
    return table


class SanoFolder(ArrayRecordBuilder):
  """A folder of healthy images (+ test images and masks) as a dataset of the data contract."""

  name = 'sano_folder'
  VERSION = tfds.core.Version('1.3.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Decoded as predict decodes: EXIF orientation, 16-bit / float scaled by their '
               'range, alpha over white; non-binary masks are an error.',
      '1.2.0': 'Aspect ratio kept: the central square is resized (no stretching).',
      '1.3.0': 'Subject split: a subject that overshoots is skipped, not the end of the walk; '
               'integer images / 65535 and float images as is, out of range an error (no '
               'per-image scale); the MVTec AD test layout; mask_threshold.',
  }
  BUILDER_CONFIGS = []  # Configs are made per set of folders: see make_config.


  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size, c = cfg.image_size, cfg.num_channels
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, c)),
            'mask': tfds.features.Image(shape=(size, size, 1)),
            'subject': tfds.features.Text(),
            'name': tfds.features.Text(),
        }),
    )

  def _subject_of(self, path: Path, table: dict[str, str]) -> str:
    return table.get(path.name, table.get(path.stem, path.stem))

  def _split_generators(self, dl_manager):
    del dl_manager
    hide_gpus_from_tf()
    cfg = self.builder_config
    table = _read_subjects(cfg.subjects_csv)
    normal = list_images(cfg.normal_dir)
    if not normal:
      raise ValueError(f'normal_dir {cfg.normal_dir} holds no images ({IMAGE_EXTENSIONS}).')
    by_subject: dict[str, list[Path]] = {}
    for p in normal:
      by_subject.setdefault(self._subject_of(p, table), []).append(p)
    if len(by_subject) < 2:
      raise ValueError(f'normal_dir {cfg.normal_dir} has {len(by_subject)} subject(s); train and '
                       'validation are split by subject, so at least 2 are needed.')
    train_s, val_s = split_subjects({s: len(v) for s, v in by_subject.items()},
                                    cfg.validation_fraction)
    splits = {
        'train': [(p, None, p.name) for s in sorted(train_s) for p in by_subject[s]],
        'validation': [(p, None, p.name) for s in sorted(val_s) for p in by_subject[s]],
    }
    if cfg.test_dir:
      splits['test'] = list_test_items(cfg.test_dir, cfg.mask_dir)
      _check_disjoint(normal, [p for p, _, _ in splits['test']])
    _check_subjects_listed(table, cfg.subjects_csv, normal + [p for p, _, _ in
                                                              splits.get('test', [])])
    logging.info('sano_folder: %s', {k: len(v) for k, v in splits.items()})
    return {k: self._generate_examples(v, table) for k, v in splits.items()}

  def _generate_examples(self, items, table):
    cfg = self.builder_config
    size = cfg.image_size
    for path, mask_path, name in items:
      image = load_image(path, size, cfg.num_channels)
      if mask_path is None:
        mask = np.zeros((size, size, 1), np.uint8)
      else:
        mask = load_mask(mask_path, size, _open(path).size, path, cfg.mask_threshold)
      subject = self._subject_of(path, table)
      if name != path.name and path.name not in table and path.stem not in table:
        subject = os.path.splitext(name)[0]  # MVTec AD: '<type>/STEM' (stems repeat across types)
      yield name, {'image': image, 'mask': mask, 'subject': subject, 'name': name}
