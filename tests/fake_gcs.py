"""A fake `gs://` for tests: every `gs://BUCKET/KEY` that etils.epath or Orbax touches lives under a
local folder, reached only through gs:// URIs, with an object store's semantics where they differ.

No network and no emulator: epath's fsspec backend (the one it uses for gs:// without TensorFlow)
is pointed at `FakeGcsFileSystem`, and Orbax's TensorStore kvstore for gs:// at TensorStore's
`file` driver on the same folder, so that checkpoints written by Orbax and the files written by
`sano_jax.files` are the same bytes. What it makes object-store-like:

* no append: opening a file in mode 'a' raises (gcsfs refuses it too), so code that appends must
  rewrite the object;
* rename is a copy then a delete, not an atomic rename (on GCS a "rename" is exactly that);
* code that bypasses epath (`open`, `os.path.*`, `os.makedirs`, `np.save` on the URI string) cannot
  reach these files: it fails, or writes a stray local `gs:` folder, which `FakeGcs.stray` reports.

Orbax asks the real GCS API (google-cloud-storage) whether a bucket has a hierarchical namespace
before listing steps; the fake answers no (a flat bucket, as most are).

What it cannot fake: TensorFlow's own gfile (TensorBoard event files, TFDS builders) speaks real
gs:// natively; `install` makes `flax.metrics.tensorboard` unimportable so that no writer tries the
network (the project's code then skips TensorBoard summaries, as without TensorFlow).
"""
from __future__ import annotations

import dataclasses
import os
import sys

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PREFIX = 'gs://'


class FakeGcsFileSystem(DirFileSystem):
  """`gs://bucket/key` -> ROOT/bucket/key on local disk; no append; rename = copy + delete."""

  protocol = ('gs', 'gcs')
  cachable = False

  def __init__(self, root: str):
    super().__init__(path=root, fs=LocalFileSystem())

  @classmethod
  def _strip_protocol(cls, path):
    if isinstance(path, list):
      return [cls._strip_protocol(p) for p in path]
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip('/')

  def open(self, path, mode='rb', **kwargs):  # pylint: disable=arguments-differ
    if 'a' in mode:
      raise NotImplementedError(f'{path}: an object store cannot append (mode {mode!r})')
    return super().open(path, mode, **kwargs)

  def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
    self.copy(path1, path2, recursive=recursive, maxdepth=maxdepth)
    self.rm(path1, recursive=recursive)

  rename = mv


@dataclasses.dataclass
class FakeGcs:
  """An installed fake: `url(key)` is a gs:// URI, `local(url)` the file that holds it."""

  root: str
  bucket: str = 'sano-test-bucket'

  def url(self, *keys: str) -> str:
    return PREFIX + '/'.join((self.bucket,) + keys)

  def local(self, url: str) -> str:
    assert url.startswith(PREFIX), url
    return os.path.join(self.root, url[len(PREFIX):])

  def stray(self, cwd: str) -> list[str]:
    """Local paths that code bypassing epath made from a gs:// string ('gs:' folders)."""
    return [os.path.join(d, n) for d, dirs, _ in os.walk(cwd) for n in dirs if n == 'gs:']


def install(monkeypatch, root: str) -> FakeGcs:
  """Routes every gs:// URI of epath and Orbax to `root` for the duration of a test."""
  from etils.epath import backend as backend_lib  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  os.makedirs(root, exist_ok=True)
  fs = FakeGcsFileSystem(root)

  class _Backend(backend_lib._FileSystemSpecBackend):  # pylint: disable=protected-access
    def fs(self, path):
      if not os.fspath(path).startswith(PREFIX):
        raise ValueError(f'the fake gs:// backend got a non-gs:// path {path!r}')
      return fs

  # pylint: disable-next=protected-access
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', _Backend())
  # With TensorFlow installed, epath sends gs:// to tf.io.gfile (real GCS): not here.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)

  try:  # Orbax: TensorStore's file driver on the same folder; a flat bucket (no HNS API calls).
    from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    gcs_utils = None
  if gcs_utils is not None:
    def kvstore(ckpt_path: str) -> dict:
      bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
      return {'driver': 'file', 'path': os.path.join(root, bucket, key)}
    monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', kvstore)
    monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)

  # TensorBoard's writer goes through TensorFlow's gfile, which would reach for the real GCS.
  monkeypatch.setitem(sys.modules, 'flax.metrics.tensorboard', None)
  flax_metrics = sys.modules.get('flax.metrics')
  if flax_metrics is not None:
    monkeypatch.delattr(flax_metrics, 'tensorboard', raising=False)
  return FakeGcs(root)
