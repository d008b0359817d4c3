"""sano_jax.files and the modules that use it, on a local folder and on a fake gs:// bucket.

The bucket (`fake_gcs` fixture, tests/fake_gcs.py) is reached only through gs:// URIs, refuses
appends and renames by copy + delete, as an object store does; Orbax writes to it too.
"""
import json
import os

from etils import epath
import numpy as np
import pytest

from sano_jax import files


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path):
  """A run-directory URI: a local folder, or a folder of the fake bucket."""
  if request.param == 'local':
    return str(tmp_path / 'run')
  return request.getfixturevalue('fake_gcs').url('run')


def test_fake_bucket_is_not_reachable_without_epath(fake_gcs):
  url = fake_gcs.url('run', 'x.json')
  files.atomic_write_json(url, {'a': 1})
  assert files.exists(url) and os.path.exists(fake_gcs.local(url))
  assert not os.path.exists(url)
  with pytest.raises(OSError):
    open(url, encoding='utf-8')  # pylint: disable=consider-using-with
  with pytest.raises(NotImplementedError, match='append'):
    epath.Path(url).open('a')


def test_atomic_writes_round_trip(root):
  files.atomic_write_text(files.path(root) / 'a.txt', 'first')
  files.atomic_write_text(os.path.join(root, 'a.txt'), 'second, longer')
  files.atomic_write_json(os.path.join(root, 'sub', 'b.json'), {'x': [1, 2.5, None]})
  files.atomic_write_bytes(os.path.join(root, 'c.bin'), b'\x00\xff' * 3)
  assert files.read_text(os.path.join(root, 'a.txt')) == 'second, longer'
  assert files.read_json(os.path.join(root, 'sub', 'b.json')) == {'x': [1, 2.5, None]}
  assert files.read_bytes(os.path.join(root, 'c.bin')) == b'\x00\xff' * 3
  assert files.listdir(root) == ['a.txt', 'c.bin', 'sub']  # no temporary sibling left
  assert files.isdir(os.path.join(root, 'sub')) and not files.isfile(os.path.join(root, 'sub'))
  assert files.isfile(os.path.join(root, 'c.bin')) and not files.isdir(os.path.join(root, 'c.bin'))
  assert files.stat(os.path.join(root, 'c.bin'))[0] == 6


def test_a_write_failing_midway_leaves_the_old_file_and_no_partial_one(root, monkeypatch):
  target = os.path.join(root, 'metrics.json')
  files.atomic_write_json(target, {'old': True})
  real_open = type(epath.Path(root)).open

  class HalfWriter:
    """Writes half of what it is given, then fails (a full disk, a dropped connection)."""

    def __init__(self, f):
      self.f = f

    def write(self, data):
      self.f.write(data[:len(data) // 2])
      raise OSError('simulated failure mid-write')

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

  def failing_open(self, mode='r', **kwargs):
    f = real_open(self, mode, **kwargs)
    return HalfWriter(f) if 'w' in mode else f

  with monkeypatch.context() as m:
    m.setattr(type(epath.Path(root)), 'open', failing_open)
    with pytest.raises(OSError, match='mid-write'):
      files.atomic_write_json(target, {'new': list(range(100))})
  assert files.read_json(target) == {'old': True}
  assert files.listdir(root) == ['metrics.json']


def test_missing_and_malformed_files_are_named(root):
  missing = os.path.join(root, 'config.json')
  with pytest.raises(FileNotFoundError, match=r'config\.json not found: train it first'):
    files.read_json(missing, 'train it first')
  files.atomic_write_text(missing, '{"truncated": ')
  with pytest.raises(ValueError, match=r'config\.json is not valid JSON'):
    files.read_json(missing)
  files.atomic_write_bytes(os.path.join(root, 's.npz'), b'PK\x03\x04 not a zip')
  with pytest.raises(ValueError, match=r's\.npz is not a readable \.npz'):
    files.load_npz(os.path.join(root, 's.npz'))


def test_every_file_read_retries_a_storage_error_and_raises_it_when_it_persists(root, monkeypatch):
  """A timeout or an HTTP 503 on a read (a bucket, a network disk) is retried with backoff, then
  raised as TransientReadError naming the file; a missing file is not retried. The inference
  bundle, config.json and metrics read through here."""
  target = os.path.join(root, 'inference.json')
  files.atomic_write_json(target, {'step': 3})
  real, calls, fail = epath.Path.read_bytes, [], {'n': 2, 'error': TimeoutError('read timed out')}

  def flaky(self, *a, **kw):
    calls.append(str(self))
    if len(calls) <= fail['n']:
      raise fail['error']
    return real(self, *a, **kw)
  monkeypatch.setattr(epath.Path, 'read_bytes', flaky)
  monkeypatch.setattr(files, 'BACKOFF_S', 0.0)
  assert files.read_json(target) == {'step': 3} and len(calls) == 3
  calls.clear()
  fail.update(n=100, error=OSError('HTTP 503 Service Unavailable'))
  with pytest.raises(files.TransientReadError, match=r'inference\.json failed 4 times with a '
                     r'storage error \(OSError: HTTP 503'):
    files.read_json(target)
  assert len(calls) == files.RETRIES + 1
  calls.clear()
  fail.update(n=0)
  with pytest.raises(FileNotFoundError, match='not found'):
    files.read_bytes(os.path.join(root, 'absent.npz'))
  assert len(calls) == 1


def test_npz_round_trip(root):
  arrays = {'mean': np.float32(0.25), 'std': np.arange(6, dtype=np.float64).reshape(2, 3),
            'hist': np.array([1, 0, 7], np.int64)}
  path = os.path.join(root, 'score_stats.npz')
  files.save_npz(path, **arrays)
  got = files.load_npz(path)
  assert sorted(got) == sorted(arrays)
  for k, v in arrays.items():
    assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], v)


def test_listing_glob_copytree_and_removal(root):
  for name in ('1', '20', 'eval'):
    files.atomic_write_text(os.path.join(root, name, 'f.txt'), name)
  files.atomic_write_text(os.path.join(root, 'a.png'), '')
  assert files.listdir(root) == ['1', '20', 'a.png', 'eval']
  assert files.listdir(os.path.join(root, 'absent')) == []
  assert [os.path.basename(p) for p in files.glob(os.path.join(root, '*', 'f.txt'))] == ['f.txt'] * 3
  assert files.glob(os.path.join(root, '*.png')) == [os.path.join(root, 'a.png')]
  copy = root + '_copy'
  files.copytree(root, copy, ignore=('eval',))
  assert files.listdir(copy) == ['1', '20', 'a.png']
  assert files.read_text(os.path.join(copy, '20', 'f.txt')) == '20'
  files.rmtree(copy)
  files.rmtree(copy)  # gone already: nothing
  files.remove(os.path.join(root, 'a.png'))
  files.remove(os.path.join(root, 'a.png'))
  assert not files.exists(copy) and files.listdir(root) == ['1', '20', 'eval']


def test_figures_and_pngs(root):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sano_jax import curves  # pylint: disable=g-import-not-at-top
  plt = curves.pyplot()
  fig, ax = plt.subplots(figsize=(2, 2))
  ax.plot([0, 1], [1, 0])
  curves.save_figure(fig, os.path.join(root, 'figures', 'roc.png'))
  plt.close(fig)
  files.save_png(Image.new('L', (5, 3), 255), os.path.join(root, 'm.png'))
  from sano_jax.datasets import images  # pylint: disable=g-import-not-at-top
  assert images.open_image(os.path.join(root, 'figures', 'roc.png')).size == (200, 200)
  assert np.asarray(images.open_image(os.path.join(root, 'm.png'))).min() == 255
  assert files.listdir(os.path.join(root, 'figures')) == ['roc.png']


def test_line_appender_resumes_across_writers(root):
  path = os.path.join(root, 'metrics.jsonl')
  first = files.LineAppender(path)
  first.append('{"step": 1}')
  assert files.read_text(path) == '{"step": 1}\n'  # visible at once, not at close
  first.append('{"step": 2}\n')
  first.close()
  second = files.LineAppender(path)  # a resumed run
  second.append('{"step": 3}')
  second.close()
  assert files.read_text(path).splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3}']
  assert files.listdir(root) == ['metrics.jsonl']


def test_training_metrics_log_on_the_bucket(fake_gcs, monkeypatch):
  import fake_gcs as fake_gcs_lib  # pylint: disable=g-import-not-at-top
  from sano_jax import compare, summaries  # pylint: disable=g-import-not-at-top
  reads = []
  def counting_open(fs, path, mode='rb', **kwargs):
    if 'r' in mode and str(path).endswith('metrics.jsonl'):
      reads.append(path)
    return open_(fs, path, mode, **kwargs)
  open_ = fake_gcs_lib.FakeGcsFileSystem.open
  monkeypatch.setattr(fake_gcs_lib.FakeGcsFileSystem, 'open', counting_open)
  workdir = fake_gcs.url('run')
  for steps in ((1, 2), (3,)):  # a run, then its resumption
    reads.clear()
    log = summaries.MetricsLog(workdir, enabled=True, start_step=steps[0] - 1)  # its checkpoint
    assert len(reads) == (steps[0] > 1)  # the resumed run downloads the file once, not twice
    assert log.writer is None  # TensorBoard would go to the real GCS: the fixture turns it off
    for step in steps:
      log.write(step, {'loss': 1.0 / step, 'perf/images_per_s': 10.0 * step, 'perf/wall_s': step})
    log.close()
  rows = [json.loads(line) for line in files.read_text(workdir + '/metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert compare.training_summary(workdir) == {'train_images_per_s': 20.0, 'train_seconds': 3.0}


def test_config_json_and_checkpoints_on_the_bucket(fake_gcs):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sano_jax import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = fake_gcs.url('run')
  with pytest.raises(FileNotFoundError, match='not a sano-jax run directory'):
    checkpointing.load_config(workdir)
  config = ml_collections.ConfigDict({'method': 'sano', 'data': {'image_size': 16}})
  checkpointing.save_config(config, workdir)
  assert checkpointing.load_config(workdir).to_dict() == config.to_dict()

  state = {'w': jnp.arange(4.0), 'b': jnp.ones((2, 3))}
  store = checkpointing.CheckpointStore(workdir, keep=2)
  for step in (1, 2, 3):
    store.save(step, {k: v + step for k, v in state.items()})
  store.close()
  assert files.listdir(workdir + '/checkpoints') == ['2', '3']
  # Orbax saw a gs:// path: it marks a finished checkpoint with a commit file instead of renaming
  # a temporary folder (an object store has no atomic rename).
  assert files.exists(workdir + '/checkpoints/3/commit_success.txt')
  store = checkpointing.CheckpointStore(workdir, keep=2)
  restored = store.restore_latest(state)
  store.close()
  np.testing.assert_array_equal(restored['w'], np.arange(4.0) + 3)
  np.testing.assert_array_equal(restored['b'], np.ones((2, 3)) + 3)


def test_user_folders_on_the_bucket(fake_gcs):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sano_jax import predict  # pylint: disable=g-import-not-at-top
  from sano_jax.datasets import folder  # pylint: disable=g-import-not-at-top
  normal = fake_gcs.url('data', 'normal')
  for i, name in enumerate(('a.png', 'b.png', 'notes.txt')):
    files.save_png(Image.new('RGB', (8, 6), (i * 60, 0, 0)), f'{normal}/{name}')
  csv_url = fake_gcs.url('data', 'subjects.csv')
  files.atomic_write_text(csv_url, '\ufeffname,subject\r\na.png,s1\r\nb,s2\r\n')
  assert [p.name for p in folder.list_images(normal)] == ['a.png', 'b.png']
  assert folder._read_subjects(csv_url) == {'a.png': 's1', 'b': 's2'}  # pylint: disable=protected-access
  image = folder.load_image(folder.list_images(normal)[1], 4, 3)
  assert image.shape == (4, 4, 3) and image[..., 0].min() == 60
  config = folder.make_config(normal_dir=normal, subjects_csv=csv_url, image_size=4)
  assert config.normal_dir == normal  # URIs are kept, not made "absolute" local paths
  files.save_png(Image.new('RGB', (8, 6)), f'{normal}/c.png')
  assert folder.make_config(normal_dir=normal, subjects_csv=csv_url, image_size=4).name != config.name
  assert predict.find_images(normal) == [f'{normal}/{n}' for n in ('a.png', 'b.png', 'c.png')]
  assert predict.find_images(f'{normal}/[ab].png') == [f'{normal}/a.png', f'{normal}/b.png']


def test_evaluation_files(root):
  """The inference bundle (manifest and statistics part; a re-evaluation replaces the part), a
  subjects_csv's group columns, and the workdir checks of run_eval.py, on a local folder and in the
  bucket."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sano_jax import evaluate, groups, report, rundir, score_stats  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  fit = lambda: score_stats.fit_score_stats(lambda x: x - jnp.mean(x),
                                             [rng.uniform(size=(2, 8, 8, 1))],
                                             smoothing_sigma=1.0, num_bins=64)
  stats = fit()
  with pytest.raises(FileNotFoundError, match='no inference bundle .*not evaluated yet'):
    rundir.read_manifest(root)
  config = tiny_config(**{'data.image_size': 8})
  manifest = rundir.save(root, config=config, stats=stats, step=7, calibration={
      't': [0.01], 'rule': 'global', 'n_sigma': 3.0, 'smoothing_sigma': 2.0, 'seconds': 3.0})
  assert rundir.read_manifest(root) == manifest
  assert manifest['step'] == 7 and manifest['image_shape'] == [8, 8, 1]
  part = os.path.join(root, manifest['parts']['stats']['file'])
  back = rundir.stats_from_bytes(files.read_bytes(part), part)
  assert back.image_shape == stats.image_shape and back.smoothing_sigma == 1.0
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(back),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  second = rundir.save(root, config=config, stats=fit(), step=8)
  assert second['parts'] != manifest['parts'] and second['calibration'] is None
  assert files.listdir(os.path.join(root, rundir.PARTS_DIR)) == [
      os.path.basename(second['parts']['stats']['file'])]  # the replaced part is deleted

  csv_path = os.path.join(root, 'subjects.csv')
  files.atomic_write_text(csv_path, '\ufeffname,subject,site\r\na.png,s1,x\r\nb.png,s2,\r\n')
  assert groups.read_csv_attributes(csv_path) == (
      ('site',), {'a.png': {'site': 'x'}, 'b.png': {'site': groups.MISSING}})

  with pytest.raises(FileNotFoundError, match='does not exist: train first'):
    evaluate._check_workdir(os.path.join(root, 'absent'))  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    evaluate._check_workdir(root)  # pylint: disable=protected-access
  for name in ('checkpoints/3/x', 'checkpoints/12/x', 'best/7/x', 'best/7.orbax-tmp/x'):
    files.atomic_write_text(os.path.join(root, name), '')
  evaluate._check_workdir(root)  # pylint: disable=protected-access
  if not files.is_local(root):  # TensorBoard cannot reach the fake bucket: skipped, nothing written
    assert not report.write_summaries(os.path.join(root, 'eval', 'tensorboard'), 7, {'a': 1.0}, {})
    assert not files.exists(os.path.join(root, 'eval'))
