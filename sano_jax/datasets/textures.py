"""``sano_textures``: the embedded dataset, built offline from CC0 images inside scikit-image's wheel.

A texture (``brick``, ``grass``, ``gravel``: 512x512 grayscale; ``retina``: an RGB fundus photo;
``hubble``: the RGB Hubble eXtreme Deep Field, sparse galaxies on a dark sky) is rescaled with
anti-aliasing (``scale``, a config field) and cut into three DISJOINT vertical bands: the left half
gives the ``train`` crops, the next quarter the ``validation`` crops, the last quarter the ``test``
crops. Train and validation crops lie on a regular grid (overlapping, stride chosen so
that there are at most ``max_train`` / ``max_validation`` of them); test crops sit at seeded random
positions of the test band. Most test crops get one patch of real image content (``camera``,
``coins``, ``text``, ``moon``, ``page``, ``clock``, ``coffee``, ``astronaut``, ``chelsea``,
``rocket``, ``immunohistochemistry``, all shipped inside the wheel) pasted in as a rectangle or an
ellipse of side S/4..S/2, its intensities matched to the crop's own mean and spread (so an
intensity threshold does not find it: the structure does); the mask is exactly the pasted region.
The rest of the test crops are healthy (zero mask).

Two per-image group attributes (``config.eval.group_by``, per-group metrics): ``anomaly_source``,
the wheel image the pasted content was cut from (``camera``, ..., ``none`` for a healthy crop), and
``anomaly_size``, the pasted area as a share of the crop in three buckets of about a third of the
anomalies each: ``04-10%``, ``10-14%``, ``14-25%`` (``none`` for a healthy crop). Train and
validation crops have ``none`` for both.

Subjects are cells of min(16, S/2) pixels (at least 8) of the source image (by crop centre) prefixed by the band,
so that several crops share a subject (bootstrap by subject) and train and validation subjects are
disjoint by construction. Names: ``{split}_{index}_y{Y}_x{X}_{anom|ok}`` with (Y, X) the crop's
top-left corner in the rescaled texture (see :func:`load_texture`).

Configs: ``{texture}_{S}`` for texture in brick, grass, gravel (C=1), retina and hubble (C=3), S in
16, 32, 64 (e.g. ``sano_textures/brick_32``). Grayscale textures are stored with C=1.

``hubble`` is HELD OUT: it was added after the label-free calibration (sano_jax/calibration.py) and
its candidate set were designed on the other four, and nothing may be tuned on it; it is the check
that the calibration holds on data nobody looked at.

Everything is deterministic (seeded by the config); a build takes seconds.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from sano_jax.datasets.base import ArrayRecordBuilder

from sano_jax.datasets.splits import hide_gpus_from_tf

TEXTURES = ('brick', 'grass', 'gravel', 'retina', 'hubble')
RGB_TEXTURES = ('retina', 'hubble')
HELD_OUT = ('hubble',)  # see the module docstring: never tune on these
_SKIMAGE_NAMES = {'hubble': 'hubble_deep_field'}  # texture -> skimage.data function
CROP_SIZES = (16, 32, 64)
GRAY_SOURCES = ('camera', 'coins', 'text', 'moon', 'page', 'clock')
RGB_SOURCES = ('coffee', 'astronaut', 'chelsea', 'rocket', 'immunohistochemistry')
BANDS = {'train': (0.0, 0.5), 'validation': (0.5, 0.75), 'test': (0.75, 1.0)}
_PYRAMID = (0.5, 0.25, 0.125)  # rescale factors of each anomaly source image
# anomaly_size buckets: (upper bound of the pasted area / crop area, name); ~terciles at S=16, 32.
SIZE_BUCKETS = ((0.10, '04-10%'), (0.14, '10-14%'), (1.0, '14-25%'))
NONE = 'none'  # the group attributes of a healthy crop


@dataclasses.dataclass(eq=False)
class TexturesConfig(tfds.core.BuilderConfig):
  """One texture at one crop size. All fields take part in the (deterministic) generation."""
  texture: str = 'brick'
  crop_size: int = 32
  scale: float = 0.5  # rescale factor of the texture (anti-aliased) before cropping
  seed: int = 0
  max_train: int = 4000
  max_validation: int = 500
  num_test: int = 300
  healthy_test_fraction: float = 0.2
  match_intensity: bool = True  # pasted content takes the crop's mean and (jittered) std


def _default_scale(texture: str) -> float:
  # Retina: the inscribed square of the 1411 px fundus field is ~920 px; x0.25 -> ~230 px, the
  # size of the other textures at x0.5 (256 px). Hubble: 872x1000 -> 218x250 at x0.25.
  return 0.25 if texture in RGB_TEXTURES else 0.5


def _make_configs():
  return [
      TexturesConfig(
          name=f'{texture}_{size}', texture=texture, crop_size=size,
          scale=_default_scale(texture),
          description=f'{texture} texture, {size}x{size} crops, scale {_default_scale(texture)}.')
      for texture in TEXTURES for size in CROP_SIZES
  ]


def num_channels(texture: str) -> int:
  return 3 if texture in RGB_TEXTURES else 1


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _rescale(img: np.ndarray, scale: float) -> np.ndarray:
  """uint8 [H,W,C] -> uint8, anti-aliased."""
  from skimage import transform  # pylint: disable=g-import-not-at-top
  if scale == 1.0:
    return img
  out = transform.rescale(img.astype(np.float64) / 255.0, scale, anti_aliasing=True,
                          channel_axis=-1, order=1, mode='reflect')
  return _to_uint8(out)


def _retina_field(img: np.ndarray) -> np.ndarray:
  """The largest axis-aligned square inside the circular field of view of the fundus photo."""
  inside = img.astype(np.int32).sum(-1) > 60
  ys, xs = np.nonzero(inside)
  cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
  radius = min(ys.max() - ys.min(), xs.max() - xs.min()) / 2
  half = int(0.95 * radius / np.sqrt(2))
  cy, cx = int(round(cy)), int(round(cx))
  return img[cy - half:cy + half, cx - half:cx + half]


@functools.lru_cache(maxsize=None)
def _raw_texture(texture: str) -> np.ndarray:
  from skimage import data  # pylint: disable=g-import-not-at-top
  if texture not in TEXTURES:
    raise ValueError(f'Unknown texture {texture!r}; expected one of {TEXTURES}.')
  img = getattr(data, _SKIMAGE_NAMES.get(texture, texture))()
  if img.ndim == 2:
    img = img[..., None]
  if texture == 'retina':
    img = _retina_field(img)
  return np.ascontiguousarray(img)


@functools.lru_cache(maxsize=None)
def load_texture(texture: str, scale: float) -> np.ndarray:
  """The rescaled texture, uint8 [H, W, C]: the image all crops are cut from."""
  return _rescale(_raw_texture(texture), scale)


@functools.lru_cache(maxsize=None)
def _anomaly_sources(channels: int) -> tuple[np.ndarray, ...]:
  """Pyramids of real image content, float32 [h, w, C] in [0, 255], several scales per image:
  entry i is image (GRAY_SOURCES + RGB_SOURCES)[i // len(_PYRAMID)] at scale
  _PYRAMID[i % len(_PYRAMID)]."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  out = []
  for name in GRAY_SOURCES + RGB_SOURCES:
    img = getattr(data, name)()
    if img.ndim == 3 and img.shape[-1] == 4:
      img = img[..., :3]
    if img.ndim == 2:
      img = img[..., None]
    img = img.astype(np.float64)
    if channels == 1 and img.shape[-1] == 3:
      img = (img @ np.array([0.2125, 0.7154, 0.0721]))[..., None]
    elif channels == 3 and img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    for factor in _PYRAMID:
      out.append(_rescale(_to_uint8(img / 255.0), factor).astype(np.float32))
  return tuple(out)


def _shape_mask(h: int, w: int, kind: str) -> np.ndarray:
  if kind == 'rectangle':
    return np.ones((h, w), bool)
  yy, xx = np.mgrid[:h, :w]
  ry, rx = h / 2.0, w / 2.0
  return ((yy + 0.5 - ry) / ry) ** 2 + ((xx + 0.5 - rx) / rx) ** 2 <= 1.0


def size_bucket(mask: np.ndarray) -> str:
  """The `anomaly_size` of a mask: the SIZE_BUCKETS name of its anomalous share of the pixels
  (``none`` when the mask is empty)."""
  share = float(np.mean(np.asarray(mask) > 0))
  if share == 0.0:
    return NONE
  return next(name for upper, name in SIZE_BUCKETS if share < upper or upper == 1.0)


def _paste(crop: np.ndarray, rng: np.random.Generator,
           match_intensity: bool) -> tuple[np.ndarray, np.ndarray, str]:
  """Pastes a patch of real content into `crop` (uint8 [S,S,C]): (image, mask [S,S,1], the name of
  the source image the patch was cut from)."""
  size, channels = crop.shape[0], crop.shape[-1]
  sources = _anomaly_sources(channels)
  lo, hi = max(3, size // 4), max(4, size // 2)
  h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
  for _ in range(50):
    which = int(rng.integers(len(sources)))
    src = sources[which]
    if src.shape[0] < h or src.shape[1] < w:
      continue
    y0 = int(rng.integers(src.shape[0] - h + 1))
    x0 = int(rng.integers(src.shape[1] - w + 1))
    patch = src[y0:y0 + h, x0:x0 + w]
    if patch.std() >= 12.0:  # some structure, not a flat area of the source
      break
  kind = 'rectangle' if rng.random() < 0.5 else 'ellipse'
  shape = _shape_mask(h, w, kind)
  crop_f = crop.astype(np.float32)
  if match_intensity:
    mean = crop_f.mean(axis=(0, 1))
    std = crop_f.std(axis=(0, 1)) + 1.0
    p_mean = patch.mean(axis=(0, 1))
    p_std = patch.std(axis=(0, 1)) + 1e-3
    gain = rng.uniform(0.75, 1.5)
    shift = rng.uniform(-0.5, 0.5)
    patch = (patch - p_mean) / p_std * (std * gain) + mean + shift * std
  patch = np.clip(np.round(patch), 0, 255).astype(np.uint8)
  py = int(rng.integers(size - h + 1))
  px = int(rng.integers(size - w + 1))
  image = crop.copy()
  mask = np.zeros((size, size, 1), np.uint8)
  region = image[py:py + h, px:px + w]
  region[shape] = patch[shape]
  mask[py:py + h, px:px + w, 0] = shape
  return image, mask, (GRAY_SOURCES + RGB_SOURCES)[which // len(_PYRAMID)]


def _grid(lo: int, hi: int, size: int, stride: int) -> list[int]:
  return list(range(lo, hi - size + 1, stride))


def _band(config: TexturesConfig, split: str, width: int) -> tuple[int, int]:
  a, b = BANDS[split]
  x0, x1 = int(round(a * width)), int(round(b * width))
  if x1 - x0 < config.crop_size:
    raise ValueError(
        f'sano_textures/{config.name}: the {split} band is {x1 - x0} px wide, less than the crop '
        f'size {config.crop_size}; raise `scale` (now {config.scale}).')
  return x0, x1


def _subject(split: str, y: int, x: int, size: int) -> str:
  cell = max(8, min(16, size // 2))
  return f'{split}/r{(y + size // 2) // cell:02d}c{(x + size // 2) // cell:02d}'


def _seed(config: TexturesConfig, split: str) -> list[int]:
  digest = hashlib.sha256(f'{config.texture}/{config.crop_size}/{split}'.encode()).digest()
  return [config.seed, int.from_bytes(digest[:4], 'little')]


def make_split(config: TexturesConfig, split: str) -> list[dict]:
  """All examples of `split` (numpy, the data contract), deterministically."""
  tex = load_texture(config.texture, config.scale)
  height, width = tex.shape[:2]
  size = config.crop_size
  x0, x1 = _band(config, split, width)
  examples = []
  if split in ('train', 'validation'):
    limit = config.max_train if split == 'train' else config.max_validation
    stride = 1
    while True:
      ys, xs = _grid(0, height, size, stride), _grid(x0, x1, size, stride)
      if len(ys) * len(xs) <= limit:
        break
      stride += 1
    zero = np.zeros((size, size, 1), np.uint8)
    for y in ys:
      for x in xs:
        i = len(examples)
        examples.append(dict(image=tex[y:y + size, x:x + size], mask=zero,
                             subject=_subject(split, y, x, size),
                             name=f'{split}_{i:05d}_y{y}_x{x}_ok',
                             anomaly_source=NONE, anomaly_size=NONE))
    return examples
  if split != 'test':
    raise ValueError(f'Unknown split {split!r}.')
  rng = np.random.default_rng(_seed(config, split))
  num_healthy = int(round(config.healthy_test_fraction * config.num_test))
  healthy = np.zeros(config.num_test, bool)
  healthy[rng.permutation(config.num_test)[:num_healthy]] = True
  for i in range(config.num_test):
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(x0, x1 - size + 1))
    crop = tex[y:y + size, x:x + size]
    if healthy[i]:
      image, mask, tag = crop, np.zeros((size, size, 1), np.uint8), 'ok'
      source = NONE
    else:
      image, mask, source = _paste(crop, rng, config.match_intensity)
      tag = 'anom'
    examples.append(dict(image=image, mask=mask, subject=_subject(split, y, x, size),
                         name=f'{split}_{i:05d}_y{y}_x{x}_{tag}',
                         anomaly_source=source, anomaly_size=size_bucket(mask)))
  return examples


class SanoTextures(ArrayRecordBuilder):
  """Crops of real CC0 textures with real content pasted in as anomalies (exact masks)."""

  name = 'sano_textures'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Group attributes anomaly_source and anomaly_size (same images and masks).',
  }
  BUILDER_CONFIGS = _make_configs()
  DEFAULT_BUILDER_CONFIG_NAME = 'brick_32'


  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size, c = cfg.crop_size, num_channels(cfg.texture)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, c)),
            'mask': tfds.features.Image(shape=(size, size, 1)),
            'subject': tfds.features.Text(),
            'name': tfds.features.Text(),
            'anomaly_source': tfds.features.Text(),
            'anomaly_size': tfds.features.Text(),
        }),
        homepage='https://scikit-image.org/docs/stable/api/skimage.data.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything ships inside scikit-image's wheel.
    hide_gpus_from_tf()
    return {split: self._generate_examples(split) for split in ('train', 'validation', 'test')}

  def _generate_examples(self, split):
    for ex in make_split(self.builder_config, split):
      yield ex['name'], ex
