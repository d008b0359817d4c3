"""The 11k Hands builder on its dummy data: split sizes, subject-disjointness, masks, bad inputs."""
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_11k_hands import hands11k

DUMMY = hands11k.Hands11k.code_path.parent / 'dummy_data'
SPLITS = {'train': 14, 'validation': 4, 'test': 4, 'test_healthy': 2}


try:  # tfds.testing needs `dill` (tensorflow-datasets' own test extra).
  import dill  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  dill = None

if dill is not None:

  class Hands11kTest(tfds.testing.DatasetBuilderTestCase):
    """TFDS's own builder test on the dummy data (registration, as_dataset, split sizes)."""
    DATASET_CLASS = hands11k.Hands11k
    BUILDER_CONFIG_NAMES_TO_TEST = ['16']
    SPLITS = SPLITS
    SKIP_CHECKSUMS = True

    def _make_builder(self, config=None):
      # The test case reads with tf.data (`as_dataset`), which array_record does not support:
      # write TFRecord here; the other tests read array_record through `as_data_source`.
      return self.dataset_class(data_dir=self.tmp_dir, config=config, version=self.VERSION,
                                file_format='tfrecord')

else:

  def test_tfds_builder_test_case():
    pytest.skip('tfds.testing.DatasetBuilderTestCase needs `pip install dill`.')


def _build(manual_dir, data_dir, size=16):
  builder = hands11k.Hands11k(config=str(size), data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _copy(tmp_path):
  dst = tmp_path / 'manual'
  shutil.copytree(DUMMY, dst)
  return dst


@pytest.fixture(scope='module')
def built32(tmp_path_factory):
  builder = _build(DUMMY, tmp_path_factory.mktemp('h11k'), size=32)
  return {s: builder.as_data_source(split=s) for s in SPLITS}


def test_splits_are_subject_disjoint(built32):
  subjects = {s: {src[i]['subject'] for i in range(len(src))} for s, src in built32.items()}
  assert {s: len(v) for s, v in built32.items()} == SPLITS
  for a, b in (('train', 'validation'), ('train', 'test_healthy'), ('validation', 'test_healthy')):
    assert not subjects[a] & subjects[b], (a, b)
  assert all(len(next(iter(v))) == 7 for v in subjects.values())  # zero-padded ids, as strings
  for s in ('train', 'validation', 'test_healthy'):
    src = built32[s]
    assert all(src[i]['accessories'] == 0 and not src[i]['mask'].any() for i in range(len(src)))


def test_masks_line_up_with_images(built32):
  test = built32['test']
  for i in range(len(test)):
    ex = test[i]
    assert ex['image'].shape == (32, 32, 3) and ex['mask'].shape == (32, 32, 1)
    mask = ex['mask'][..., 0].astype(bool)
    assert mask.any()
    img = ex['image'].astype(float)
    blueness = img[..., 2] - img[..., 0]  # the dummy "ring" is blue, skin and background are not
    assert blueness[mask].mean() > 100 > blueness[~mask].mean()


def _by_name(src):
  out = {}
  for i in range(len(src)):
    ex = src[i]
    out[ex['name']] = ex
  assert len(out) == len(src)
  return out


def test_zipped_inputs(tmp_path, built32):
  """Hands.zip (images in a folder inside the zip) and masks.zip (at its root) give exactly the
  dataset built from the unzipped folders: every feature of every example, byte for byte."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  shutil.copy(DUMMY / 'HandInfo.csv', manual)
  for folder, zip_name, inner in (('Hands', 'Hands.zip', 'Hands/'), ('masks', 'masks.zip', '')):
    with zipfile.ZipFile(manual / zip_name, 'w') as zf:
      for p in sorted((DUMMY / folder).iterdir()):
        zf.write(p, inner + p.name)
  assert not (manual / 'Hands').exists() and not (manual / 'masks').exists()
  builder = _build(manual, tmp_path / 'data', size=32)
  assert {s: v.num_examples for s, v in builder.info.splits.items()} == SPLITS
  for split, folder_src in built32.items():
    zipped, unzipped = _by_name(builder.as_data_source(split=split)), _by_name(folder_src)
    assert set(zipped) == set(unzipped), split
    for name, ex in unzipped.items():
      other = zipped[name]
      assert set(other) == set(ex), name
      for key, value in ex.items():
        a, b = np.asarray(value), np.asarray(other[key])
        assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
        assert a.tobytes() == b.tobytes(), (split, name, key)
    # Not a dataset of blank images: the masks of the test split hold the rings.
    if split == 'test':
      assert all(ex['mask'].any() for ex in zipped.values())


def test_missing_csv(tmp_path):
  manual = _copy(tmp_path)
  (manual / 'HandInfo.csv').unlink()
  with pytest.raises(FileNotFoundError, match='HandInfo.csv'):
    _build(manual, tmp_path / 'data')


def test_missing_image(tmp_path):
  manual = _copy(tmp_path)
  (manual / 'Hands' / 'Hand_0000005.jpg').unlink()
  with pytest.raises(FileNotFoundError, match='Hand_0000005.jpg'):
    _build(manual, tmp_path / 'data')


def test_undecodable_mask(tmp_path):
  manual = _copy(tmp_path)
  (manual / 'masks' / 'Hand_0000021.png').write_bytes(b'\x89PNG garbage')
  with pytest.raises(ValueError, match='Hand_0000021.png'):
    _build(manual, tmp_path / 'data')


def test_mask_aspect_mismatch(tmp_path):
  manual = _copy(tmp_path)
  Image.fromarray(np.full((30, 30), 255, np.uint8)).save(manual / 'masks' / 'Hand_0000022.png')
  with pytest.raises(ValueError, match=r'Hand_0000022.png is 30x30.*Hand_0000022.jpg'):
    _build(manual, tmp_path / 'data')


def test_csv_missing_column(tmp_path):
  manual = _copy(tmp_path)
  lines = (manual / 'HandInfo.csv').read_text().splitlines()
  cut = [','.join(c for j, c in enumerate(line.split(',')) if j != 4) for line in lines]
  (manual / 'HandInfo.csv').write_text('\n'.join(cut) + '\n')
  with pytest.raises(ValueError, match=r"HandInfo.csv lacks column\(s\) \['accessories'\]"):
    _build(manual, tmp_path / 'data')
