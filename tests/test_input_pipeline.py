"""input_pipeline: multi-process sharding, resumption, eval coverage, dtypes, errors."""
import ml_dtypes
import numpy as np
import pytest
import scipy.stats as sps

from configs import tiny
from sano_jax import input_pipeline as ip


class ListSource:
  """In-memory source of the data contract: example i has all pixels == i % 256."""

  def __init__(self, n, size=4, channels=1):
    self.n, self.size, self.channels = n, size, channels

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i)
    assert 0 <= i < self.n
    return {'image': np.full((self.size, self.size, self.channels), i % 256, np.uint8),
            'mask': np.full((self.size, self.size, 1), i % 2, np.uint8),
            'subject': f's{i // 3}', 'name': f'ex{i}'}


def _ids(images):
  """Recovers example ids from images in [-1, 1] (pixel value == id)."""
  flat = images.reshape(-1, *images.shape[2:]).astype(np.float32)
  return np.round((flat[:, 0, 0, 0] + 1) * 127.5).astype(int)


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_train_shards_form_the_global_batch():
  src = ListSource(50)
  kw = dict(global_batch_size=8, seed=3, num_local_devices=2)
  one = _take(ip.train_iterator(src, **kw), 15)  # > 1 epoch (6 batches per epoch)
  p0 = _take(ip.train_iterator(src, process_index=0, process_count=2, **kw), 15)
  p1 = _take(ip.train_iterator(src, process_index=1, process_count=2, **kw), 15)
  for b, b0, b1 in zip(one, p0, p1):
    assert b['image'].shape == (2, 4, 4, 4, 1)
    assert b0['image'].shape == b1['image'].shape == (2, 2, 4, 4, 1)
    g, s0, s1 = _ids(b['image']), _ids(b0['image']), _ids(b1['image'])
    assert not set(s0) & set(s1)
    np.testing.assert_array_equal(np.concatenate([s0, s1]), g)
  # Within an epoch every example appears at most once; the remainder (50 % 8) is dropped.
  epoch0 = np.concatenate([_ids(b['image']) for b in one[:6]])
  assert len(set(epoch0)) == 48
  epoch1 = np.concatenate([_ids(b['image']) for b in one[6:12]])
  assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch


def test_train_start_step_equals_skipping():
  src = ListSource(40)
  kw = dict(global_batch_size=8, seed=1, num_local_devices=1)
  full = _take(ip.train_iterator(src, **kw), 12)
  for k in (1, 5, 7):
    resumed = _take(ip.train_iterator(src, start_step=k, **kw), 12 - k)
    for a, b in zip(full[k:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])


def test_train_start_step_reads_no_earlier_batch():
  """Resuming at step k reads batches k, k+1, ... (and a bounded prefetch), never batch < k."""

  class Recording(ListSource):
    def __init__(self, n):
      super().__init__(n)
      self.reads = []  # one entry per read call: the indices it asked for, as a tuple

    def __getitem__(self, i):
      self.reads.append((int(i),))
      return super().__getitem__(i)

    def __getitems__(self, indices):
      self.reads.append(tuple(int(i) for i in indices))
      return [super(Recording, self).__getitem__(i) for i in indices]

  n, gbs, start = 16, 4, 1000
  per_epoch = n // gbs

  def batch_indices(step):
    epoch, b = divmod(step, per_epoch)
    return tuple(int(i) for i in ip.epoch_permutation(n, 0, epoch)[b * gbs:(b + 1) * gbs])

  src = Recording(n)
  it = ip.train_iterator(src, global_batch_size=gbs, seed=0, start_step=start, num_local_devices=1)
  batches = _take(it, 3)
  if hasattr(it, 'close'):
    it.close()
  for j, batch in enumerate(batches):
    np.testing.assert_array_equal(_ids(batch['image']), batch_indices(start + j))
  # Every read is one whole batch of step >= start (the prefetch may read a few steps ahead; an
  # iterator that skipped by reading steps 0..999 would have made >= 1000 reads of earlier steps).
  window = {batch_indices(k): k for k in range(start - 2 * per_epoch, start + 64)}
  assert window[batch_indices(start - 1)] == start - 1  # batches of nearby steps are distinct
  steps = []
  for r in src.reads:
    assert r in window, f'read {r} is not a batch of a step near {start}'
    steps.append(window[r])
  assert min(steps) == start, sorted(steps)[:5]
  assert set(range(start, start + 3)) <= set(steps)
  assert len(steps) <= 40, len(steps)


def test_train_seed_and_dtype():
  src = ListSource(30)
  a = next(ip.train_iterator(src, global_batch_size=6, seed=0, num_local_devices=1))
  b = next(ip.train_iterator(src, global_batch_size=6, seed=1, num_local_devices=1))
  assert not np.array_equal(a['image'], b['image'])
  c = next(ip.train_iterator(src, global_batch_size=6, seed=0, num_local_devices=3,
                             dtype=ml_dtypes.bfloat16))
  assert c['image'].dtype == ml_dtypes.bfloat16 and c['image'].shape[:2] == (3, 2)
  full = ListSource(256)
  x = next(ip.train_iterator(full, global_batch_size=256, seed=0, num_local_devices=1))['image']
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0


@pytest.mark.parametrize('gbs,ndev,pc,match', [
    (6, 4, 1, 'not divisible'), (8, 2, 3, 'not divisible'), (64, 1, 1, 'exceeds the split'),
])
def test_train_errors(gbs, ndev, pc, match):
  with pytest.raises(ValueError, match=match):
    ip.train_iterator(ListSource(20), global_batch_size=gbs, seed=0, num_local_devices=ndev,
                      process_count=pc)


@pytest.mark.parametrize('n', [1, 23, 32, 37])
def test_eval_covers_each_example_once(n):
  src = ListSource(n)
  seen = []
  counts = []
  for p in range(2):
    batches = list(ip.eval_iterator(src, global_batch_size=8, num_local_devices=2,
                                    process_index=p, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b['image'].shape == (2, 2, 4, 4, 1) and b['mask'].shape == (2, 2, 4, 4, 1)
      assert b['valid'].dtype == bool and b['index'].dtype == np.int64
      assert b['subject'].dtype.kind == 'U' and b['name'].shape == (2, 2)
      v = b['valid']
      idx = b['index'][v]
      seen.extend(idx.tolist())
      np.testing.assert_array_equal(_ids(b['image'])[v.reshape(-1)], idx % 256)
      assert (b['index'][~v] == -1).all() and (b['image'][~v] == 0).all()
      assert (b['mask'][~v] == 0).all() and (b['name'][~v] == '').all()
      assert [f'ex{i}' for i in idx] == b['name'][v].tolist()
      np.testing.assert_array_equal(b['mask'][v][:, 0, 0, 0], idx % 2)
  assert counts[0] == counts[1] == -(-n // 8)  # same number of batches on every process
  assert sorted(seen) == list(range(n))


@pytest.mark.parametrize('processes', [2, 4])
def test_eval_order_matches_single_process(processes):
  """P processes: batch b of each, laid side by side in process order, is the single process's
  batch b (indices, images and validity), so every example is seen once and in the same place."""
  src = ListSource(21)
  single = list(ip.eval_iterator(src, global_batch_size=4, num_local_devices=1))
  order = np.concatenate([b['index'].ravel() for b in single])
  assert order[order >= 0].tolist() == list(range(21))
  parts = [list(ip.eval_iterator(src, global_batch_size=4, num_local_devices=1, process_index=p,
                                 process_count=processes)) for p in range(processes)]
  assert all(len(p) == len(single) for p in parts)  # every process the same number of batches
  for b, whole in enumerate(single):
    for key in ('index', 'valid', 'image'):
      joined = np.concatenate([p[b][key].reshape(-1, *p[b][key].shape[2:]) for p in parts])
      np.testing.assert_array_equal(joined, whole[key].reshape(-1, *whole[key].shape[2:]))


def test_worker_processes_give_the_same_batches():
  src = ListSource(24)
  kw = dict(global_batch_size=4, seed=0, num_local_devices=1)
  a = _take(ip.train_iterator(src, **kw), 4)
  it = ip.train_iterator(src, worker_count=2, **kw)
  b = _take(it, 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  if hasattr(it, 'close'):
    it.close()


@pytest.fixture(scope='module')
def brick16(tmp_path_factory):
  config = tiny.get_config()  # sano_textures/brick at 16 px, C=1
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  return config


def test_get_source_builds_and_reads(brick16):
  """Each split holds exactly the examples the generator makes for it, byte for byte."""
  from sano_jax.datasets import textures  # pylint: disable=g-import-not-at-top
  tex_cfg = next(c for c in textures.SanoTextures.BUILDER_CONFIGS if c.name == 'brick_16')
  sources = {s: ip.get_source(brick16, s) for s in ('train', 'validation', 'test')}
  assert ip.get_source(brick16, 'val').split == 'validation'
  for split, src in sources.items():
    want = {e['name']: e for e in textures.make_split(tex_cfg, split)}
    assert len(src) == len(want), split
    # All of the (small) validation and test splits, a spread of the training split.
    idx = range(len(src)) if split != 'train' else range(0, len(src), max(1, len(src) // 60))
    names = set()
    for i in idx:
      ex = src[i]
      assert ex['image'].shape == (16, 16, 1) and ex['image'].dtype == np.uint8
      assert ex['mask'].shape == (16, 16, 1) and ex['mask'].dtype == np.uint8
      assert isinstance(ex['subject'], str) and isinstance(ex['name'], str)
      assert ex['name'].startswith(split + '_') and ex['subject'].startswith(split + '/')
      w = want[ex['name']]
      np.testing.assert_array_equal(ex['image'], w['image'])
      np.testing.assert_array_equal(ex['mask'], w['mask'])
      assert ex['subject'] == w['subject']
      names.add(ex['name'])
    if split != 'train':
      assert names == set(want)
  test = sources['test']
  assert sum(bool(test[i]['mask'].any()) for i in range(len(test))) == sum(
      bool(e['mask'].any()) for e in textures.make_split(tex_cfg, 'test'))
  batch = next(ip.train_iterator(sources['train'], global_batch_size=8, seed=0, num_local_devices=1))
  assert batch['image'].shape == (1, 8, 16, 16, 1)
  order = ip.epoch_permutation(len(sources['train']), 0, 0)[:8]
  expected = np.stack([sources['train'][int(i)]['image'] for i in order]) / 127.5 - 1
  np.testing.assert_allclose(batch['image'][0], expected, atol=1e-6)
  seen = []
  for b in ip.eval_iterator(test, global_batch_size=64, num_local_devices=1):
    seen.extend(b['name'][b['valid']].tolist())
  assert seen == [test[i]['name'] for i in range(len(test))]


def test_get_source_validates(brick16):
  cfg = brick16.copy_and_resolve_references()
  cfg.data.num_channels = 3
  with pytest.raises(ValueError, match='num_channels'):
    ip.get_source(cfg, 'train')
  cfg = brick16.copy_and_resolve_references()
  cfg.data.dataset = 'sano_textures/brick_16'
  cfg.data.image_size = 32
  with pytest.raises(ValueError, match='image_size'):
    ip.get_source(cfg, 'train')
  cfg = brick16.copy_and_resolve_references()
  with pytest.raises(ValueError, match='no split'):
    ip.get_source(cfg, 'test_healthy')
  cfg.data.dataset = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match='not a known TFDS dataset'):
    ip.get_source(cfg, 'train')


def test_hands11k_needs_manual_dir(tmp_path):
  cfg = tiny.get_config()
  cfg.data.dataset = 'hands11k'
  cfg.data.image_size = 16
  cfg.data.num_channels = 3
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='manual_dir'):
    ip.get_source(cfg, 'train')


class NumberedSource:
  """Every image is the same 3x3 grid of distinct pixel values: its flips tell each other apart."""

  def __init__(self, n):
    self.n = n
    self.image = (np.arange(9, dtype=np.uint8).reshape(3, 3, 1) * 20)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': self.image, 'mask': np.zeros((3, 3, 1), np.uint8), 'subject': 's', 'name': f'{i}'}


def _flip_ids(images, base):
  """Which of the four flips of `base` each image is: 2 * up-down + left-right (-1: none)."""
  flips = [base, base[:, ::-1], base[::-1], base[::-1, ::-1]]
  ids = []
  for img in images.reshape(-1, *images.shape[2:]):
    got = np.round((img.astype(np.float32) + 1) * 127.5).astype(np.uint8)
    ids.append(next((k for k, f in enumerate(flips) if np.array_equal(got, f)), -1))
  return np.array(ids)


def test_random_flips_are_the_flip_group_uniformly():
  src = NumberedSource(16)
  it = ip.train_iterator(src, global_batch_size=16, seed=5, num_local_devices=2, flips=True)
  ids = np.concatenate([_flip_ids(next(it)['image'], src.image) for _ in range(50)])
  assert ids.min() >= 0  # every image is one of the four flips, nothing else
  counts = np.bincount(ids, minlength=4)
  assert counts.min() > 0 and sps.chisquare(counts).pvalue > 1e-3, counts
  plain = ip.train_iterator(src, global_batch_size=16, seed=5, num_local_devices=2)
  assert (_flip_ids(next(plain)['image'], src.image) == 0).all()  # off by default


def test_flips_are_deterministic_across_process_counts_and_resume():
  src = NumberedSource(24)
  kw = dict(global_batch_size=8, seed=3, num_local_devices=2, flips=True)
  one = _take(ip.train_iterator(src, **kw), 5)
  p0 = ip.train_iterator(src, process_index=0, process_count=2, **kw)
  p1 = ip.train_iterator(src, process_index=1, process_count=2, **kw)
  late = ip.train_iterator(src, start_step=3, **kw)
  for k, b in enumerate(one):
    both = np.concatenate([_flip_ids(next(p)['image'], src.image) for p in (p0, p1)])
    np.testing.assert_array_equal(both, _flip_ids(b['image'], src.image))
    if k >= 3:
      np.testing.assert_array_equal(next(late)['image'], b['image'])
  assert len({tuple(_flip_ids(b['image'], src.image)) for b in one}) == 5  # new flips each step


def test_get_source_survives_a_concurrent_build(tmp_path, monkeypatch):
  """Two processes building the same dataset into one data_dir: the one that renames second gets
  TFDS's FileExistsError and must read the other's (identical) copy instead of failing."""
  from sano_jax.datasets import textures  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path)
  generate = textures.SanoTextures._download_and_prepare
  calls = []

  def other_process_finishes_first(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:  # the "other process": a second builder on the same data_dir, start to end
      ip._builder_for(config).download_and_prepare(file_format='array_record')
    return generate(self, *args, **kwargs)

  monkeypatch.setattr(textures.SanoTextures, '_download_and_prepare', other_process_finishes_first)
  source = ip.get_source(config, 'validation')
  assert len(calls) == 2  # both builds ran; ours lost the final rename
  tex_cfg = next(c for c in textures.SanoTextures.BUILDER_CONFIGS if c.name == 'brick_16')
  want = {e['name']: e for e in textures.make_split(tex_cfg, 'validation')}
  assert len(source) == len(want)
  np.testing.assert_array_equal(source[0]['image'], want[source[0]['name']]['image'])
