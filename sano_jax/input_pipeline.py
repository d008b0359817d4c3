"""Input pipeline: any dataset of the data contract -> batches [local_devices, per_device_batch, ...].

Reading goes through ``tfds`` random-access data sources (array_record files; no TensorFlow needed to
read) and ``grain`` (threads, or worker processes with ``worker_count > 0``). Index arithmetic makes
the order a pure function of (seed, step): global batch i is the same set and order of examples for
any process count, each process takes its contiguous slice of it, and resuming at ``start_step=k``
reads nothing before batch k.

``config.data.dataset`` may name:
  * ``sano_textures/{texture}_{S}`` (embedded; ``sano_textures/{texture}`` takes S from
    ``config.data.image_size``), built on first use into ``config.data.data_dir``;
  * ``folder`` (``config.data.normal_dir``, ``test_dir``, ``mask_dir``, ``subjects_csv``), built on
    first use (see ``sano_jax.datasets.folder``);
  * ``hands11k[/S]``, built from ``config.data.manual_dir`` on first use;
  * any other TFDS dataset of the contract in ``config.data.data_dir``.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Iterator

from absl import logging
import numpy as np

from sano_jax import datasets as datasets_lib

_SPLIT_ALIASES = {'val': 'validation'}


# ---------------------------------------------------------------------------------------------
# Sources.


class ContractSource:
  """Random access to one split: ``source[i]`` -> {image, mask, subject: str, name: str, and each of
  ``attributes`` as str}.

  ``attributes``: the dataset's other per-example scalar features (e.g. hands11k's skin_color,
  aspect_of_hand; the embedded textures' anomaly_source, anomaly_size), read from the TFDS source's
  ``dataset_info``; what ``config.eval.group_by`` may name (``sano_jax.groups``)."""

  CONTRACT_KEYS = ('image', 'mask', 'subject', 'name')

  def __init__(self, tfds_source, *, dataset: str, split: str):
    self._source = tfds_source
    self.dataset = dataset
    self.split = split
    self.attributes = _scalar_features(tfds_source, self.CONTRACT_KEYS)

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, ex) -> dict[str, Any]:
    out = {
        'image': np.asarray(ex['image'], np.uint8),
        'mask': np.asarray(ex['mask'], np.uint8),
        'subject': _to_str(ex['subject']),
        'name': _to_str(ex['name']),
    }
    out.update({k: _to_str(ex[k]) for k in self.attributes})
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {self.dataset}[{self.split}] '
                       f'of {len(self)} examples')
    return self._convert(self._source[index])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    getitems = getattr(self._source, '__getitems__', None)
    records = getitems(indices) if getitems else [self._source[i] for i in indices]
    return [self._convert(r) for r in records]

  def __repr__(self) -> str:
    return f'ContractSource({self.dataset}[{self.split}], {len(self)} examples)'


def _scalar_features(tfds_source, exclude) -> tuple[str, ...]:
  """Names of the scalar (shape ()) features of a TFDS data source beyond `exclude`, sorted."""
  info = getattr(tfds_source, 'dataset_info', None)
  features = getattr(info, 'features', None)
  if features is None:
    return ()
  return tuple(sorted(k for k, f in features.items()
                      if k not in exclude and tuple(getattr(f, 'shape', (None,))) == ()))


def _to_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return _to_str(value.item())
  return str(value)


def _resolve_name(data) -> str:
  name = str(data.dataset)
  base, _, rest = name.partition('/')
  if base == 'sano_textures':
    from sano_jax.datasets import textures  # pylint: disable=g-import-not-at-top
    if not rest:
      rest = f'brick_{data.image_size}'
    elif rest in textures.TEXTURES:  # 'sano_textures/brick': crop size from the config
      rest = f'{rest}_{data.image_size}'
    return f'{base}/{rest}'
  if base == 'hands11k' and not rest:
    return f'hands11k/{data.image_size}'
  return name


def _builder_for(config):
  """The TFDS builder of `config.data.dataset` (built or not)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  datasets_lib.register_builders()
  data = config.data
  data_dir = data.get('data_dir', None)
  name = str(data.dataset)
  if name in ('folder', 'sano_folder'):
    from sano_jax.datasets import folder  # pylint: disable=g-import-not-at-top
    builder = folder.builder_from_config(data, data_dir=data_dir)
  else:
    name = _resolve_name(data)
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'config.data.dataset={data.dataset!r} (resolved to {name!r}) is not a known TFDS '
          f'dataset: {e}') from e
  return builder


def _get_builder(config):
  """The TFDS builder of `config.data.dataset`, prepared (built) if needed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data = config.data
  builder = _builder_for(config)
  name = builder.name + (f'/{builder.builder_config.name}' if builder.builder_config else '')
  if not builder.is_prepared():
    download_config = None
    if builder.name == 'hands11k':
      manual_dir = data.get('manual_dir', None)
      if not manual_dir:
        raise ValueError(
            f'{name} is not prepared in {builder.data_dir} and config.data.manual_dir is not set. '
            'Set --config.data.manual_dir=DIR, DIR holding the 11k Hands files:\n'
            f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    datasets_lib.hide_gpus_from_tf()
    try:
      builder.download_and_prepare(download_config=download_config, file_format='array_record')
    except FileExistsError:
      # Another process (a second host, or a parallel run on the same data_dir) finished the same
      # deterministic build between our check and TFDS's final rename: use its copy, if complete.
      theirs = _builder_for(config)
      if not theirs.is_prepared():
        raise
      logging.info('%s was built by another process meanwhile; using its copy.', name)
      builder = theirs
  return builder


def get_source(config, split: str) -> ContractSource:
  """Random-access source (len, __getitem__ -> contract dict of numpy values) of a split.

  Prepares (builds) the embedded ``sano_textures/*`` and ``folder`` datasets on first use into
  ``config.data.data_dir`` (None -> TFDS default dir); for hands11k uses
  ``config.data.manual_dir``. Validates image size and channels against ``config.data``.
  """
  data = config.data
  split = _SPLIT_ALIASES.get(split, split)
  builder = _get_builder(config)
  desc = f'{builder.name}/{builder.builder_config.name if builder.builder_config else ""}'
  if split not in builder.info.splits:
    raise ValueError(f'{desc} has no split {split!r}; it has {sorted(builder.info.splits)}.')
  features = builder.info.features
  missing = {'image', 'mask', 'subject', 'name'} - set(features.keys())
  if missing:
    raise ValueError(f'{desc} does not follow the data contract: features {sorted(missing)} '
                     'are missing (docs/design.md, the data contract).')
  shape = tuple(features['image'].shape)
  want_hw = (int(data.image_size), int(data.image_size))
  if shape[:2] != want_hw:
    raise ValueError(f'{desc} has images of {shape[0]}x{shape[1]} but config.data.image_size='
                     f'{data.image_size}.')
  if shape[2] != int(data.num_channels):
    raise ValueError(f'{desc} has images with {shape[2]} channel(s) but config.data.num_channels='
                     f'{data.num_channels} (grayscale textures have 1, RGB data 3).')
  source = builder.as_data_source(split=split)
  return ContractSource(source, dataset=desc, split=split)


# ---------------------------------------------------------------------------------------------
# Iterators.


@functools.lru_cache(maxsize=8)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle of the whole split for `epoch` (a pure function of its arguments)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(num_examples)


def _to_model_range(images: np.ndarray, dtype) -> np.ndarray:
  x = images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
  return x.astype(np.dtype(dtype), copy=False)


def _read(source, indices) -> list[dict[str, Any]]:
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    return list(getitems(indices))
  return [source[i] for i in indices]


def crop_offsets(seed: int, step: int, global_batch_size: int, max_offset: int) -> np.ndarray:
  """[G, 2] (top, left) of global batch `step`'s crops: uniform on {0..max_offset}^2, a pure
  function of (seed, step), so every process count cuts the same crops (each takes its rows)."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xC209, int(step)])
  return rng.integers(0, max_offset + 1, size=(global_batch_size, 2))


def random_crops(images: np.ndarray, offsets: np.ndarray, crop: int) -> np.ndarray:
  """images [B,H,W,C] -> [B,crop,crop,C], image i cut at offsets[i] = (top, left)."""
  rows = offsets[:, 0, None] + np.arange(crop)  # [B, crop]
  cols = offsets[:, 1, None] + np.arange(crop)
  b = np.arange(len(images))[:, None, None]
  return images[b, rows[:, :, None], cols[:, None, :]]


def flip_draws(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """[G, 2] bool (flip up-down, flip left-right) of global batch `step`'s images, each a fair coin:
  a pure function of (seed, step) like `crop_offsets`, drawn from a stream of its own."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xF11B, int(step)])
  return rng.integers(0, 2, size=(global_batch_size, 2)).astype(bool)


def random_flips(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """images [B,H,W,C]: image i flipped up-down where flips[i, 0] and left-right where flips[i, 1]
  (the four elements of the flip group, each with probability 1/4)."""
  images = np.where(flips[:, 0, None, None, None], images[:, ::-1], images)
  return np.where(flips[:, 1, None, None, None], images[:, :, ::-1], images)


class _TrainBatch:
  """Batch j of this process (j counted from start_step): picklable for grain workers."""

  def __init__(self, source, *, num_examples, global_batch_size, local_batch_size, offset,
               seed, start_step, num_local_devices, dtype, crop_size=None, flips=False):
    self.source = source
    self.n = num_examples
    self.gbs = global_batch_size
    self.lbs = local_batch_size
    self.offset = offset
    self.seed = seed
    self.start_step = start_step
    self.ndev = num_local_devices
    self.dtype = np.dtype(dtype)
    self.batches_per_epoch = num_examples // global_batch_size
    self.crop = crop_size
    self.flips = flips

  def indices(self, j: int) -> np.ndarray:
    epoch, b = divmod(self.start_step + int(j), self.batches_per_epoch)
    perm = epoch_permutation(self.n, self.seed, epoch)
    start = b * self.gbs + self.offset
    return perm[start:start + self.lbs]

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    idx = self.indices(j)
    images = np.stack([ex['image'] for ex in _read(self.source, [int(i) for i in idx])])
    if self.crop is not None and self.crop < images.shape[1]:
      if images.shape[1] != images.shape[2]:
        raise ValueError(f'crop_size needs square stored images, got {images.shape[1:3]}')
      offsets = crop_offsets(self.seed, self.start_step + int(j), self.gbs,
                             images.shape[1] - self.crop)[self.offset:self.offset + self.lbs]
      images = random_crops(images, offsets, self.crop)
    if self.flips:
      step = self.start_step + int(j)
      flips = flip_draws(self.seed, step, self.gbs)[self.offset:self.offset + self.lbs]
      images = random_flips(images, flips)
    images = _to_model_range(images, self.dtype)
    return {'image': images.reshape(self.ndev, self.lbs // self.ndev, *images.shape[1:])}


class _EvalBatch:
  """Batch b of this process over the split in order, padded at the end: picklable."""

  def __init__(self, source, *, num_examples, global_batch_size, local_batch_size, offset,
               num_local_devices, dtype, extra_keys=()):
    self.source = source
    self.extra_keys = tuple(extra_keys)
    self.n = num_examples
    self.gbs = global_batch_size
    self.lbs = local_batch_size
    self.offset = offset
    self.ndev = num_local_devices
    self.dtype = np.dtype(dtype)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    start = int(b) * self.gbs + self.offset
    index = np.arange(start, start + self.lbs, dtype=np.int64)
    valid = index < self.n
    index[~valid] = -1
    examples = _read(self.source, [int(i) for i in index[valid]])
    if examples:
      shape = examples[0]['image'].shape
      mshape = examples[0]['mask'].shape
    else:  # This process only has padding in this batch: shape from the first example.
      first = self.source[0]
      shape, mshape = first['image'].shape, first['mask'].shape
    images = np.zeros((self.lbs, *shape), np.uint8)
    masks = np.zeros((self.lbs, *mshape), np.uint8)
    subjects = np.full((self.lbs,), '', dtype=object)
    names = np.full((self.lbs,), '', dtype=object)
    extra = {key: np.full((self.lbs,), '', dtype=object) for key in self.extra_keys}
    for k, ex in enumerate(examples):  # valid ones come first
      images[k], masks[k] = ex['image'], ex['mask']
      subjects[k], names[k] = _to_str(ex['subject']), _to_str(ex['name'])
      for key, column in extra.items():
        column[k] = _to_str(ex[key])
    images = _to_model_range(images, self.dtype)
    images[~valid] = 0  # padding repeats zeros
    pdb = self.lbs // self.ndev
    lead = (self.ndev, pdb)
    return {
        'image': images.reshape(*lead, *shape),
        'mask': masks.reshape(*lead, *mshape),
        'valid': valid.reshape(lead),
        'index': index.reshape(lead),
        'subject': subjects.astype(str).reshape(lead),
        'name': names.astype(str).reshape(lead),
        **{key: column.astype(str).reshape(lead) for key, column in extra.items()},
    }


def _check_batching(n, global_batch_size, num_local_devices, process_index, process_count, what):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, process_count={process_count}).')
  if num_local_devices < 1:
    raise ValueError(f'num_local_devices={num_local_devices} must be >= 1.')
  if global_batch_size < 1 or global_batch_size % (process_count * num_local_devices):
    raise ValueError(
        f'{what}: global_batch_size={global_batch_size} is not divisible by process_count * '
        f'num_local_devices = {process_count} * {num_local_devices} = '
        f'{process_count * num_local_devices}.')
  if n == 0:
    raise ValueError(f'{what}: the split is empty.')


def _grain_iter(dataset, worker_count: int, num_threads: int):
  import grain  # pylint: disable=g-import-not-at-top
  it_ds = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads + 2))
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults are fine)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def _default_threads() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def train_iterator(source, *, global_batch_size: int, seed: int, start_step: int = 0,
                   num_local_devices: int, process_index: int = 0, process_count: int = 1,
                   dtype=np.float32, worker_count: int = 0,
                   crop_size: int | None = None,
                   flips: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of {'image': [num_local_devices, per_device_batch, H, W, C] in [-1, 1]}.

  Each epoch is a seeded shuffle of the whole split (``epoch_permutation(len, seed, epoch)``);
  the remainder is dropped. Global batch i is examples ``perm[e][b*G:(b+1)*G]`` with
  ``e, b = divmod(i, len // G)``, the same for any process count; process p takes
  ``[p*G/P:(p+1)*G/P]`` of it. ``start_step=k`` starts at global batch k without reading earlier
  ones. ``worker_count > 0`` reads in that many grain worker processes. ``crop_size=S`` cuts an
  S x S window of each image at offsets ``crop_offsets(seed, i, G, H - S)`` (then H = W = S).
  ``flips=True`` then flips each image up-down and/or left-right by ``flip_draws(seed, i, G)``.
  """
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  _check_batching(n, global_batch_size, num_local_devices, process_index, process_count,
                  'train_iterator')
  if global_batch_size > n:
    raise ValueError(f'train_iterator: global_batch_size={global_batch_size} exceeds the split '
                     f'size {n} (the remainder is dropped, so no batch would be left).')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  local_bs = global_batch_size // process_count
  load = _TrainBatch(source, num_examples=n, global_batch_size=global_batch_size,
                     local_batch_size=local_bs, offset=process_index * local_bs, seed=seed,
                     start_step=start_step, num_local_devices=num_local_devices, dtype=dtype,
                     crop_size=crop_size, flips=flips)
  dataset = grain.MapDataset.range(0, sys.maxsize // 2).map(load)
  return _grain_iter(dataset, worker_count, _default_threads())


def eval_iterator(source, *, global_batch_size: int, num_local_devices: int,
                  process_index: int = 0, process_count: int = 1,
                  dtype=np.float32, extra_keys=()) -> Iterator[dict[str, np.ndarray]]:
  """Finite iterator over the split in order, each example exactly once over all processes.

  Yields dicts with 'image' [ndev, pdb, H, W, C] in [-1, 1], 'mask' [ndev, pdb, H, W, 1] uint8,
  'valid' [ndev, pdb] bool (False on padding), 'index' [ndev, pdb] int64 (-1 on padding),
  'subject' and 'name' [ndev, pdb] str ('' on padding), and each of `extra_keys` (per-example
  attributes such as ContractSource.attributes) [ndev, pdb] str ('' on padding). Every process
  yields the same number of batches, ceil(len / global_batch_size); padding is zeros.
  """
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  _check_batching(n, global_batch_size, num_local_devices, process_index, process_count,
                  'eval_iterator')
  local_bs = global_batch_size // process_count
  load = _EvalBatch(source, num_examples=n, global_batch_size=global_batch_size,
                    local_batch_size=local_bs, offset=process_index * local_bs,
                    num_local_devices=num_local_devices, dtype=dtype, extra_keys=extra_keys)
  num_batches = -(-n // global_batch_size)
  dataset = grain.MapDataset.range(num_batches).map(load)
  return _grain_iter(dataset, 0, _default_threads())
