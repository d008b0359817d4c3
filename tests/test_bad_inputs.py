"""The bad-input matrix (docs/bad_inputs.md): one test per row, named after its row.

Each test feeds one bad input through the entry point a user would reach it by and asserts the
error type AND that the message names the problem (file, shape, dtype or value); rows with a
correct handling instead of an error assert the handled result against an independent oracle.
Everything is tiny: 16-32 px images in tmp_path, a run directory with random params (no training,
no compile until a row needs one).
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from sano_jax import checkpointing, localization, score_stats, predict, train
from sano_jax import rundir
from sano_jax.datasets import folder
from tests.helpers import random_run_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16  # the tiny config's image size


# ------------------------------------------------------------------------------------------------
# Fixtures.


def _identity_score(x):
  return -x  # a stand-in score function: localize is pure and takes any score_fn


@pytest.fixture(scope='module')
def stats16():
  rng = np.random.default_rng(0)
  return score_stats.fit_score_stats(_identity_score, [rng.uniform(size=(4, S, S, 1)).astype(np.float32)])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return random_run_dir(str(tmp_path_factory.mktemp('bad_inputs') / 'run'), tiny_config())


def _copy_run(run_dir, tmp_path, name='run'):
  dst = str(tmp_path / name)
  shutil.copytree(run_dir, dst)
  return dst


def _png(path, arr, mode=None):
  Image.fromarray(arr, mode).save(path)
  return path


def _gray(seed=0, size=S):
  return np.random.default_rng(seed).integers(60, 200, (size, size), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Images given to the localizer (sano_jax.localize, load_localizer, check_images).


def test_image_rank_3(stats16):
  with pytest.raises(ValueError, match=r'images must be \[B,H,W,C\], got shape \(16, 16, 1\)'):
    localization.localize(_identity_score, np.zeros((S, S, 1), np.float32), stats16)


def test_image_size_differs_from_stats(stats16):
  with pytest.raises(ValueError, match='image size 8x8 differs from the stats image size 16x16'):
    localization.localize(_identity_score, np.zeros((2, 8, 8, 1), np.float32), stats16)


def test_image_channels_differ_from_stats(stats16):
  with pytest.raises(ValueError, match='images have 3 channels, the stats were fitted on 1'):
    localization.localize(_identity_score, np.zeros((2, S, S, 3), np.float32), stats16)


def test_image_integer_dtype_not_uint8(stats16):
  with pytest.raises(ValueError, match='got dtype int32'):
    localization.localize(_identity_score, np.zeros((2, S, S, 1), np.int32), stats16)


def test_image_float_out_of_range():
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\], got range \[0.0, 255.0\]'):
    localization.check_images(np.linspace(0, 255, 2 * S * S, dtype=np.float32).reshape(2, S, S, 1))


def test_image_nan_through_load_localizer(run_dir):
  images = np.full((2, S, S, 1), 0.5, np.float32)
  images[1, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match='1 non-finite values'):
    rundir.load_localizer(run_dir)(images)


def test_image_inf():
  images = np.full((1, S, S, 1), 0.5, np.float32)
  images[0, 0, :3, 0] = np.inf
  with pytest.raises(ValueError, match=r'3 non-finite values \(NaN or inf\)'):
    localization.check_images(images)


def test_image_empty_batch(run_dir):
  with pytest.raises(ValueError, match='empty batch: images has batch size 0'):
    rundir.load_localizer(run_dir)(np.zeros((0, S, S, 1), np.float32))


# ------------------------------------------------------------------------------------------------
# Image files (sano_jax.predict; the folder builder decodes the same way: sano_jax.datasets.images).


def test_file_corrupt_jpeg_fails_before_any_output(run_dir, tmp_path):
  (tmp_path / 'in').mkdir()
  _png(tmp_path / 'in' / 'ok.png', _gray())
  (tmp_path / 'in' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(ValueError, match=r"cannot read '.*broken\.jpg' as an image"):
    predict.predict(run_dir, str(tmp_path / 'in'), str(tmp_path / 'out'), progress=False)
  assert not (tmp_path / 'out').exists()  # checked before any work or output


def test_file_truncated_png(tmp_path):
  path = _png(tmp_path / 'cut.png', np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8))
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match=r"cannot read '.*cut\.png' as an image: .*truncated"):
    predict.read_image(str(path), 1)


def test_file_truncated_jpeg_in_folder_dataset(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'cut.jpg', quality=90)
  data = (tmp_path / 'cut.jpg').read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'cannot decode image file .*cut\.jpg: .*[Tt]runcated'):
    folder.load_image(tmp_path / 'cut.jpg', S, 3)


def _png_header_only(path, width, height):
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b''))
  return path


def test_file_decompression_bomb(tmp_path):
  """Pillow's guard raises DecompressionBombError (not an OSError): now a ValueError naming the file."""
  path = _png_header_only(tmp_path / 'huge.png', 30000, 30000)
  with pytest.raises(ValueError, match=r"cannot read '.*huge\.png' as an image: Image size \(900000000"):
    predict._check_readable(str(path))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r'huge\.png.*900000000 pixels'):
    predict.read_image(str(path), 1)


def test_file_16bit_png_scaled_by_type_range(tmp_path):
  """Was per-image min-max in the folder builder (a constant image became black): now / 65535."""
  deep = np.full((S, S), 32768, np.uint16)
  deep[:, :4] = 16384
  path = _png(tmp_path / 'deep.png', deep)
  assert Image.open(path).mode.startswith('I;16')
  got = predict.read_image(str(path), 1)[..., 0]
  np.testing.assert_allclose(got, deep / 65535.0, atol=0.5 / 255 + 1e-6)
  built = folder.load_image(path, S, 1)[..., 0]
  np.testing.assert_array_equal(built, np.round(deep / 65535.0 * 255).astype(np.uint8))
  np.testing.assert_array_equal(built, np.round(got * 255).astype(np.uint8))  # train == predict


def test_file_float_tiff_scaled_by_range(tmp_path):
  arr = np.full((S, S), 0.25, np.float32)
  Image.fromarray(arr, 'F').save(tmp_path / 'f.tif')
  assert folder.load_image(tmp_path / 'f.tif', S, 1).max() == 64  # was 0 (min-max of a constant)
  np.testing.assert_allclose(predict.read_image(str(tmp_path / 'f.tif'), 1), 64 / 255)


def test_file_intensity_scale_is_one_rule_per_type_and_out_of_range_is_an_error(tmp_path):
  """A 16-bit image of 200 and one of 300 are both / 65535 (the 200 one was read as 8-bit, 200/255);
  a float image outside [0, 1] and a 32-bit integer image above 65535 are errors naming the file
  (a float image of 1.02 was divided by 255; one of 0.98 was not)."""
  for value in (200, 300):
    path = _png(tmp_path / f'dark{value}.png', np.full((S, S), value, np.uint16))
    got = predict.read_image(str(path), 1)
    np.testing.assert_allclose(got, np.round(value / 65535 * 255) / 255, atol=1e-6)
    assert folder.load_image(path, S, 1).max() == np.round(value / 65535 * 255)
  Image.fromarray(np.full((S, S), 1.02, np.float32), 'F').save(tmp_path / 'bright.tif')
  with pytest.raises(ValueError, match=r'bright\.tif is a float image .* values in \[1\.02, 1\.02\]'):
    folder.load_image(tmp_path / 'bright.tif', S, 1)
  with pytest.raises(ValueError, match=r'bright\.tif.*must lie in \[0, 1\]'):
    predict.read_image(str(tmp_path / 'bright.tif'), 1)
  Image.fromarray(np.full((S, S), 70000, np.int32), 'I').save(tmp_path / 'wide.tif')
  with pytest.raises(ValueError, match=r'wide\.tif is a 16-bit integer image .* \[70000, 70000\]'):
    folder.load_image(tmp_path / 'wide.tif', S, 1)


def test_file_cmyk_jpeg(tmp_path):
  rgb = np.zeros((S, S, 3), np.uint8)
  rgb[:8, :, 0], rgb[8:, :, 1], rgb[:, :4, 2] = 200, 180, 90
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
  assert Image.open(tmp_path / 'cmyk.jpg').mode == 'CMYK'
  got = predict.read_image(str(tmp_path / 'cmyk.jpg'), 3)
  assert np.abs(got * 255 - rgb).max() <= 8
  assert np.abs(folder.load_image(tmp_path / 'cmyk.jpg', S, 3).astype(int) - rgb).max() <= 8


def test_file_exif_rotated_photo(tmp_path):
  """A phone photo stored sideways with EXIF Orientation=6 is read upright, as viewers show it."""
  stored = np.full((S, 2 * S), 20, np.uint8)  # 16 rows x 32 columns as stored
  stored[:, :S] = 230  # left half bright
  img = Image.fromarray(stored)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  img.save(tmp_path / 'phone.jpg', exif=exif, quality=95)
  upright = np.rot90(stored, k=-1)  # 32 x 16, the bright half on top
  got = predict.read_image(str(tmp_path / 'phone.jpg'), 1)[..., 0] * 255
  assert got.shape == upright.shape
  assert np.abs(got - upright).max() < 16
  built = folder.load_image(tmp_path / 'phone.jpg', S, 1)[..., 0].astype(int)  # resized to 16x16
  assert built[:6].min() > 200 and built[-6:].max() < 50, built  # bright on top, not on the left


def test_file_alpha_composited_over_white_in_both_paths(tmp_path):
  """The folder builder dropped alpha (transparent black -> black); predict composited over white."""
  rgba = np.zeros((S, S, 4), np.uint8)
  rgba[:, :8] = (40, 40, 40, 255)  # opaque dark left half; right half fully transparent black
  path = _png(tmp_path / 'a.png', rgba, 'RGBA')
  built = folder.load_image(path, S, 3)
  np.testing.assert_array_equal(built[:, 8:], 255)
  np.testing.assert_array_equal(built[:, :8], 40)
  np.testing.assert_array_equal(np.round(predict.read_image(str(path), 3) * 255), built)


def test_file_gray_in_rgb_folder_dataset(tmp_path):
  path = _png(tmp_path / 'gray_one.png', _gray())
  with pytest.raises(ValueError, match=r'gray_one\.png has 1 channel\(s\) \(mode L\) but the '
                     r'dataset expects 3'):
    folder.load_image(path, S, 3)


# ------------------------------------------------------------------------------------------------
# The folder builder (sano_jax/datasets/folder.py): masks, subjects_csv, changed folders.


def _folders(root, *, n_normal=4, n_test=1, mask=None, mask_name='t0.png'):
  normal, test, masks = root / 'normal', root / 'test', root / 'masks'
  for d in (normal, test, masks):
    d.mkdir(exist_ok=True)
  for i in range(n_normal):
    _png(normal / f'n{i}.png', np.stack([_gray(i)] * 3, -1))
  for i in range(n_test):
    _png(test / f't{i}.png', np.stack([_gray(10 + i, 24)] * 3, -1))  # 24x24 test images
  if isinstance(mask, bytes):
    (masks / mask_name).write_bytes(mask)
  elif mask is not None:
    _png(masks / mask_name, mask)
  return normal, test, masks


def _ring(size=24):
  m = np.zeros((size, size), np.uint8)
  m[6:14, 8:18] = 255
  return m


def _build_folder(root, normal, test=None, masks=None, subjects_csv=None, channels=3):
  cfg = folder.make_config(normal_dir=normal, test_dir=test, mask_dir=masks,
                           subjects_csv=subjects_csv, image_size=S, num_channels=channels)
  builder = folder.SanoFolder(config=cfg, data_dir=str(root / 'tfds'))
  builder.download_and_prepare()
  return builder


def test_mask_missing(tmp_path):
  normal, test, masks = _folders(tmp_path, mask=_ring())
  _png(test / 'lonely.png', np.zeros((24, 24, 3), np.uint8))
  with pytest.raises(FileNotFoundError, match=r'No mask for test image .*lonely\.png'):
    _build_folder(tmp_path, normal, test, masks)


def test_mask_wrong_size(tmp_path):
  normal, test, masks = _folders(tmp_path, mask=np.zeros((24, 40), np.uint8))
  with pytest.raises(ValueError, match=r'Mask file .*t0\.png is 40x24 .* its image .*t0\.png is 24x24'):
    _build_folder(tmp_path, normal, test, masks)


def test_mask_not_binary_jpeg(tmp_path):
  """A JPEG-compressed mask has values around the edges: each nonzero one was silently anomalous."""
  buf = io.BytesIO()
  Image.fromarray(_ring()).save(buf, 'JPEG', quality=75)
  normal, test, masks = _folders(tmp_path, mask=buf.getvalue(), mask_name='t0.jpg')
  with pytest.raises(ValueError, match=r'mask .*t0\.jpg is not binary: besides 0 it holds \d+ distinct'):
    _build_folder(tmp_path, normal, test, masks)


def test_folder_test_image_equal_to_a_healthy_one(tmp_path):
  """A test image that is also in normal_dir (a defect trained on as healthy) was built silently."""
  normal, test, masks = _folders(tmp_path, mask=_ring())
  shutil.copy(test / 't0.png', normal / 'copy_of_t0.png')
  with pytest.raises(ValueError, match=r'Test image .*t0\.png is the same file as healthy image '
                                       r'.*copy_of_t0\.png'):
    _build_folder(tmp_path, normal, test, masks)


def test_folder_subjects_csv_names_that_match_no_file(tmp_path):
  """A misspelt name made its image a subject of its own without a word."""
  normal, _, _ = _folders(tmp_path)
  csv_path = tmp_path / 'subjects.csv'
  csv_path.write_text('name,subject\nn0.png,a\nn1.png,a\nn2,b\nn3.jpeg,b\nghost.png,c\n')
  with pytest.raises(ValueError, match=r'subjects\.csv: 2 name\(s\) match no image file in the '
                                       r'folders: ghost\.png, n3\.jpeg'):
    _build_folder(tmp_path, normal, subjects_csv=str(csv_path))


def test_folder_skipped_entries_are_listed(tmp_path, caplog):
  """.heic photos, notes and subfolders in normal_dir were skipped without a word."""
  normal, _, _ = _folders(tmp_path)
  (normal / 'IMG_0001.heic').write_bytes(b'not read')
  (normal / 'more').mkdir()
  (normal / '.DS_Store').write_bytes(b'')
  with caplog.at_level('WARNING'):
    assert len(folder.list_images(normal)) == 4
  assert 'skipped 2 entries that are not an image file' in caplog.text
  assert 'IMG_0001.heic, more/' in caplog.text and '.DS_Store' not in caplog.text


def test_mask_duplicate_stems(tmp_path):
  normal, test, masks = _folders(tmp_path, mask=_ring())
  _png(masks / 't0.bmp', _ring())
  with pytest.raises(ValueError, match=r"Two masks share the stem 't0' .*t0\.bmp and t0\.png"):
    _build_folder(tmp_path, normal, test, masks)


def test_folder_normal_dir_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'Image folder .*nowhere does not exist'):
    folder.make_config(normal_dir=str(tmp_path / 'nowhere'))


def test_folder_num_channels_2(tmp_path):
  normal, _, _ = _folders(tmp_path)
  with pytest.raises(ValueError, match='num_channels must be 1 or 3, got 2'):
    folder.make_config(normal_dir=normal, num_channels=2)


def test_folder_subjects_csv_wrong_columns(tmp_path):
  normal, _, _ = _folders(tmp_path)
  (tmp_path / 's.csv').write_text('file,patient\nn0.png,a\n')
  with pytest.raises(ValueError, match=r"s\.csv needs columns name,subject; it has \['file', 'patient'\]"):
    _build_folder(tmp_path, normal, subjects_csv=str(tmp_path / 's.csv'))


def test_folder_subjects_csv_conflicting_rows(tmp_path):
  """A file listed twice with two subjects: the last row silently won (it could leak across splits)."""
  normal, _, _ = _folders(tmp_path)
  (tmp_path / 's.csv').write_text('name,subject\nn0.png,a\nn1.png,b\nn0.png,c\n')
  with pytest.raises(ValueError, match=r"s\.csv, line 4: 'n0\.png' is listed again with subject 'c' "
                     r"\(earlier: 'a'\)"):
    _build_folder(tmp_path, normal, subjects_csv=str(tmp_path / 's.csv'))


def test_folder_changed_is_rebuilt(tmp_path):
  normal, _, _ = _folders(tmp_path, n_normal=4)
  first = _build_folder(tmp_path, normal)
  again = _build_folder(tmp_path, normal)
  assert again.builder_config.name == first.builder_config.name
  assert again.data_dir == first.data_dir
  _png(normal / 'n9.png', np.stack([_gray(9)] * 3, -1))
  second = _build_folder(tmp_path, normal)
  assert second.builder_config.name != first.builder_config.name
  assert second.data_dir != first.data_dir
  count = lambda b: sum(b.info.splits[s].num_examples for s in ('train', 'validation'))
  assert (count(first), count(second)) == (4, 5)
  names = {second.as_data_source(split=s)[i]['name'] for s in ('train', 'validation')
           for i in range(second.info.splits[s].num_examples)}
  assert 'n9.png' in {n.decode() if isinstance(n, bytes) else str(n) for n in names}


# ------------------------------------------------------------------------------------------------
# 11k Hands (tfds_11k_hands/hands11k.py) on copies of its dummy data.


def _hands():
  from tfds_11k_hands import hands11k  # pylint: disable=g-import-not-at-top
  return hands11k


def _manual(tmp_path):
  dst = tmp_path / 'manual'
  shutil.copytree(_hands().Hands11k.code_path.parent / 'dummy_data', dst)
  return dst


def _build_hands(manual, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _hands().Hands11k(config=str(S), data_dir=str(tmp_path / 'data'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _csv_lines(manual):
  return (manual / 'HandInfo.csv').read_text().splitlines()


def test_handinfo_missing(tmp_path):
  manual = _manual(tmp_path)
  (manual / 'HandInfo.csv').unlink()
  with pytest.raises(FileNotFoundError, match=r'Missing .*HandInfo\.csv'):
    _build_hands(manual, tmp_path)


def test_handinfo_wrong_columns(tmp_path):
  manual = _manual(tmp_path)
  lines = _csv_lines(manual)
  lines[0] = lines[0].replace('imageName', 'image_name')
  (manual / 'HandInfo.csv').write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r"HandInfo\.csv lacks column\(s\) \['imageName'\]"):
    _build_hands(manual, tmp_path)


def test_handinfo_duplicate_image_rows(tmp_path):
  """The same image listed twice (e.g. under two ids): was an opaque TFDS duplicate-key error, or
  one image in two splits. Repeated ids alone are normal (one subject, many images)."""
  manual = _manual(tmp_path)
  lines = _csv_lines(manual)
  dup = lines[3].replace('1,21,male', '7,21,male', 1)  # Hand_0000003.jpg again, another subject
  (manual / 'HandInfo.csv').write_text('\n'.join(lines + [dup]) + '\n')
  with pytest.raises(ValueError, match=r'line 27: imageName Hand_0000003\.jpg is listed twice '
                     r'\(also on line 4\)'):
    _build_hands(manual, tmp_path)


def test_handinfo_bad_value(tmp_path):
  manual = _manual(tmp_path)
  lines = _csv_lines(manual)
  lines[5] = lines[5].replace(',22,', ',twenty-two,', 1)
  (manual / 'HandInfo.csv').write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r"HandInfo\.csv, line 6: bad value .*'twenty-two'"):
    _build_hands(manual, tmp_path)


def test_hands_zip_not_a_zip(tmp_path):
  manual = _manual(tmp_path)
  shutil.rmtree(manual / 'Hands')
  (manual / 'Hands.zip').write_bytes(b'PK\x03\x04 this download was cut off')
  with pytest.raises(ValueError, match=r'Hands\.zip is not a valid zip file'):
    _build_hands(manual, tmp_path)


def test_hands_zip_damaged_member(tmp_path):
  """A zip whose directory is intact but one member's bytes are damaged: was a bare BadZipFile."""
  manual = _manual(tmp_path)
  with zipfile.ZipFile(manual / 'Hands.zip', 'w', zipfile.ZIP_STORED) as zf:
    for p in sorted((manual / 'Hands').iterdir()):
      zf.write(p, 'Hands/' + p.name)
  shutil.rmtree(manual / 'Hands')
  data = bytearray((manual / 'Hands.zip').read_bytes())
  with zipfile.ZipFile(manual / 'Hands.zip') as zf:
    info = zf.getinfo('Hands/Hand_0000001.jpg')
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
  data[start + 100:start + 120] = bytes(20)
  (manual / 'Hands.zip').write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r'Cannot read .*Hands\.zip:Hands/Hand_0000001\.jpg: the zip '
                     r'file is damaged .*CRC'):
    _build_hands(manual, tmp_path)


def test_hands_rgba_masks(tmp_path):
  """RGBA masks: transparent = healthy. Dropping alpha made a mask drawn opaque over a transparent
  WHITE background all jewelry, and a mask drawn in the alpha channel only all healthy."""
  manual = _manual(tmp_path)
  expected = {}
  for stem, kind in (('Hand_0000021', 'over_white'), ('Hand_0000022', 'alpha_only')):
    ring = np.asarray(Image.open(manual / 'masks' / f'{stem}.png')) > 0
    rgba = np.zeros(ring.shape + (4,), np.uint8)
    rgba[..., 3] = np.where(ring, 255, 0)
    if kind == 'over_white':
      rgba[..., :3] = 255
    _png(manual / 'masks' / f'{stem}.png', rgba, 'RGBA')
    small = Image.fromarray(ring.astype(np.uint8) * 255).resize((S, S), Image.NEAREST)
    expected[f'{stem}.jpg'] = np.asarray(small) > 0
  test = _build_hands(manual, tmp_path).as_data_source(split='test')
  seen = 0
  for i in range(len(test)):
    ex = test[i]
    name = ex['name'].decode() if isinstance(ex['name'], bytes) else str(ex['name'])
    if name in expected:
      np.testing.assert_array_equal(ex['mask'][..., 0] > 0, expected[name], err_msg=name)
      assert 0 < expected[name].mean() < 0.5
      seen += 1
  assert seen == 2


def test_hands_mask_not_binary(tmp_path):
  manual = _manual(tmp_path)
  m = np.zeros((30, 40), np.uint8)
  m[10:20, 10:20], m[12:14, 12:14] = 255, 128  # an anti-aliased / two-label mask
  _png(manual / 'masks' / 'Hand_0000023.png', m)
  with pytest.raises(ValueError, match=r'mask .*Hand_0000023\.png is not binary: besides 0 it holds '
                     r'2 distinct values \(128, 255\)'):
    _build_hands(manual, tmp_path)


def test_hands_not_prepared_without_manual_dir(tmp_path):
  from sano_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'data.dataset': 'hands11k', 'data.num_channels': 3})
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r'hands11k/16 is not prepared .* config\.data\.manual_dir '
                     'is not set'):
    input_pipeline.get_source(config, 'train')


# ------------------------------------------------------------------------------------------------
# Configs (train.check_config, input_pipeline, run_train.py flags).


def _cli(script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_config_unknown_key_in_override(tmp_path):
  proc = _cli('run_train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}/w',
              '--config.training.bogus_key=3')
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert 'training.bogus_key' in out and 'Traceback' not in out, out


def test_config_negative_lr():
  with pytest.raises(ValueError, match=r'optim\.lr=-0\.001'):
    train.check_config(tiny_config(**{'optim.lr': -1e-3}), 1)


def test_config_negative_warmup():
  with pytest.raises(ValueError, match=r'optim\.warmup_steps=-5 must be >= 0'):
    train.check_config(tiny_config(**{'optim.warmup_steps': -5}), 1)


def test_config_negative_grad_clip():
  with pytest.raises(ValueError, match=r'optim\.grad_clip=-1\.0 must be >= 0'):
    train.check_config(tiny_config(**{'optim.grad_clip': -1.0}), 1)
  train.check_config(tiny_config(**{'optim.grad_clip': 0.0, 'optim.warmup_steps': 0}), 1)  # off


@pytest.mark.parametrize('overrides,match', [
    ({'training.t_sampling': 'loguniform'}, r"training\.t_sampling must be one of .*'loguniform'"),
    ({'training.t_sampling_min': 0.0}, r'training\.t_sampling_min, else sde\.eps\) must lie in \(0, 1\), got 0\.0'),
    ({'training.t_sampling_min': None, 'sde.eps': 1.5}, r'must lie in \(0, 1\), got 1\.5')])
def test_config_bad_training_t_law_fails_when_the_method_is_built(overrides, match):
  """A typo in the training-t law is an error when the method is created from the config (before
  any data is read or a step is traced), naming the key and the value."""
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    methods.create(tiny_config(**overrides))


def test_config_batch_not_divisible_by_devices():
  with pytest.raises(ValueError, match=r'training\.batch_size=6 is not divisible by the 4 devices'):
    train.check_config(tiny_config(**{'training.batch_size': 6}), 4)


def test_config_image_size_not_divisible_by_levels():
  with pytest.raises(ValueError, match=r'data\.image_size=17 is not divisible by 2\^1'):
    train.check_config(tiny_config(**{'data.image_size': 17}), 1)


def test_config_crop_larger_than_image():
  with pytest.raises(ValueError, match=r'data\.crop_size=24 must lie in \(0, data\.image_size=16\]'):
    train.check_config(tiny_config(**{'data.crop_size': 24}), 1)


def test_config_tile_not_larger_than_overlap():
  with pytest.raises(ValueError, match=r'localize\.tile_size=16 .* exceed localize\.tile_overlap=16'):
    train.check_config(tiny_config(**{'localize.tile_size': 16, 'localize.tile_overlap': 16}), 1)


def test_config_unknown_dataset(tmp_path):
  from sano_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'data.dataset': 'no_such_dataset'})
  config.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"config\.data\.dataset='no_such_dataset' .* is not a known "
                     'TFDS dataset'):
    input_pipeline.get_source(config, 'train')


# ------------------------------------------------------------------------------------------------
# Workdirs (load_localizer, predict, train_and_evaluate).


def test_workdir_empty(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.json not found: .*empty' is not a sano-jax "
                     'run directory'):
    rundir.load_localizer(str(tmp_path / 'empty'))


def test_workdir_config_but_no_checkpoint(tmp_path):
  wd = str(tmp_path / 'fresh')
  checkpointing.save_config(tiny_config(), wd)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in '.*fresh' \(looked in best/ and "
                     r'checkpoints/\)'):
    rundir.load_localizer(wd)


def test_workdir_without_score_stats(run_dir, tmp_path):
  wd = _copy_run(run_dir, tmp_path)
  os.remove(os.path.join(wd, rundir.MANIFEST))
  with pytest.raises(FileNotFoundError, match=r'no inference bundle .*inference\.json.*not evaluated '
                     r'yet; rerun run_eval\.py --workdir='):
    rundir.load_localizer(wd)


def test_workdir_other_models_checkpoint_when_training(run_dir, tmp_path):
  wd = _copy_run(run_dir, tmp_path)
  with pytest.raises(ValueError, match=r'holds a checkpoint of a different model \(nf: checkpoint 8 '
                     r'vs config 16\)'):
    train.train_and_evaluate(tiny_config(**{'model.nf': 16}), wd, train_source=[0], val_source=[0])


def test_workdir_other_models_checkpoint_at_inference(run_dir, tmp_path):
  wd = _copy_run(run_dir, tmp_path)
  checkpointing.save_config(tiny_config(**{'model.nf': 16}), wd)  # config.json of another model
  with pytest.raises(ValueError, match=r'config\.json'):
    rundir.load_localizer(wd)(np.full((1, S, S, 1), 0.5, np.float32))


def test_workdir_stats_of_another_image_size(run_dir, tmp_path):
  wd = _copy_run(run_dir, tmp_path)
  other = random_run_dir(str(tmp_path / 'other8'), tiny_config(), stats_size=8)
  shutil.rmtree(os.path.join(wd, rundir.PARTS_DIR))
  shutil.copytree(os.path.join(other, rundir.PARTS_DIR), os.path.join(wd, rundir.PARTS_DIR))
  shutil.copy(os.path.join(other, rundir.MANIFEST), os.path.join(wd, rundir.MANIFEST))
  with pytest.raises(ValueError, match=r'stats-.*\.npz was fitted on 8x8x1 images.*16x16x1'):
    rundir.load_localizer(wd)


def test_workdir_damaged_score_stats(run_dir, tmp_path):
  wd = _copy_run(run_dir, tmp_path)
  part = rundir.read_manifest(wd)['parts']['stats']['file']
  with open(os.path.join(wd, part), 'wb') as f:
    f.write(b'not an npz file')
  with pytest.raises(ValueError, match=r'stats-.*\.npz is damaged \(its sha256'):
    rundir.load_localizer(wd)


# ------------------------------------------------------------------------------------------------
# CLI flags (run_eval.py, run_train.py, python -m sano_jax.predict).


def test_cli_run_eval_without_workdir():
  proc = _cli('run_eval.py')
  assert proc.returncode != 0
  assert 'Flag --workdir must have a value other than None' in proc.stderr


def test_cli_run_train_without_config(tmp_path):
  proc = _cli('run_train.py', f'--workdir={tmp_path}/w')
  assert proc.returncode != 0
  assert 'Flag --config must have a value other than None' in proc.stderr


def test_cli_predict_glob_matches_nothing(run_dir, tmp_path, capsys):
  assert predict.main([f'--workdir={run_dir}', f'--images={tmp_path}/none*.png',
                       f'--out={tmp_path}/o']) == 1
  err = capsys.readouterr().err
  assert "error: no image file matches '" in err and 'none*.png' in err


def test_cli_predict_without_workdir(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main([f'--images={tmp_path}/*.png', f'--out={tmp_path}/o'])
  assert e.value.code == 2
  assert 'error: flag --workdir=None: Flag --workdir must have a value other than None' in \
      capsys.readouterr().err


def test_cli_predict_on_empty_workdir(tmp_path, capsys):
  (tmp_path / 'in').mkdir()
  _png(tmp_path / 'in' / 'x.png', _gray())
  (tmp_path / 'wd').mkdir()
  assert predict.main([f'--workdir={tmp_path}/wd', f'--images={tmp_path}/in',
                       f'--out={tmp_path}/o']) == 1
  assert 'is not a sano-jax run directory' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Not a row: the import circle between sano_jax.datasets and the builders is gone (issue 9).


def test_builders_import_without_the_package_circle():
  code = ('import sys; import tfds_11k_hands.hands11k; import sano_jax.datasets.splits as s; '
          'from sano_jax.datasets import split_subjects, hide_gpus_from_tf; '
          'assert split_subjects is s.split_subjects and hide_gpus_from_tf is s.hide_gpus_from_tf; '
          'print("ok")')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr
  code = ('import sys; import sano_jax.datasets.splits; '
          "print(sorted(m for m in sys.modules if m.startswith(('sano_jax', 'tfds_11k_hands', "
          "'tensorflow'))))")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.stdout.strip() == "['sano_jax', 'sano_jax.datasets', 'sano_jax.datasets.splits']", (
      proc.stdout, proc.stderr)
