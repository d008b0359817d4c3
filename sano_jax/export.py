r"""A trained localizer as one self-contained file (`jax.export`), loadable with only jax and numpy.

  python -m sano_jax.export --workdir=workdirs/demo --out=demo.sano

  import sano_jax
  localizer = sano_jax.load_exported('demo.sano')    # imports neither flax nor our model code
  z_map, mask = localizer(images)                     # images [B,H,W,C]: float in [0,1], or uint8
  localizer.metadata                                   # config, code version, platforms, ...

What is exported: `load_localizer(workdir)` (best EMA params, the run's inference bundle), traced
with a symbolic batch dimension (`b, H, W, C`, H, W, C fixed by the run's config) and lowered for
cpu, cuda and tpu in one artifact (a platform whose lowering fails is left out and named in
`metadata['platforms_failed']`).

Params and healthy statistics are ARGUMENTS of the exported functions, stored in the same file
(raw little-endian arrays after the serialized functions); `load_exported` puts them on the device
once and passes them on every call. The file is as self-contained as with constants, and its
outputs equal the live localizer's bit for bit, since that one takes them as arguments too. As
constants, XLA folds at compile time whatever depends only on them (the time embedding, the
stats' std, ...; an optimization barrier does not stop it: XLA:CPU drops barriers on constants),
and folded float math rounds differently from the compiled kernels (we saw z differ by 1-6e-7).
Size: the params and stats (of which the quantile rule's 2^16-bin histogram, 0.25 MiB) plus two
programs of ~0.1 MiB: 0.62 MiB for configs/tiny.py, 4.8 MiB for configs/demo.py. Constants would
save nothing and only slow XLA's compile.

Input dtype: two functions share the arguments, one for float32 images in [0, 1] and one for
uint8 in [0, 255] (the live localizer divides by 255 inside its program, which XLA fuses: only
the same program gives the same bits). Other float dtypes are cast to float32. Called eagerly, the
loaded localizer rejects NaN/inf and out-of-range values as the live localizer does. The raw
`jax.export.Exported`s (`.exported[dtype]`) are called as `exported.call(arguments, images)`.

File format (version 1): the magic b'SANOEXP\0', little-endian uint32 format version and uint32
header length, the header (UTF-8 JSON: config, code version, platforms, input and output shapes,
the functions' sizes, the arguments' shapes and dtypes, the payload's size and sha256, ...), then
the payload: each function's `Exported.serialize()`, then the arguments, in the header's order.
Results are bit for bit only for the same backend and XLA settings: on CPU even the number of
(simulated) host devices changes XLA's partitioning and with it the last bit, live or exported.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import subprocess
import sys
from typing import Sequence

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from sano_jax import image_checks

MAGIC = b'SANOEXP\0'
FORMAT_VERSION = 1
PLATFORMS = ('cpu', 'cuda', 'tpu')
INPUT_DTYPES = ('float32', 'uint8')
_PREFIX = struct.Struct('<II')  # format version, header length


# --------------------------------------------------------------------------------------------
# Loading (jax and numpy only).
# --------------------------------------------------------------------------------------------


class ExportedLocalizer:
  """images [B,H,W,C] -> (z_map [B,H,W] float32, mask [B,H,W] bool), from an exported file.

  Attributes: `metadata` (the header dict), `exported` ({input dtype: jax.export.Exported}),
  `arguments` (their first argument: params and stats, on the default device), `platforms`,
  `image_shape` (H, W, C), `path`. Traceable: under an outer jit it skips the host-side check
  (the arguments then become that jit's constants, as the live localizer's params do).
  """

  def __init__(self, path: str, metadata: dict, exported: dict, arguments: list):
    self.path = path
    self.metadata = metadata
    self.exported = exported
    self.arguments = [jnp.asarray(a) for a in arguments]
    self.platforms = tuple(exported['float32'].platforms)
    self.image_shape = tuple(int(d) for d in metadata['input']['shape'][1:])
    self._calls = {k: jax.jit(e.call) for k, e in exported.items()}

  def __call__(self, images):
    if not isinstance(images, (jax.Array, np.ndarray)):
      images = np.asarray(images)
    if not isinstance(images, jax.core.Tracer):
      image_checks.check_images(images)
    shape = tuple(images.shape)
    if len(shape) != 4:
      raise ValueError(f'images must be [B,H,W,C] (rank 4), got shape {shape}')
    if shape[0] == 0:
      raise ValueError('empty batch: images has batch size 0')
    if shape[1:] != self.image_shape:
      raise ValueError(f'images of shape {shape} do not match the exported localizer\'s '
                       f'[B, {", ".join(map(str, self.image_shape))}] ({self.path})')
    dtype = jnp.result_type(images)
    if dtype == jnp.uint8:
      return self._calls['uint8'](self.arguments, images)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f'images must be float in [0, 1] or uint8 in [0, 255], got dtype {dtype}')
    return self._calls['float32'](self.arguments, images.astype(jnp.float32))

  def __repr__(self):
    return (f'ExportedLocalizer({self.path!r}, image_shape={self.image_shape}, '
            f'platforms={self.platforms})')



def read_exported(path: str) -> tuple[dict, bytes]:
  """(metadata, payload) of an exported file, checked: magic, version, lengths, sha256.

  Raises ValueError naming the file and the problem (wrong magic, truncated, tampered...).
  """
  data = _read_file(path)
  what = 'a sano-jax exported localizer (python -m sano_jax.export)'
  if data[:len(MAGIC)] != MAGIC:
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
      raise ValueError(f'{path}: truncated ({len(data)} bytes, not even the magic bytes)')
    raise ValueError(f'{path}: wrong magic bytes {data[:len(MAGIC)]!r} (expected {MAGIC!r}): '
                     f'not {what}')
  start = len(MAGIC) + _PREFIX.size
  if len(data) < start:
    raise ValueError(f'{path}: truncated ({len(data)} bytes, the header needs {start})')
  version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
  if version != FORMAT_VERSION:
    raise ValueError(f'{path}: format version {version}, this sano_jax reads version '
                     f'{FORMAT_VERSION}: export it again with this version')
  if len(data) < start + header_len:
    raise ValueError(f'{path}: truncated in the header ({len(data)} bytes, the header ends at '
                     f'byte {start + header_len})')
  try:
    metadata = json.loads(data[start:start + header_len].decode('utf-8'))
    size, sha = int(metadata['payload_size']), str(metadata['payload_sha256'])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: corrupt header ({e}): not {what}') from e
  payload = data[start + header_len:]
  if len(payload) < size:
    raise ValueError(f'{path}: truncated (payload of {len(payload)} bytes, the header says '
                     f'{size})')
  if len(payload) > size:
    raise ValueError(f'{path}: {len(payload) - size} unexpected bytes after the payload '
                     f'(the header says {size}): the file was modified')
  digest = hashlib.sha256(payload).hexdigest()
  if digest != sha:
    raise ValueError(f'{path}: sha256 mismatch (payload {digest}, header {sha}): the file was '
                     'tampered with or corrupted')
  return metadata, payload


def _read_file(path: str) -> bytes:
  """The file's bytes; FileNotFoundError saying how to make one. A URI (gs://...) is read through
  `sano_jax.files` (etils.epath); a local file with open(): loading needs only jax and numpy."""
  hint = 'export a run with python -m sano_jax.export --workdir=W --out=FILE'
  if '://' in path:
    from sano_jax import files  # pylint: disable=g-import-not-at-top
    return files.read_bytes(path, hint)
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path} not found: {hint}') from e


def _split_payload(metadata: dict, payload: bytes) -> tuple[dict, list]:
  """({dtype: serialized function}, [argument arrays]) as the header lays them out."""
  blobs, offset = {}, 0
  for fn in metadata['functions']:
    blobs[fn['input_dtype']] = payload[offset:offset + int(fn['size'])]
    offset += int(fn['size'])
  arguments = []
  for spec in metadata['arguments']:
    dtype = np.dtype(spec['dtype']).newbyteorder('<')
    count = int(np.prod(spec['shape'], dtype=np.int64))
    arguments.append(np.frombuffer(payload, dtype, count, offset).reshape(spec['shape']))
    offset += count * dtype.itemsize
  if offset != len(payload) or set(blobs) != set(INPUT_DTYPES):
    raise ValueError(f'it lays out {offset} bytes of functions {sorted(blobs)} and arguments; '
                     f'the payload has {len(payload)}')
  return blobs, arguments


def load_exported(path: str) -> ExportedLocalizer:
  """The localizer saved by `python -m sano_jax.export`: images -> (z_map, mask), `.metadata`.

  Needs only jax and numpy. The platforms it runs on are `.platforms` (jax says so clearly when
  the current backend is not among them). ValueError for a file that is not a valid artifact.
  """
  path = os.fspath(path)
  metadata, payload = read_exported(path)
  try:
    blobs, arguments = _split_payload(metadata, payload)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: corrupt header, its layout does not fit the payload ({e})') from e
  try:
    exported = {k: jax_export.deserialize(bytearray(b)) for k, b in blobs.items()}
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: the payload does not deserialize with jax {jax.__version__} '
                     f'({type(e).__name__}: {e}); it was exported with jax '
                     f'{metadata.get("jax_version")}') from e
  return ExportedLocalizer(path, metadata, exported, arguments)


# --------------------------------------------------------------------------------------------
# Exporting (imports the model code, lazily).
# --------------------------------------------------------------------------------------------


def code_version() -> tuple[str, bool | None]:
  """(git HEAD of the checkout holding this package, whether it has uncommitted changes), or
  ('sano_jax <version>', None) when the package is not in a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()
  try:
    if os.path.realpath(git('rev-parse', '--show-toplevel')) == os.path.realpath(root):
      return git('rev-parse', 'HEAD'), bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    pass
  from sano_jax import __version__  # pylint: disable=g-import-not-at-top
  return f'sano_jax {__version__}', None


def _as_arguments(fn, images_spec):
  """(f(arguments, images), arguments): fn traced, its closed-over arrays (params, stats) lifted
  into an explicit argument.

  JAX may inline 0-d arrays (e.g. the stats' counts) as literals of the equation that uses them:
  the array literals of the top-level equations (the call of the live localizer's inner jit,
  which takes them as arguments) are lifted too.
  """
  from jax.extend import core as jex  # pylint: disable=g-import-not-at-top
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(images_spec)
  jaxpr = closed.jaxpr
  constvars, consts, eqns = list(jaxpr.constvars), list(closed.consts), []
  for eqn in jaxpr.eqns:
    invars = []
    for v in eqn.invars:
      if isinstance(v, jex.Literal) and isinstance(v.val, (jax.Array, np.ndarray, np.generic)):
        constvars.append(jex.Var(v.aval))
        consts.append(v.val)
        v = constvars[-1]
      invars.append(v)
    eqns.append(eqn.replace(invars=invars))
  jaxpr = jaxpr.replace(constvars=constvars, eqns=eqns)
  out_tree = jax.tree.structure(out_shape)

  def f(arguments, images):
    return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(jaxpr, arguments, images))
  return f, [np.asarray(c) for c in consts]


def _lower(fn, specs, platforms) -> tuple[jax_export.Exported, dict]:
  """Exports for all `platforms` together; if that fails, for those that lower one by one."""
  try:
    return jax_export.export(fn, platforms=platforms)(*specs), {}
  except Exception:  # pylint: disable=broad-except
    pass
  ok, failed = [], {}
  for p in platforms:
    try:
      jax_export.export(fn, platforms=[p])(*specs)
      ok.append(p)
    except Exception as e:  # pylint: disable=broad-except
      failed[p] = f'{type(e).__name__}: {e}'[:1000]
  if not ok:
    raise ValueError(f'the localizer lowers for none of {list(platforms)}: {failed}')
  return jax_export.export(fn, platforms=ok)(*specs), failed


def _shape(aval) -> list:
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def export_localizer(workdir: str, out: str, *, platforms: Sequence[str] = PLATFORMS) -> dict:
  """Writes `load_localizer(workdir)` to `out` (atomically); returns the metadata written."""
  from sano_jax import files, rundir  # pylint: disable=g-import-not-at-top
  bundle = rundir.load(workdir)
  config = bundle.config
  localizer = rundir.localizer(bundle)
  h = w = int(config.data.image_size)
  c = int(config.data.num_channels)
  shape = jax_export.symbolic_shape(f'b, {h}, {w}, {c}')
  exported, arguments, failed = {}, None, {}
  for dtype in INPUT_DTYPES:
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    fn, args = _as_arguments(localizer, spec)
    if arguments is None:
      arguments = args
    elif (len(args) != len(arguments)
          or not all(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
                     for a, b in zip(args, arguments))):
      raise ValueError(f'the localizer of {workdir!r} closes over other arrays for {dtype} input')
    specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arguments], spec)
    if not exported:
      exported[dtype], failed = _lower(jax.jit(fn), specs, tuple(platforms))
    else:  # the platforms that the first function lowered for
      exported[dtype] = jax_export.export(jax.jit(fn), platforms=exported['float32'].platforms)(
          *specs)
  blobs = {k: bytes(e.serialize()) for k, e in exported.items()}
  payload = b''.join([blobs[k] for k in INPUT_DTYPES]
                     + [np.ascontiguousarray(a, a.dtype.newbyteorder('<')).tobytes()
                        for a in arguments])
  first = exported['float32']
  version, dirty = code_version()
  metadata = {
      'format': 'sano-jax exported localizer',
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'workdir': files.absolute(workdir),
      'code_version': version,
      'code_dirty': dirty,
      'jax_version': jax.__version__,
      'platforms': list(first.platforms),
      'platforms_failed': failed,
      'bound': 'params and healthy statistics: the functions\' first argument, stored in the file',
      'input': {'shape': _shape(first.in_avals[-1]), 'dtypes': list(INPUT_DTYPES),
                'range': {'float32': [0.0, 1.0], 'uint8': [0, 255]}},
      'outputs': {name: {'shape': _shape(a), 'dtype': str(a.dtype)}
                  for name, a in zip(('z_map', 'mask'), first.out_avals)},
      'calling_convention_version': first.calling_convention_version,
      'config': json.loads(config.to_json_best_effort()),
      'functions': [{'input_dtype': k, 'size': len(blobs[k])} for k in INPUT_DTYPES],
      'arguments': [{'shape': list(a.shape), 'dtype': a.dtype.name} for a in arguments],
      'payload_size': len(payload),
      'payload_sha256': hashlib.sha256(payload).hexdigest(),
  }
  header = json.dumps(metadata, indent=1, sort_keys=True).encode('utf-8')
  files.atomic_write_bytes(out,
                           MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header + payload)
  return metadata


def main(argv: Sequence[str]) -> int:
  """Serializes a trained, evaluated run's localizer with jax.export into one file (load it with
  sano_jax.load_exported, which needs only jax and numpy: so absl is imported here, not above)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sano_jax import cli  # pylint: disable=g-import-not-at-top
  args = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'run directory (trained and evaluated)', flag_values=args)
  flags.DEFINE_string('out', None, 'the file to write', flag_values=args)
  flags.DEFINE_string('platforms', ','.join(PLATFORMS), 'comma-separated platforms to lower for',
                      flag_values=args)
  flags.mark_flags_as_required(['workdir', 'out'], flag_values=args)
  cli.parse_args(args, argv, 'python -m sano_jax.export')
  platforms = tuple(p.strip() for p in args.platforms.split(',') if p.strip())
  try:
    metadata = export_localizer(args.workdir, args.out, platforms=platforms)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  from sano_jax import files  # pylint: disable=g-import-not-at-top
  size = files.stat(args.out)[0]
  print(f'wrote {args.out} ({size / 2**20:.2f} MiB; platforms {", ".join(metadata["platforms"])}'
        f'; code {metadata["code_version"]})')
  for p, why in metadata['platforms_failed'].items():
    print(f'warning: not lowered for {p}: {why}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
