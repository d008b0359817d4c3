"""The inference bundle of a run directory: one writer (`save`), one reader (`load`).

What inference needs besides the checkpoint, written by run_eval.py as ONE unit:

  WORKDIR/inference.json                 the manifest, written last (atomically): the checkpoint step
                                         and model signature the statistics were fitted with, the
                                         data they were fitted on, the whole localize block used
                                         (t-set, rule, smoothing sigma, N, ...), the calibration
                                         record, and each part's file name and sha256
  WORKDIR/inference/stats-<sha>.npz      the healthy statistics (a part; named by its hash)

A part is never overwritten: a new evaluation writes new parts, then the manifest, then deletes the
parts no manifest names. A run killed in between leaves the previous bundle whole and loadable.

`load` checks the unit against the run before anything is computed, and each mismatch is a
ValueError that names both sides and the command that fixes it: statistics fitted with another
checkpoint than the one restored now (training went on: rerun run_eval.py), another model, a part
whose hash differs (damaged), a localize block with an unknown rule or a non-finite number, the
statistics' t-set or image shape differing from the manifest's. Loading never refits anything.
The localize block of the manifest, not config.json's, says how to localize: `load_localizer`
computes exactly the maps that the evaluation scored.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from sano_jax import checkpointing
from sano_jax import files
from sano_jax import localization
from sano_jax import score_stats
from sano_jax import methods

MANIFEST = 'inference.json'
PARTS_DIR = 'inference'
FORMAT = 'sano-jax inference bundle'
VERSION = 1
# Files of the layout before the bundle (a workdir evaluated by an older version).
LEGACY = ('score_stats.npz', 'calibration.json')


class Bundle(NamedTuple):
  config: ml_collections.ConfigDict  # the run's config.json with the bundle's localize block
  method: Any
  params: Any
  stats: Any  # ScoreStats or MultiStats
  step: int
  manifest: dict


def _fix(workdir: str) -> str:
  return f'rerun run_eval.py --workdir={workdir}'


def _hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def stats_bytes(stats) -> bytes:
  """The statistics as the bytes of an .npz (the part `save` writes and hashes)."""
  return files.npz_bytes(**score_stats.stats_to_arrays(stats))


def stats_from_bytes(data: bytes, where: str):
  """The statistics of `stats_bytes`' bytes; a ValueError naming `where` when unreadable."""
  return score_stats.stats_from_arrays(files.npz_arrays(data, where, 'rerun run_eval.py'), where)


def save(workdir: str, *, config, stats, step: int, calibration: dict | None = None) -> dict:
  """Writes the bundle of an evaluation of `workdir` (module docstring); returns the manifest.

  config: the evaluation's config (its localize block, after calibration, is what `load` uses);
  stats: the healthy statistics fitted with it; step: the checkpoint's step they were fitted with;
  calibration: the label-free choice that set the localize block (None when not calibrated)."""
  method = methods.create(config)
  _check_ts(stats, method.ts, 'the statistics to save', 'the config')
  data = stats_bytes(stats)
  digest = _hash(data)
  part = f'{PARTS_DIR}/stats-{digest[:16]}.npz'
  files.atomic_write_bytes(os.path.join(workdir, part), data)
  lc = json.loads(config.localize.to_json_best_effort())
  lc['t'] = [float(t) for t in (lc['t'] if isinstance(lc['t'], list) else [lc['t']])]
  manifest = {
      'format': FORMAT, 'version': VERSION,
      'written': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'step': int(step),
      'model': method.signature(),
      'data': checkpointing.data_identity(config),
      'num_validation_images': int(stats.n_images),
      'image_shape': [int(s) for s in stats.image_shape],
      'localize': lc,
      'calibration': None if calibration is None else {
          k: calibration.get(k) for k in ('t', 'rule', 'n_sigma', 'smoothing_sigma')},
      'parts': {'stats': {'file': part, 'sha256': digest, 'bytes': len(data)}},
  }
  check_manifest(manifest, os.path.join(workdir, MANIFEST))  # never write what `load` refuses
  files.atomic_write_json(os.path.join(workdir, MANIFEST), manifest)
  _delete_unnamed_parts(workdir, keep=part)
  return manifest


def _delete_unnamed_parts(workdir: str, keep: str) -> None:
  for name in files.listdir(os.path.join(workdir, PARTS_DIR)):
    if f'{PARTS_DIR}/{name}' != keep:
      files.remove(os.path.join(workdir, PARTS_DIR, name))
  for name in LEGACY:
    files.remove(os.path.join(workdir, name))


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_manifest(m: dict, where: str) -> None:
  """A ValueError naming `where`, the field and its value for a manifest `load` cannot use."""
  def bad(field, value, want):
    raise ValueError(f'{where}: {field}={value!r} is not {want}; the inference bundle is damaged '
                     'or was edited by hand: rerun run_eval.py')
  if not isinstance(m, dict) or m.get('format') != FORMAT:
    bad('format', m.get('format') if isinstance(m, dict) else m, repr(FORMAT))
  if isinstance(m.get('version'), int) and m['version'] < VERSION:
    raise ValueError(f'{where}: version={m["version"]}: the bundle was made by an older sano-jax '
                     f'(this one reads version {VERSION}; its maps differ): rerun run_eval.py')
  if m.get('version') != VERSION:
    bad('version', m.get('version'), f'{VERSION} (this code\'s bundle format)')
  if not isinstance(m.get('step'), int) or m['step'] < 0:
    bad('step', m.get('step'), 'a training step')
  lc = m.get('localize')
  if not isinstance(lc, dict):
    bad('localize', lc, 'a localize block')
  try:
    rule = localization.rule_from_config(ml_collections.ConfigDict(lc))
  except (ValueError, TypeError) as e:
    bad('localize.stats', lc.get('stats'), f'a valid rule ({e})')
  if rule not in localization.RULES:
    bad('localize.stats', lc.get('stats'), f'one of {localization.RULES}')
  for key in ('n_sigma', 'smoothing_sigma', 'target_fpr'):
    if not _finite(lc.get(key)):
      bad(f'localize.{key}', lc.get(key), 'a finite number')
  if lc['smoothing_sigma'] < 0 or not 0 < lc['target_fpr'] < 1:
    bad('localize', {k: lc[k] for k in ('smoothing_sigma', 'target_fpr')},
        'smoothing_sigma >= 0 and target_fpr in (0, 1)')
  ts = lc.get('t')
  if not isinstance(ts, list) or not ts or not all(_finite(t) and 0 < t <= 1 for t in ts):
    bad('localize.t', ts, 'a non-empty list of t in (0, 1]')
  cal = m.get('calibration')
  if cal is not None:
    applied = {'n_sigma': lc['n_sigma'], 'rule': rule}
    if not isinstance(cal, dict) or any(cal.get(k) != v for k, v in applied.items()):
      bad('calibration', cal, f'the calibration that set the localize block ({applied})')
  part = (m.get('parts') or {}).get('stats')
  if (not isinstance(part, dict) or not isinstance(part.get('file'), str)
      or not part['file'].startswith(PARTS_DIR + '/') or '..' in part['file']
      or not isinstance(part.get('sha256'), str)):
    bad('parts.stats', part, f'{{"file": "{PARTS_DIR}/...", "sha256": ...}}')


def read_manifest(workdir: str) -> dict:
  """The checked manifest of `workdir`; FileNotFoundError saying what to run when there is none."""
  path = os.path.join(workdir, MANIFEST)
  if not files.exists(path):
    legacy = [n for n in LEGACY if files.exists(os.path.join(workdir, n))]
    why = (f'it holds {", ".join(legacy)} from before the bundle format' if legacy else
           'the run was not evaluated yet')
    raise FileNotFoundError(f'no inference bundle ({path}) in {workdir!r}: {why}; '
                            f'{_fix(workdir)} (it fits the healthy statistics on the validation '
                            'split)')
  manifest = files.read_json(path)
  check_manifest(manifest, path)
  return manifest


def with_localize(config, lc: dict):
  """A copy of `config` whose localize block is `lc` (a manifest's)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.localize = ml_collections.ConfigDict(lc)
    config.localize.t = tuple(lc['t'])
  return config


def load(workdir: str, *, method: str | None = None) -> Bundle:
  """The run's model and its inference bundle, checked as one unit (module docstring).

  method: when given, the method the run must hold (a clear error naming both otherwise)."""
  config = checkpointing.load_config(workdir)  # a clear error when workdir is not a run
  held = methods.method_name(config)
  if method is not None and methods.check_name(method) != held:
    raise ValueError(f'workdir {workdir!r} holds a {held!r} run, not {method!r}')
  checkpointing.require_checkpoint(workdir)
  manifest = read_manifest(workdir)
  path = os.path.join(workdir, MANIFEST)
  config = with_localize(config, manifest['localize'])
  model = methods.create(config)
  signature = model.signature()
  if json.dumps(manifest['model'], sort_keys=True) != json.dumps(signature, sort_keys=True):
    raise ValueError(f'{path} was written for another model ({manifest["model"]}) than '
                     f'{os.path.join(workdir, checkpointing.CONFIG_FILE)} describes ({signature}): '
                     f'{_fix(workdir)}')
  params, step = checkpointing.restore_params(workdir, model, ema=config.localize.use_ema)
  if step != manifest['step']:
    raise ValueError(f'the statistics in {path} were fitted with the checkpoint of step '
                     f'{manifest["step"]}, but the checkpoint of {workdir!r} is now step '
                     f'{step} (training went on after the evaluation, or a checkpoint '
                     f'was replaced): {_fix(workdir)}')
  part = manifest['parts']['stats']
  part_path = os.path.join(workdir, part['file'])
  data = files.read_bytes(part_path, f'the inference bundle is incomplete: {_fix(workdir)}')
  if _hash(data) != part['sha256']:
    raise ValueError(f'{part_path} is damaged (its sha256 is not the one {path} records): '
                     f'{_fix(workdir)}')
  stats = stats_from_bytes(data, part_path)
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  if tuple(stats.image_shape) != (size, size, channels):
    h, w, c = stats.image_shape
    raise ValueError(f'{part_path} was fitted on {h}x{w}x{c} images, but the run in {workdir!r} '
                     f'is {size}x{size}x{channels}: {_fix(workdir)}')
  _check_ts(stats, model.ts, part_path, path, f': {_fix(workdir)}')
  return Bundle(config, model, params, stats, step, manifest)


def _check_ts(stats, ts: tuple, stats_name: str, settings_name: str, fix: str = '') -> None:
  """Statistics of a t-set (MultiStats) must be those of the t the settings localize at."""
  if isinstance(stats, score_stats.MultiStats) and ts != (None,) and tuple(stats.ts) != ts:
    raise ValueError(f'{stats_name} holds statistics at t={list(stats.ts)}, but {settings_name} '
                     f'localizes at t={list(ts)}{fix}')


def localizer(bundle: Bundle) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """images -> (z_map, mask), jitted, with the bundle's params, statistics and settings bound
  (params and stats are arguments of the compiled program, not constants baked into it)."""
  method, params, stats = bundle.method, bundle.params, score_stats.whitened(bundle.stats)
  loc = localization.settings(bundle.config.localize)

  @jax.jit
  def localize_with(params, stats, images):
    return localization.localize(method.field_fn(params), images, stats, **loc)

  def localize(images):
    if not isinstance(images, jax.core.Tracer):
      localization.check_images(images)  # NaN/inf or out-of-range: a clear error, not a NaN map
    return localize_with(params, stats, images)
  return localize


def load_localizer(workdir: str, *, method: str | None = None
                   ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """images [B,H,W,C] in [0, 1] (or uint8) -> (z_map [B,H,W], mask [B,H,W]), jitted: the best (EMA)
  params and the run's inference bundle bound, localizing exactly as run_eval.py evaluated.

  Works for every method (config.json's `method` says which: its `field` replaces the score, e.g.
  x - x_hat for the reconstruction baselines); `method`, when given, must name it. Concrete inputs
  are checked on the host first (check_images); under an outer jit/vmap it traces."""
  return localizer(load(workdir, method=method))
