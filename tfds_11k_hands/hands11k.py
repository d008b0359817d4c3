"""11k Hands (Afifi, 2019) with the jewelry segmentation masks of SANO (Gonzalez-Jimenez et al., 2022).

Examples follow the sano-jax data contract, plus the HandInfo.csv metadata:
``{image: uint8 [S,S,3], mask: uint8 [S,S,1] (1 = jewelry), subject: str (7-digit id),
name: str (Hand_XXXXXXX.jpg), age, gender, skin_color, accessories, nail_polish, aspect_of_hand,
irregularities}``.

Images (1600x1200) are resized to a SQUARE S x S (stretched, no crop, as in the paper's 256x256)
with anti-aliasing (JPEG draft decoding to >= S, then Lanczos); masks, of any size with the image's
aspect ratio, are binarized (nonzero = jewelry; with alpha, transparent = healthy) and resized with
nearest neighbour. A mask must hold 0 and ONE nonzero value (``sano_jax.datasets.images.
mask_to_binary``): a JPEG-compressed or anti-aliased mask is an error naming it. Each image has one
row in HandInfo.csv (an imageName listed twice is an error naming both lines).

Splits (all deterministic; subjects ordered by the sha256 of their id):
* ``test``: every image that has a jewelry mask.
* healthy images: ``accessories == 0`` and no mask. Their subjects are split three ways:
  ``test_healthy`` takes subjects holding about ``test_healthy_fraction`` (default 10%) of the
  healthy images; of the rest, ``validation`` takes subjects holding about
  ``validation_fraction`` (20%) of the images and ``train`` the others (the paper: 6146 / 1536,
  no subject overlap). train, validation and test_healthy are subject-disjoint.
* images with ``accessories == 1`` and no mask are left out (counted in a log line).

Config names are the image size: ``hands11k/256`` (default), ``/128``, ``/64``, ``/32``, ``/16``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import zipfile
import zlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from sano_jax.datasets import images as images_lib
from sano_jax.datasets.base import ArrayRecordBuilder
from sano_jax.datasets.splits import hide_gpus_from_tf
from sano_jax.datasets.splits import split_subjects

_CSV = 'HandInfo.csv'
_COLUMNS = ('id', 'age', 'gender', 'skinColor', 'accessories', 'nailPolish', 'aspectOfHand',
            'imageName', 'irregularities')
_SIZES = (256, 128, 64, 32, 16)
_MASK_EXTENSIONS = ('.png',)

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download 11k Hands (https://sites.google.com/view/11khands): `Hands.zip` and `HandInfo.csv`, and
the jewelry masks of SANO (Gonzalez-Jimenez et al., 2022). Put them in the manual dir
(`--config.data.manual_dir=DIR`, or `tfds build --manual_dir=DIR`) as:

  DIR/HandInfo.csv          columns id, age, gender, skinColor, accessories, nailPolish,
                            aspectOfHand, imageName, irregularities
  DIR/Hands.zip             the images Hand_XXXXXXX.jpg (any folder inside the zip)
    or DIR/Hands/           the same images unzipped
  DIR/masks.zip             one binary PNG per annotated image, named after the image stem
    or DIR/masks/           (Hand_0000002.png for Hand_0000002.jpg), any size with the image's
                            aspect ratio; nonzero pixels = jewelry

Images listed in HandInfo.csv must all be present, each on one row; masks must decode and be
binary (0 and one nonzero value; with alpha, transparent pixels are healthy).
"""


@dataclasses.dataclass(eq=False)
class Hands11kConfig(tfds.core.BuilderConfig):
  image_size: int = 256
  test_healthy_fraction: float = 0.1
  validation_fraction: float = 0.2


def _stem(name: str) -> str:
  return name.rsplit('/', 1)[-1].rsplit('.', 1)[0]


class _Files:
  """Files by base name from a folder or a zip (any folder inside the zip)."""

  def __init__(self, root: epath.Path, folder: str, zip_name: str, what: str):
    self.zip_path = root / zip_name
    self.dir_path = root / folder
    self._zip = None
    if self.dir_path.is_dir():
      self.location = self.dir_path
      self.names = {p.name: p for p in self.dir_path.iterdir()}
    elif self.zip_path.exists():
      self.location = self.zip_path
      try:
        with self.zip_path.open('rb') as f, zipfile.ZipFile(f) as zf:
          members = [m for m in zf.namelist() if not m.endswith('/')]
      except zipfile.BadZipFile as e:
        raise ValueError(f'{self.zip_path} is not a valid zip file: {e}') from e
      self.names = {m.rsplit('/', 1)[-1]: m for m in members
                    if not m.rsplit('/', 1)[-1].startswith('.') and '__MACOSX' not in m}
    else:
      raise FileNotFoundError(
          f'Neither {self.dir_path}/ nor {self.zip_path} exists ({what}).\n'
          + _MANUAL_DOWNLOAD_INSTRUCTIONS)

  def describe(self, name: str) -> str:
    return f'{self.location}/{name}' if self.location == self.dir_path else (
        f'{self.zip_path}:{self.names.get(name, name)}')

  def read(self, name: str) -> bytes:
    entry = self.names[name]
    if isinstance(entry, epath.Path):
      return entry.read_bytes()
    try:
      if self._zip is None:
        self._zip = zipfile.ZipFile(self.zip_path.open('rb'))
      return self._zip.read(entry)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:  # bad CRC, cut-off member
      raise ValueError(f'Cannot read {self.describe(name)}: the zip file is damaged ({e}). '
                       f'Download {self.zip_path.name} again.') from e


def _decode(data: bytes, where: str, draft_size: int | None = None):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    img = Image.open(io.BytesIO(data))
    if draft_size:
      img.draft('RGB', (draft_size, draft_size))
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot decode {where}: {e}') from e
  return img


class Hands11k(ArrayRecordBuilder):
  """11k Hands with jewelry masks: healthy train/validation, jewelry test (SANO)."""

  name = 'hands11k'
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Masks with alpha: transparent = healthy; non-binary masks and duplicate image '
               'names in HandInfo.csv are errors.',
      '1.2.0': 'Subject split: a subject that overshoots is skipped, not the end of the walk.',
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      Hands11kConfig(name=str(s), image_size=s, description=f'Images resized to {s}x{s}.')
      for s in _SIZES
  ]
  DEFAULT_BUILDER_CONFIG_NAME = '256'


  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, 3)),
            'mask': tfds.features.Image(shape=(s, s, 1)),
            'subject': tfds.features.Text(),
            'name': tfds.features.Text(),
            'age': np.int32,
            'gender': tfds.features.Text(),
            'skin_color': tfds.features.Text(),
            'accessories': np.int32,
            'nail_polish': np.int32,
            'aspect_of_hand': tfds.features.Text(),
            'irregularities': np.int32,
        }),
        homepage='https://sites.google.com/view/11khands',
        citation=('@article{afifi201911kHands, title={11K Hands: gender recognition and biometric '
                  'identification using a large dataset of hand images}, author={Afifi, Mahmoud}, '
                  'journal={Multimedia Tools and Applications}, year={2019}}'),
    )

  def _read_csv(self, root: epath.Path) -> list[dict]:
    path = root / _CSV
    if not path.exists():
      raise FileNotFoundError(f'Missing {path}.\n' + _MANUAL_DOWNLOAD_INSTRUCTIONS)
    reader = csv.DictReader(io.StringIO(path.read_text(encoding='utf-8-sig')))
    have = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in _COLUMNS if c not in have]
    if missing:
      raise ValueError(f'{path} lacks column(s) {missing}; it has {have}; expected {list(_COLUMNS)}.')
    rows, first_line = [], {}
    for line, raw in enumerate(reader, start=2):
      row = {k.strip(): (v or '').strip() for k, v in raw.items() if k is not None}
      try:
        rows.append({
            'subject': row['id'].zfill(7),
            'name': row['imageName'],
            'age': int(float(row['age'])),
            'gender': row['gender'],
            'skin_color': row['skinColor'],
            'accessories': int(float(row['accessories'])),
            'nail_polish': int(float(row['nailPolish'])),
            'aspect_of_hand': row['aspectOfHand'],
            'irregularities': int(float(row['irregularities'])),
        })
      except ValueError as e:
        raise ValueError(f'{path}, line {line}: bad value ({e}): {row}') from e
      if not row['id'] or not row['imageName']:
        raise ValueError(f'{path}, line {line}: empty id or imageName: {row}')
      if row['imageName'] in first_line:
        raise ValueError(
            f'{path}, line {line}: imageName {row["imageName"]} is listed twice (also on line '
            f'{first_line[row["imageName"]]}); each image must have one row. (Repeated ids are '
            'fine: id is the subject, who has many images.)')
      first_line[row['imageName']] = line
    return rows

  def _split_generators(self, dl_manager):
    hide_gpus_from_tf()  # TF only writes here; keep it off the accelerators.
    root = epath.Path(dl_manager.manual_dir)
    rows = self._read_csv(root)
    images = _Files(root, 'Hands', 'Hands.zip', 'the 11k Hands images')
    masks_files = _Files(root, 'masks', 'masks.zip', 'the jewelry masks')
    masks = {_stem(n): n for n in masks_files.names
             if n.lower().endswith(_MASK_EXTENSIONS)}
    if len(masks) < len(masks_files.names):
      logging.warning('hands11k: %d file(s) in %s are not PNG masks and are ignored.',
                      len(masks_files.names) - len(masks), masks_files.location)
    for row in rows:
      if row['name'] not in images.names:
        raise FileNotFoundError(
            f'{row["name"]} is listed in {root / _CSV} but absent from {images.location}.')
    listed = {_stem(r['name']) for r in rows}
    orphans = sorted(set(masks) - listed)
    if orphans:
      logging.warning('hands11k: %d mask(s) have no row in %s and are ignored, e.g. %s',
                      len(orphans), _CSV, orphans[:3])
    test = [r for r in rows if _stem(r['name']) in masks]
    healthy = [r for r in rows if r['accessories'] == 0 and _stem(r['name']) not in masks]
    skipped = [r for r in rows if r['accessories'] != 0 and _stem(r['name']) not in masks]
    if not test:
      raise ValueError(f'No jewelry mask matches an image of {_CSV} in {masks_files.location}; '
                       'masks are named after the image stem, e.g. Hand_0000002.png.')
    cfg = self.builder_config
    counts: dict[str, int] = {}
    for r in healthy:
      counts[r['subject']] = counts.get(r['subject'], 0) + 1
    rest, held = split_subjects(counts, cfg.test_healthy_fraction)
    train_s, val_s = split_subjects({s: counts[s] for s in rest}, cfg.validation_fraction)
    splits = {
        'train': [r for r in healthy if r['subject'] in train_s],
        'validation': [r for r in healthy if r['subject'] in val_s],
        'test': test,
        'test_healthy': [r for r in healthy if r['subject'] in held],
    }
    logging.info(
        'hands11k: %d rows; %d healthy, %d with masks (test), %d with accessories and no mask '
        'left out; splits %s; subjects train/validation/test_healthy %d/%d/%d.',
        len(rows), len(healthy), len(test), len(skipped), {k: len(v) for k, v in splits.items()},
        len(train_s), len(val_s), len(held))
    return {k: self._generate_examples(v, images, masks_files, masks) for k, v in splits.items()}

  def _generate_examples(self, rows, images: _Files, masks_files: _Files, masks: dict):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    size = self.builder_config.image_size
    for row in rows:
      where = images.describe(row['name'])
      img = _decode(images.read(row['name']), f'image {where}', draft_size=size)
      full_wh = img.size  # JPEG draft decoding keeps the aspect ratio, all the mask check uses
      img = img.convert('RGB')
      if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
      image = np.asarray(img, np.uint8)
      mask = np.zeros((size, size, 1), np.uint8)
      stem = _stem(row['name'])
      if stem in masks:
        mwhere = masks_files.describe(masks[stem])
        m = _decode(masks_files.read(masks[stem]), f'mask {mwhere}')
        (w, h), (iw, ih) = m.size, full_wh
        if abs(w / h - iw / ih) > 0.01 * (iw / ih):
          raise ValueError(f'Mask {mwhere} is {w}x{h} (aspect {w / h:.3f}) but its image {where} '
                           f'is {iw}x{ih} (aspect {iw / ih:.3f}).')
        arr = images_lib.mask_to_binary(m, mwhere)
        binary = Image.fromarray(arr.astype(np.uint8) * 255)
        binary = binary.resize((size, size), Image.NEAREST)
        mask = (np.asarray(binary) > 0).astype(np.uint8)[..., None]
      yield row['name'], {**row, 'image': image, 'mask': mask}
