"""The embedded dataset (sano_textures) and the folder builder (sano_folder)."""
import re
import shutil

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


def test_folder_reads_the_mvtec_layout(tmp_path):
  """test/<type>/NAME with ground_truth/<type>/STEM_mask: good/ needs no mask; a missing mask of
  another type is an error naming the image; names and subjects carry the type (stems repeat)."""
  normal, _, _ = _make_folders(tmp_path)
  test, truth = tmp_path / 'mvtec' / 'test', tmp_path / 'mvtec' / 'ground_truth'
  for sub in ('good', 'crack', 'hole'):
    (test / sub).mkdir(parents=True)
  (truth / 'crack').mkdir(parents=True)
  (truth / 'hole').mkdir(parents=True)
  _img(test / 'good' / '000.png')
  mask = np.zeros((18, 24), np.uint8)
  mask[:, 3:12] = 255  # the left half of the central 18 x 18 square
  for sub in ('crack', 'hole'):
    _img(test / sub / '000.png')
    Image.fromarray(mask).save(truth / sub / '000_mask.png')
  cfg = _folder_cfg(tmp_path, normal, test, truth)
  tst = ip.get_source(cfg, 'test')
  got = {tst[i]['name']: tst[i] for i in range(len(tst))}
  assert sorted(got) == ['crack/000.png', 'good/000.png', 'hole/000.png']
  assert {ex['subject'] for ex in got.values()} == {'crack/000', 'good/000', 'hole/000'}
  assert not got['good/000.png']['mask'].any()
  for sub in ('crack', 'hole'):
    m = got[f'{sub}/000.png']['mask'][..., 0]
    assert m[:, :7].all() and not m[:, 9:].any()
  _img(test / 'hole' / '001.png')
  with pytest.raises(FileNotFoundError, match='001.png'):
    ip.get_source(_folder_cfg(tmp_path, normal, test, truth), 'test')


def _yolo_copy(root, n_good=10):
  """A KolektorSDD-like YOLO-seg folder: n_good defect-free images, 2 with polygons."""
  images, labels = root / 'Datasets' / 'images', root / 'Datasets' / 'labels'
  for split in ('train', 'val'):
    (images / split).mkdir(parents=True)
    (labels / split).mkdir(parents=True)
  for i in range(n_good + 2):
    split = 'train' if i % 3 else 'val'
    _img(images / split / f'{i:03d}.jpg', size=(20, 40), mode='L')
    text = ''
    if i == 1:  # a rectangle and a thin vertical line (one pixel wide: no interior)
      text = '0 0.25 0.25 0.75 0.25 0.75 0.5 0.25 0.5\n0 0.5 0.6 0.5 0.9 0.5 0.6'
    elif i == 2:
      text = '0 0.1 0.1 0.3 0.1 0.2 0.2'
    (labels / split / f'{i:03d}.txt').write_text(text)
  return root


def test_kolektor_conversion_rasterizes_polygons_into_the_mvtec_layout(tmp_path):
  from benchmarks import kolektor
  src = _yolo_copy(tmp_path / 'src')
  # Twins (the real copy holds 8 images twice): a defect-free one and a defective one whose second
  # copy carries another polygon. Each is kept once; the defective one with both polygons.
  images = src / 'Datasets' / 'images'
  shutil.copy(images / 'train' / '004.jpg', images / 'val' / '100.jpg')
  (src / 'Datasets' / 'labels' / 'val' / '100.txt').write_text('')
  shutil.copy(images / 'val' / '000.jpg', images / 'train' / '101.jpg')
  (src / 'Datasets' / 'labels' / 'train' / '101.txt').write_text('0 0.8 0.8 0.9 0.8 0.9 0.9')
  shutil.copy(images / 'train' / '002.jpg', images / 'train' / '102.jpg')
  (src / 'Datasets' / 'labels' / 'train' / '102.txt').write_text('0 0.8 0.1 0.9 0.1 0.9 0.2')
  counts = kolektor.convert(str(src), str(tmp_path / 'out'), test_fraction=0.3, seed=1)
  assert counts == {'train/good': 6, 'test/good': 3, 'test/crack': 3, 'duplicates_dropped': 3}
  out = tmp_path / 'out'
  goods = sorted(p.name for p in (out / 'train/good').iterdir()) + sorted(
      p.name for p in (out / 'test/good').iterdir())
  assert sorted(goods) == [f'{i:03d}.jpg' for i in range(3, 12)]
  assert sorted(p.name for p in (out / 'test/crack').iterdir()) == ['001.jpg', '002.jpg', '101.jpg']
  twin = np.asarray(Image.open(out / 'ground_truth/crack/002_mask.png')) > 0
  assert twin[2:5, 2:7].any() and twin[4:9, 16:19].any()  # its polygon and its twin's
  mask = np.asarray(Image.open(out / 'ground_truth/crack/001_mask.png'))
  assert mask.shape == (40, 20) and set(np.unique(mask)) == {0, 255}
  # The rectangle x in [5, 15], y in [10, 20] px, outline included; the line: column 10, y 24-36.
  assert (mask[10:21, 5:16] == 255).all()
  assert (mask[24:37, 10] == 255).all() and not mask[24:37, 12:].any()
  assert mask.sum() // 255 == 11 * 11 + 13
  # The same seed chooses the same test share; the result reads as a folder dataset.
  again = kolektor.convert(str(src), str(tmp_path / 'again'), test_fraction=0.3, seed=1)
  assert again == counts and sorted(p.name for p in (tmp_path / 'again/test/good').iterdir()) == \
      sorted(p.name for p in (out / 'test/good').iterdir())
  cfg = _folder_cfg(tmp_path, out / 'train/good', out / 'test', out / 'ground_truth', csv=False)
  cfg.data.num_channels = 1
  tst = ip.get_source(cfg, 'test')
  names = sorted(tst[i]['name'] for i in range(len(tst)))
  assert names[:3] == ['crack/001.jpg', 'crack/002.jpg', 'crack/101.jpg'] and len(names) == 6


def test_kolektor_conversion_rejects_bad_labels(tmp_path):
  from benchmarks import kolektor
  src = _yolo_copy(tmp_path / 'src', n_good=1)
  (src / 'Datasets/labels/train/001.txt').write_text('0 0.1 0.2 1.5 0.3 0.4 0.5\n')
  with pytest.raises(ValueError, match=r'001.txt, line 1: .*normalized'):
    kolektor.convert(str(src), str(tmp_path / 'out'))
  (src / 'Datasets/labels/train/001.txt').unlink()
  with pytest.raises(FileNotFoundError, match='001.txt'):
    kolektor.convert(str(src), str(tmp_path / 'out'))


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


def _fake_mvtec(root, rng=np.random.default_rng(5)):
  """A fake MVTec AD category: 8 healthy training images, test/good (2) and two defect types (2
  each) whose masks have anti-aliased edges (0, 255 and gray values between)."""
  from skimage import draw
  for sub in ('train/good', 'test/good', 'test/scratch', 'test/hole', 'ground_truth/scratch',
              'ground_truth/hole'):
    (root / sub).mkdir(parents=True)
  for i in range(8):
    _img(root / 'train/good' / f'{i:03d}.png', size=(20, 20), mode='L', rng=rng)
  for i in range(2):
    _img(root / 'test/good' / f'{i:03d}.png', size=(20, 20), mode='L', rng=rng)
    for sub in ('scratch', 'hole'):
      _img(root / 'test' / sub / f'{i:03d}.png', size=(20, 20), mode='L', rng=rng)
      mask = np.zeros((20, 20), np.uint8)
      rr, cc, val = draw.circle_perimeter_aa(10, 10, 4)
      mask[rr, cc] = (val * 255).astype(np.uint8)
      mask[draw.disk((10, 10), 4)] = 255
      Image.fromarray(mask).save(root / 'ground_truth' / sub / f'{i:03d}_mask.png')
  return root


def test_configs_mvtec_trains_and_evaluates_a_category_with_anti_aliased_masks(tmp_path):
  """configs/mvtec.py with --config.data.root: the three folders come from the category; masks with
  gray edges are an error naming data.mask_threshold until it is set; then a few steps train and
  the evaluation scores every test image (good ones healthy)."""
  from configs import mvtec, tiny
  from sano_jax import evaluate, train
  root = _fake_mvtec(tmp_path / 'bottle')
  config = mvtec.get_config('16')
  config.model = tiny.get_config().model
  config.data.root = str(root)
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.num_channels = 1
  for key, value in {'num_train_steps': 2, 'batch_size': 4, 'log_every': 1, 'eval_every': 2,
                     'checkpoint_every': 2, 'eval_batches': 1, 'ema_rate': 0.5}.items():
    config.training[key] = value
  config.eval.update(batch_size=4, bootstrap_runs=0, num_figures=0)
  config.localize.calibrate = False
  with pytest.raises(ValueError, match=r'not binary.*--config\.data\.mask_threshold=127'):
    ip.get_source(config, 'test')
  config.data.mask_threshold = 127
  test = ip.get_source(config, 'test')
  assert sorted(test[i]['name'] for i in range(len(test))) == [
      f'{sub}/{i:03d}.png' for sub in ('good', 'hole', 'scratch') for i in range(2)]
  masks = {test[i]['name']: test[i]['mask'] for i in range(len(test))}
  assert not masks['good/000.png'].any() and masks['hole/001.png'].sum() > 4
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = evaluate.evaluate(config, workdir)
  assert out['num_images'] == 6 and out['num_anomalous_images'] == 4
  assert 0.0 <= out['auroc'] <= 1.0 and out['num_regions'] == 4
  with pytest.raises(FileNotFoundError, match='no train/good'):
    config.data.root = str(tmp_path)
    ip.get_source(config, 'train')
