"""Reading and writing files of a workdir or data dir through etils.epath: local paths and gs://
(s3://, az://, hf://) alike, as Orbax and TFDS do.

Every path argument is a str, os.PathLike or epath.Path; local paths behave as with `open`/`os`.
Writes that a killed run must not leave half done (`atomic_write_*`, `save_npz`, `save_figure`,
`save_png`) go to a temporary sibling, then are renamed over the target. Locally the rename is
atomic (`os.replace`): a reader sees the old file or the new one, never a part. On an object store
(GCS, S3) a rename is a copy then a delete: a reader still sees the old object or the complete
new one (objects are written whole). A run killed before the rename is done (anywhere) may leave
the temporary sibling `NAME.tmpPID` behind: nothing reads it.

String paths: `os.path.join` and `os.path.basename` are right for URIs too (posix); `absolute`
replaces `os.path.abspath`, which turns 'gs://b/x' into '/cwd/gs:/b/x'.
"""
from __future__ import annotations

import glob as glob_lib
import io
import json
import os
import re
import time
from typing import Any

from absl import logging
from etils import epath

# The URI prefixes that etils.epath sends to a remote backend; anything else is a local path.
REMOTE_PREFIXES = ('gs://', 's3://', 'az://', 'hf://')


def path(p: epath.PathLike) -> epath.Path:
  return epath.Path(p)


def is_local(p: epath.PathLike) -> bool:
  return not os.fspath(p).startswith(REMOTE_PREFIXES)


def absolute(p: epath.PathLike) -> str:
  """`os.path.abspath` for a local path; a URI unchanged."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def exists(p: epath.PathLike) -> bool:
  return epath.Path(p).exists()


def isdir(p: epath.PathLike) -> bool:
  return epath.Path(p).is_dir()


def isfile(p: epath.PathLike) -> bool:
  return epath.Path(p).is_file()


def listdir(p: epath.PathLike) -> list[str]:
  """The names in a directory, sorted; [] when it does not exist."""
  d = epath.Path(p)
  if not d.is_dir():
    return []
  return sorted(c.name for c in d.iterdir())


def glob(pattern: epath.PathLike) -> list[str]:
  """Sorted paths matching a glob (`*`, `?`, `[...]`; `~` and recursive `**` for local paths only:
  on a bucket each `**` level would be a listing request)."""
  pattern = os.fspath(pattern)
  if is_local(pattern):
    return sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True))
  parts = pattern.split('/')
  first = next((i for i, part in enumerate(parts) if glob_lib.has_magic(part)), None)
  if first is None:
    return [pattern] if exists(pattern) else []
  base = epath.Path('/'.join(parts[:first]))
  return sorted(os.fspath(m) for m in base.glob('/'.join(parts[first:])))


def copytree(src: epath.PathLike, dst: epath.PathLike, ignore: tuple[str, ...] = ()) -> None:
  """Copies a directory tree file by file (a bucket has no directory copy), skipping the names in
  `ignore` at every level; `dst` is created, existing files in it are overwritten."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    if child.name in ignore:
      continue
    if child.is_dir():
      copytree(child, dst / child.name, ignore)
    else:
      child.copy(dst / child.name, overwrite=True)


def makedirs(p: epath.PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def remove(p: epath.PathLike) -> None:
  """Deletes a file; nothing if it does not exist."""
  epath.Path(p).unlink(missing_ok=True)


def rmtree(p: epath.PathLike) -> None:
  """Deletes a directory and everything in it; nothing if it does not exist."""
  d = epath.Path(p)
  if d.exists():
    d.rmtree(missing_ok=True)


def stat(p: epath.PathLike) -> tuple[int, int]:
  """(size in bytes, modification time in ns): exact for a local file (os.stat); on an object
  store, what it reports (whole seconds)."""
  if is_local(p):
    st = os.stat(p)
    return st.st_size, st.st_mtime_ns
  st = epath.Path(p).stat()
  return int(st.length), int(st.mtime) * 10**9


# A read that fails with one of these (or a message naming one) says nothing about the file:
# it is retried RETRIES times with exponential backoff, then raised: never taken for damage
# (checkpointing moves aside only a checkpoint that fails with another error).
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)
_TRANSIENT_MESSAGE = re.compile(
    r'timed out|timeout|deadline exceeded|unavailable|temporarily|connection (reset|aborted|refused)'
    r'|too many requests|rate limit|try again|\b(http|status|code)\W{0,3}(429|50[0234])\b')
RETRIES = 3
BACKOFF_S = 1.0


def is_transient(e: BaseException) -> bool:
  """True for errors of the storage or the network, not of the file's bytes."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, _TRANSIENT_TYPES) or _TRANSIENT_MESSAGE.search(str(e).lower()):
      return True
    e = e.__cause__ or e.__context__
  return False


class TransientReadError(OSError):
  """A file could not be read because the storage failed repeatedly (not damage)."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of an error's message (its type's name when empty), at most `limit` chars."""
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:limit]


def retrying(read, where: str):
  """read(), retried on transient errors (`is_transient`): RETRIES more tries, BACKOFF_S * 2^k
  apart, then raised as TransientReadError naming `where`. Any other error is raised at once."""
  for attempt in range(RETRIES + 1):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except  # storage clients raise many kinds
      if not is_transient(e):
        raise
      if attempt == RETRIES:
        raise TransientReadError(f'reading {where} failed {RETRIES + 1} times with a storage error '
                                 f'({type(e).__name__}: {first_line(e)}); nothing was moved or '
                                 'deleted: try again when the storage answers') from e
      logging.warning('reading %s failed (%s: %s): retry %d of %d in %.0f s', where,
                      type(e).__name__, first_line(e), attempt + 1, RETRIES,
                      BACKOFF_S * 2**attempt)
      time.sleep(BACKOFF_S * 2**attempt)


def read_bytes(p: epath.PathLike, hint: str = '') -> bytes:
  """The file's bytes; FileNotFoundError naming it (and `hint`, what to do) when missing;
  transient storage errors retried (`retrying`)."""
  f = epath.Path(p)
  try:
    return retrying(f.read_bytes, str(f))
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{f} not found' + (f': {hint}' if hint else '')) from e


def read_text(p: epath.PathLike, hint: str = '') -> str:
  return read_bytes(p, hint).decode('utf-8')


def read_json(p: epath.PathLike, hint: str = '') -> Any:
  """Parsed JSON; FileNotFoundError when missing, ValueError naming the file when malformed."""
  text = read_text(p, hint)
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f'{p} is not valid JSON ({e})') from e


def atomic_write_bytes(p: epath.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary sibling, then renames it over `p` (see the module doc for the
  atomicity on object stores). Creates the parent directory."""
  target = epath.Path(p)
  tmp = target.parent / f'{target.name}.tmp{os.getpid()}'
  target.parent.mkdir(parents=True, exist_ok=True)
  try:
    with tmp.open('wb') as f:
      f.write(data)
      if is_local(tmp):
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except Exception:  # pylint: disable=broad-except  # the first error is the one to report
      pass
    raise


def atomic_write_text(p: epath.PathLike, text: str) -> None:
  atomic_write_bytes(p, text.encode('utf-8'))


def atomic_write_json(p: epath.PathLike, obj: Any, indent: int | None = 2) -> None:
  atomic_write_text(p, json.dumps(obj, indent=indent))


def npz_bytes(**arrays) -> bytes:
  """The bytes of `np.savez` (uncompressed) of `arrays`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def npz_arrays(data: bytes, where: str, fix: str = '') -> dict:
  """{name: array} of .npz bytes (no pickles); ValueError naming `where` (and `fix`, what to do)
  when unreadable."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except  # zipfile, pickle and format errors
    raise ValueError(f'{where} is not a readable .npz file ({type(e).__name__}: {e})'
                     + (f'; {fix}' if fix else '')) from e


def save_npz(p: epath.PathLike, **arrays) -> None:
  """`np.savez` (uncompressed) into memory, then written atomically."""
  atomic_write_bytes(p, npz_bytes(**arrays))


def load_npz(p: epath.PathLike, hint: str = '') -> dict:
  """{name: array} of an .npz (no pickles); FileNotFoundError / ValueError naming the file."""
  return npz_arrays(read_bytes(p, hint), str(p))


def save_figure(fig, p: epath.PathLike, dpi: int = 100) -> None:
  """A matplotlib figure as PNG, rendered in memory and written atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  atomic_write_bytes(p, buf.getvalue())


def save_png(image, p: epath.PathLike) -> None:
  """A PIL image as PNG, encoded in memory and written atomically."""
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  atomic_write_bytes(p, buf.getvalue())


class LineAppender:
  """Appends lines to a text file (metrics.jsonl), across runs that resume it.

  Local files are opened in append mode and flushed after every line: a killed run loses at most
  the line it was writing. Objects in a bucket cannot be appended to (gcsfs refuses mode 'a';
  TensorFlow's gfile emulates it by downloading and re-uploading), so there the file's text is
  read once when this opens, kept in memory, and the whole file is rewritten atomically at every
  `append`: each upload costs the file's size (one short line per log step, a few hundred KiB for
  a long run), and a reader sees every line appended so far or, during the rewrite, one less.
  Only one writer per file (process 0 of a run). `text`: the file's content when the caller has
  just read it (no second download from the bucket); None reads it here.
  """

  def __init__(self, p: epath.PathLike, text: str | None = None):
    self.path = epath.Path(p)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_local(self.path):
      self._file = self.path.open('a')
      self._text = None
    else:
      self._file = None
      if text is None:
        text = self.path.read_text() if self.path.exists() else ''
      self._text = text

  def append(self, line: str) -> None:
    line = line if line.endswith('\n') else line + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._text += line
      atomic_write_text(self.path, self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
