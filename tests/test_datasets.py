"""The embedded dataset (sano_textures) and the folder builder (sano_folder)."""
import re

import numpy as np
import pytest
from PIL import Image

from configs import folder as folder_config
from sano_jax import input_pipeline as ip
from sano_jax.datasets import textures

_NAME = re.compile(r'^(\w+?)_(\d+)_y(\d+)_x(\d+)_(anom|ok)$')


def _config(name):
  return next(c for c in textures.SanoTextures.BUILDER_CONFIGS if c.name == name)


def _build(data_dir, name='brick_16'):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(f'sano_textures/{name}', data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder, {s: builder.as_data_source(split=s) for s in ('train', 'validation', 'test')}


def _decode(s):
  return s.decode() if isinstance(s, bytes) else str(s)


@pytest.fixture(scope='module')
def brick16(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('tex_a'))


def test_textures_registered_configs():
  names = {c.name for c in textures.SanoTextures.BUILDER_CONFIGS}
  textures_ = ('brick', 'grass', 'gravel', 'retina', 'hubble')
  assert {f'{t}_{s}' for t in textures_ for s in (16, 32, 64)} == names
  assert _config('brick_32').scale == 0.5


def test_textures_build_splits_and_masks(brick16):
  builder, sources = brick16
  sizes = {s: len(v) for s, v in sources.items()}
  assert 2000 <= sizes['train'] <= 4000 and 200 <= sizes['validation'] <= 500
  assert sizes['test'] == 300
  assert builder.info.features['image'].shape == (16, 16, 1)
  cfg = _config('brick_16')
  tex = textures.load_texture(cfg.texture, cfg.scale)
  width = tex.shape[1]
  subjects = {}
  for split, src in sources.items():
    lo, hi = (int(round(f * width)) for f in textures.BANDS[split])
    subjects[split] = set()
    num_anom = 0
    for i in range(len(src)):
      ex = src[i]
      m = _NAME.match(_decode(ex['name']))
      assert m and m.group(1) == split
      y, x = int(m.group(3)), int(m.group(4))
      assert lo <= x and x + 16 <= hi  # crops stay inside their (disjoint) band
      subjects[split].add(_decode(ex['subject']))
      base = tex[y:y + 16, x:x + 16]
      mask = ex['mask'][..., 0].astype(bool)
      changed = (ex['image'] != base).any(-1)
      assert not (changed & ~mask).any()  # every changed pixel lies in the mask
      if m.group(5) == 'anom':
        num_anom += 1
        assert mask.sum() >= 9 and changed.sum() > 0.5 * mask.sum()  # pasted region == mask
      else:
        assert not mask.any() and not changed.any()
    if split == 'test':
      assert 200 <= num_anom < len(src)  # mostly anomalous, some healthy
    else:
      assert num_anom == 0
  assert not subjects['train'] & subjects['validation']
  assert len(subjects['train']) >= 20 and len(subjects['test']) >= 10
  assert len(src) / len(subjects['test']) >= 2  # several crops per subject


def _cell(subject):
  split, cell = subject.split('/')
  return split, cell


def test_textures_splits_come_from_disjoint_regions(brick16):
  """Subject ids carry their split as a prefix, so prefixed ids are disjoint whatever the regions:
  check what the prefix hides. Each crop is the texture at the (y, x) its name gives (verified on the
  pixels), the splits' crops cover disjoint sets of source columns, and the un-prefixed subject
  cells (crop centre // cell size) are disjoint between splits."""
  _, sources = brick16
  cfg = _config('brick_16')
  tex = textures.load_texture(cfg.texture, cfg.scale)
  cell = max(8, min(16, 16 // 2))
  columns, cells = {}, {}
  for split, src in sources.items():
    columns[split], cells[split] = np.zeros(tex.shape[1], bool), set()
    for i in range(len(src)):
      ex = src[i]
      m = _NAME.match(_decode(ex['name']))
      y, x = int(m.group(3)), int(m.group(4))
      healthy = ~ex['mask'][..., 0].astype(bool)
      np.testing.assert_array_equal(ex['image'][healthy], tex[y:y + 16, x:x + 16][healthy])
      if split != 'test':
        assert healthy.all()
        np.testing.assert_array_equal(ex['image'], tex[y:y + 16, x:x + 16])
      columns[split][x:x + 16] = True
      prefix, rc = _cell(_decode(ex['subject']))
      assert prefix == split
      assert rc == f'r{(y + 8) // cell:02d}c{(x + 8) // cell:02d}'
      cells[split].add(rc)
  for a, b in (('train', 'validation'), ('train', 'test'), ('validation', 'test')):
    assert not (columns[a] & columns[b]).any(), (a, b, np.flatnonzero(columns[a] & columns[b]))
    assert not cells[a] & cells[b], (a, b, sorted(cells[a] & cells[b])[:5])
  # No crop of one split is a crop of another (pixel content), even shifted within a band.
  val_crops = {sources['validation'][i]['image'].tobytes() for i in range(len(sources['validation']))}
  assert not any(sources['train'][i]['image'].tobytes() in val_crops
                 for i in range(0, len(sources['train']), 3))


def test_textures_deterministic(brick16, tmp_path):
  _, a = brick16
  _, b = _build(tmp_path)
  for split in a:
    assert len(a[split]) == len(b[split])
    for i in range(0, len(a[split]), 7):
      ea, eb = a[split][i], b[split][i]
      np.testing.assert_array_equal(ea['image'], eb['image'])
      np.testing.assert_array_equal(ea['mask'], eb['mask'])
      assert ea['name'] == eb['name'] and ea['subject'] == eb['subject']


def test_textures_anomalies_are_not_intensity_blobs():
  """|x - mean| localizes the pasted content poorly (pixel AUROC well below 0.95)."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  cfg = _config('brick_32')
  train = textures.make_split(cfg, 'train')
  test = textures.make_split(cfg, 'test')
  mean = np.mean([e['image'].mean() for e in train])
  scores = np.stack([np.abs(e['image'].astype(float) - mean).mean(-1) for e in test])
  labels = np.stack([e['mask'][..., 0] for e in test])
  assert 0.0 < labels.mean() < 0.2
  assert roc_auc_score(labels.ravel(), scores.ravel()) < 0.8


def test_retina_is_rgb():
  """Real colour: the crops are cut from the RGB fundus photo (not a gray image in 3 channels)."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  cfg = _config('retina_16')
  assert textures.num_channels(cfg.texture) == 3
  raw = data.retina().astype(np.float64)
  field = raw[raw.sum(-1) > 60]  # the fundus, not the black surround
  raw_means = field.mean(0)
  assert raw_means[0] > raw_means[1] > raw_means[2]  # reddish: R > G > B
  for split in ('train', 'test'):
    examples = textures.make_split(cfg, split)
    images = np.stack([e['image'] for e in examples]).astype(np.float64)
    assert images.shape[1:] == (16, 16, 3)
    gray = (np.ptp(images, axis=-1) == 0).mean()
    assert gray < 0.01, gray  # almost no pixel has equal channels
    means = images.mean((0, 1, 2))
    assert means[0] - means[1] > 50 and means[1] - means[2] > 5, means
    # Each crop's channels keep the photo's order of channel means.
    per_crop = images.mean((1, 2))
    assert (np.argsort(-per_crop, axis=-1) == [0, 1, 2]).mean() > 0.9
  tex = textures.load_texture(cfg.texture, cfg.scale)
  train = textures.make_split(cfg, 'train')
  m = _NAME.match(train[5]['name'])
  y, x = int(m.group(3)), int(m.group(4))
  np.testing.assert_array_equal(train[5]['image'], tex[y:y + 16, x:x + 16])
  test = textures.make_split(cfg, 'test')
  anom = [e for e in test if e['name'].endswith('anom')]
  assert anom and all(e['mask'].any() for e in anom)


def test_held_out_hubble_is_the_deep_field_in_colour():
  """The held-out texture: crops of the RGB Hubble deep field (rescaled x0.25), in colour, with
  anomalies pasted in exactly where the masks say."""
  from skimage import data, transform  # pylint: disable=g-import-not-at-top
  assert textures.HELD_OUT == ('hubble',) and set(textures.HELD_OUT) <= set(textures.TEXTURES)
  cfg = _config('hubble_16')
  assert textures.num_channels(cfg.texture) == 3 and cfg.scale == 0.25
  tex = textures.load_texture(cfg.texture, cfg.scale)
  oracle = transform.rescale(data.hubble_deep_field() / 255.0, 0.25, anti_aliasing=True,
                             channel_axis=-1, order=1, mode='reflect')
  np.testing.assert_allclose(tex / 255.0, oracle, atol=0.5 / 255 + 1e-9)
  train = textures.make_split(cfg, 'train')
  images = np.stack([e['image'] for e in train]).astype(np.float64)
  assert images.shape[1:] == (16, 16, 3)
  assert (np.ptp(images, axis=-1) == 0).mean() < 0.05  # colour, not gray in 3 channels
  for e in textures.make_split(cfg, 'test'):
    m = _NAME.match(e['name'])
    y, x = int(m.group(3)), int(m.group(4))
    outside = e['mask'][..., 0] == 0
    np.testing.assert_array_equal(e['image'][outside], tex[y:y + 16, x:x + 16][outside])
    assert e['mask'].any() == e['name'].endswith('anom')


# ---------------------------------------------------------------------------------------------
# Folder builder.


def _img(path, size=(24, 18), mode='RGB', value=None, rng=np.random.default_rng(0)):
  w, h = size
  c = 3 if mode == 'RGB' else 1
  arr = rng.integers(90, 160, (h, w, c), dtype=np.uint8) if value is None else np.full(
      (h, w, c), value, np.uint8)
  Image.fromarray(arr if c == 3 else arr[..., 0], mode).save(path)
  return arr


def _make_folders(root, *, n_subjects=5, per_subject=2):
  normal, test, masks = root / 'normal', root / 'test', root / 'masks'
  for d in (normal, test, masks):
    d.mkdir()
  rows = ['name,subject']
  for s in range(n_subjects):
    for k in range(per_subject):
      name = f'img_{s}_{k}.png' if k % 2 else f'img_{s}_{k}.jpg'
      _img(normal / name)
      rows.append(f'{name},patient{s}')
  (root / 'subjects.csv').write_text('\n'.join(rows) + '\n')
  for t in range(3):
    arr = _img(test / f't{t}.png', value=100)
    mask = np.zeros((36, 48), np.uint8)  # twice the image size: same aspect ratio
    mask[10:20, 12:30] = 255
    Image.fromarray(mask).save(masks / f't{t}.bmp')
    del arr
  return normal, test, masks


def _folder_cfg(root, normal, test, masks, size=16, csv=True):
  cfg = folder_config.get_config(str(size))
  cfg.data.data_dir = str(root / 'tfds')
  cfg.data.normal_dir = str(normal)
  cfg.data.test_dir = str(test)
  cfg.data.mask_dir = str(masks)
  if csv:
    cfg.data.subjects_csv = str(root / 'subjects.csv')
  return cfg


def test_folder_builds(tmp_path):
  normal, test, masks = _make_folders(tmp_path)
  cfg = _folder_cfg(tmp_path, normal, test, masks)
  train, val, tst = (ip.get_source(cfg, s) for s in ('train', 'validation', 'test'))
  assert len(train) + len(val) == 10 and len(val) >= 2 and len(tst) == 3
  ts = {train[i]['subject'] for i in range(len(train))}
  vs = {val[i]['subject'] for i in range(len(val))}
  assert ts and vs and not ts & vs and ts | vs == {f'patient{s}' for s in range(5)}
  ex = tst[0]
  assert ex['image'].shape == (16, 16, 3) and ex['mask'].shape == (16, 16, 1)
  expected = np.zeros((16, 16), np.uint8)
  # The 48x36 mask keeps its aspect ratio: its central 36x36 square (columns 6:42) is resized.
  # Mask rows 10:20 and columns 12:30 -> nearest neighbour at 16 px.
  ys = (np.arange(16) + 0.5) * 36 / 16
  xs = (np.arange(16) + 0.5) * 36 / 16 + 6
  expected[np.ix_((ys >= 10) & (ys < 20), (xs >= 12) & (xs < 30))] = 1
  np.testing.assert_array_equal(ex['mask'][..., 0], expected)
  # Images too: the central 18x18 of the 24x18 image, resized (not stretched).
  k = next(i for i in range(len(train)) if train[i]['name'].endswith('.png'))
  raw = np.asarray(Image.open(normal / train[k]['name']))
  want = np.asarray(Image.fromarray(raw[:, 3:21]).resize((16, 16), Image.LANCZOS, reducing_gap=3.0))
  np.testing.assert_array_equal(train[k]['image'], want)
  assert not train[0]['mask'].any()
  # Same folders -> same prepared dataset; a second call does not rebuild: the prepared files are
  # the same files, untouched, and no second dataset directory appears.
  def listing():
    root = tmp_path / 'tfds'
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size)
            for p in root.rglob('*') if p.is_file()}
  before = listing()
  assert len(list((tmp_path / 'tfds' / 'sano_folder').iterdir())) == 1
  again = ip.get_source(cfg, 'train')
  assert listing() == before
  assert len(again) == len(train)
  assert [again[i]['name'] for i in range(len(again))] == [train[i]['name'] for i in range(len(train))]


def test_folder_subject_is_stem_without_csv(tmp_path):
  normal, test, masks = _make_folders(tmp_path, n_subjects=3)
  cfg = _folder_cfg(tmp_path, normal, test, masks, csv=False)
  train, val = ip.get_source(cfg, 'train'), ip.get_source(cfg, 'validation')
  names = [s[i]['name'] for s in (train, val) for i in range(len(s))]
  subjects = [s[i]['subject'] for s in (train, val) for i in range(len(s))]
  assert [n.rsplit('.', 1)[0] for n in names] == subjects


def test_folder_unreadable_image(tmp_path):
  normal, test, masks = _make_folders(tmp_path)
  (normal / 'broken.png').write_bytes(b'this is not a png')
  with pytest.raises(ValueError, match='broken.png'):
    ip.get_source(_folder_cfg(tmp_path, normal, test, masks), 'train')


def test_folder_missing_mask(tmp_path):
  normal, test, masks = _make_folders(tmp_path)
  _img(test / 'lonely.png')
  with pytest.raises(FileNotFoundError, match='lonely.png'):
    ip.get_source(_folder_cfg(tmp_path, normal, test, masks), 'test')


def test_folder_mismatched_channels(tmp_path):
  normal, test, masks = _make_folders(tmp_path)
  _img(normal / 'gray_one.png', mode='L')
  with pytest.raises(ValueError, match=r'gray_one.png has 1 channel'):
    ip.get_source(_folder_cfg(tmp_path, normal, test, masks), 'train')


def test_folder_needs_normal_dir(tmp_path):
  cfg = folder_config.get_config()
  cfg.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='normal_dir'):
    ip.get_source(cfg, 'train')
