"""Orbax checkpoints of a run directory, and restoring a trained model for inference.

Layout of a workdir:
  config.json            the config of the run (checked on resume, read by inference)
  checkpoints/<step>/    the latest few TrainStates (resume)
  */dropped.tmp/         checkpoints being deleted (left only by a killed run; deleted at the next save)
  best/<step>/           params and EMA params with the best validation loss (the paper's model selection)
  damaged_checkpoints/   checkpoints found damaged on resume, moved aside (restore_latest)
  inference.json, inference/   the inference bundle of the evaluation (sano_jax/rundir.py)

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed run
never leaves a half-written checkpoint behind; every process calls save, the primary one writes.
A checkpoint Orbax drops (the oldest beyond `keep`; in best/, the worse one) is first moved out of
the listed steps (`_TRASH`), then deleted, so a killed run never leaves a half-deleted one either.
A checkpoint damaged later (a truncated or missing file) is detected on restore: the newest intact
one is used instead, and the damaged steps are named in the log (or in the error if none is intact).
A storage error is not damage: it is retried, then raised, and nothing is moved aside.
This module imports no training code.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import ml_collections
import orbax.checkpoint as ocp

from sano_jax import files
from sano_jax import methods


CONFIG_FILE = 'config.json'  # the run's config (`save_config`)
CHECKPOINTS_DIR = 'checkpoints'  # the periodic checkpoints
BEST_DIR = 'best'  # the checkpoint of the lowest validation loss


class DamagedCheckpointError(RuntimeError):
  """Every checkpoint of a run directory is damaged (unreadable, truncated or incomplete)."""


def _read(restore, where: str):
  """restore() under `files.retrying`: transient storage errors are retried, then raised as
  files.TransientReadError; any other error is raised at once (damage)."""
  def quiet_restore():
    with _quiet_abandoned_reads():
      return restore()
  return files.retrying(quiet_restore, where)


# Orbax deletes a checkpoint it drops file by file, in place: a run killed meanwhile left a step
# folder that Orbax still lists but that does not restore (in best/, one Orbax then kept for good:
# its metrics were deleted). Instead, Orbax moves it into this folder of the manager's directory
# (one rename), which no step listing reads, and the store deletes the folder around every save
# (`_empty_trash`). Ignored by Orbax on GCS (deleted in place there).
_TRASH = 'dropped.tmp'


def _manager(path: str, *, keep: int, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False,
      best_fn=(lambda m: m['val_loss']) if best else None, best_mode='min', todelete_subdir=_TRASH)
  return ocp.CheckpointManager(files.absolute(path), options=options)


def _empty_trash(mngr: ocp.CheckpointManager) -> None:
  """Deletes the checkpoints `mngr` dropped (its `_TRASH` folder); the primary process does it.
  Before a save too: Orbax cannot move a step into a trash that still holds that step (a run killed
  before emptying it, resumed, drops the same step again)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  trash = epath.Path(mngr.directory) / _TRASH
  try:
    if trash.exists():
      trash.rmtree()
  except FileNotFoundError:
    pass
  except Exception as e:  # pylint: disable=broad-except  # never fail a run over deleted checkpoints
    logging.warning('cannot delete %s (%s)', trash, files.first_line(e))


class CheckpointStore:
  """The latest `keep` train states under checkpoints/, the best-by-validation params under best/."""

  def __init__(self, workdir: str, keep: int | None = 3):
    # Orbax deletes every checkpoint as soon as it is written with max_to_keep=0 (no resume, and
    # no error), and rejects negative values only at the first save.
    if keep is not None and not (isinstance(keep, int) and keep >= 1):
      raise ValueError(f'training.keep_checkpoints={keep!r} must be an integer >= 1: the newest '
                       'checkpoint is what a run resumes from')
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, CHECKPOINTS_DIR), keep=keep, best=False)
    self._best = None

  @property
  def best(self) -> ocp.CheckpointManager:
    if self._best is None:
      self._best = _manager(os.path.join(self.workdir, BEST_DIR), keep=1, best=True)
    return self._best

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any) -> None:
    _empty_trash(self.latest)
    self.latest.save(step, args=ocp.args.StandardSave(state))
    self.latest.wait_until_finished()
    _empty_trash(self.latest)

  def save_best(self, step: int, params: Any, val_loss: float) -> None:
    _empty_trash(self.best)
    self.best.save(step, args=ocp.args.StandardSave(params), metrics={'val_loss': float(val_loss)})
    self.best.wait_until_finished()
    _empty_trash(self.best)

  def restore_latest(self, target: Any) -> Any:
    """The newest intact checkpoint, restored into `target`'s structure.

    Steps are tried newest first. A storage error (`files.is_transient`: a timeout, a refused
    connection, HTTP 429/5xx) is retried, then raised as files.TransientReadError: nothing is moved.
    One that Orbax cannot read otherwise (a truncated or missing file, whatever exception that
    raises) is logged as damaged and the previous one is tried; once one restores, the damaged newer
    ones are moved aside to damaged_checkpoints/ (so that the run can write those steps again). A
    checkpoint of another model (tree structure or shapes differ from `target`'s) is a ValueError,
    not damage; none intact is a DamagedCheckpointError naming the steps."""
    want = _leaf_shapes(target)
    damaged = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        restored = _read(lambda: self.latest.restore(step, args=ocp.args.StandardRestore(target)),
                         os.path.join(str(self.latest.directory), str(step)))
      except files.TransientReadError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Orbax raises many kinds on damage
        saved = _saved_shapes(self.latest, step)
        if saved is not None and saved != want:
          raise _mismatch(self.workdir, step, saved, want) from e
        logging.warning('the checkpoint at step %d in %s is damaged (%s: %s); trying the previous '
                        'one', step, self.latest.directory, type(e).__name__, files.first_line(e))
        damaged.append((step, e))
        continue
      got = _leaf_shapes(restored)
      if got != want:  # Orbax restores NumPy arrays with their saved shapes, whatever the target's
        raise _mismatch(self.workdir, step, got, want)
      for bad, _ in damaged:
        self._set_aside(bad)
      if damaged:
        logging.warning('resuming from the newest intact checkpoint, step %d, instead of the '
                        'damaged step(s) %s (moved to %s)', step, [d for d, _ in damaged],
                        os.path.join(self.workdir, 'damaged_checkpoints'))
      return restored
    raise DamagedCheckpointError(
        f'every checkpoint in {os.path.join(self.workdir, CHECKPOINTS_DIR)!r} is damaged: steps '
        f'{[d for d, _ in damaged]} ({"; ".join(f"{d}: {files.first_line(e)}" for d, e in damaged)}). '
        'Nothing was overwritten. To start this run from scratch, move the checkpoints/ folder '
        'away; or use a fresh --workdir.')

  def _set_aside(self, step: int) -> None:
    """Moves the damaged checkpoint `step` to damaged_checkpoints/ (the primary process does it)."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      src = epath.Path(self.latest.directory) / str(step)
      dst = epath.Path(self.workdir) / 'damaged_checkpoints' / str(step)
      n = 1
      while dst.exists():
        dst, n = dst.parent / f'{step}.{n}', n + 1
      try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
      except Exception as e:  # pylint: disable=broad-except  # a store that cannot rename folders
        logging.warning('cannot move %s aside (%s): deleting it', src, files.first_line(e))
        src.rmtree()
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f'sano_set_aside_{step}')
    self.latest.reload()

  def close(self) -> None:
    self.latest.close()
    if self._best is not None:
      self._best.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  files.atomic_write_text(os.path.join(workdir, CONFIG_FILE),
                          config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(files.read_json(
      os.path.join(workdir, CONFIG_FILE),
      f'{workdir!r} is not a sano-jax run directory (train one with run_train.py --workdir=...)'))


def model_signature(config) -> dict:
  """The method and the config values its checkpoint's shapes depend on."""
  return methods.create(config).signature()


def check_same_model(config, workdir: str) -> None:
  """A clear error when `workdir` holds a run of another method or model than `config` describes."""
  if not files.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  saved = load_config(workdir)
  old_name, new_name = methods.method_name(saved), methods.method_name(config)
  if old_name != new_name:
    raise ValueError(f'workdir {workdir!r} holds a {old_name!r} run, but config.method={new_name!r}: '
                     f'use --config.method={old_name} (or omit --config to use the run\'s own '
                     'config), or a fresh --workdir for the other method.')
  old = model_signature(saved)
  new = model_signature(config)
  keys = list(new) + [k for k in old if k not in new]  # a field only one side has differs too
  diff = {k: (old.get(k), new.get(k)) for k in keys
          if json.dumps(old.get(k)) != json.dumps(new.get(k))}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir!r} holds a checkpoint of a different model ({detail}). '
                     'Use a fresh --workdir, or the config that trained it.')


def require_checkpoint(workdir: str) -> None:
  """FileNotFoundError saying to train first when `workdir` has no checkpoint folder with a step."""
  if not any(files.listdir(os.path.join(workdir, d)) for d in (BEST_DIR, CHECKPOINTS_DIR)):
    raise FileNotFoundError(f'no checkpoint in {workdir!r} (looked in best/ and checkpoints/): '
                            f'train first with run_train.py --config=... --workdir={workdir}')


class Restored(NamedTuple):
  config: ml_collections.ConfigDict
  method: Any
  params: Any
  step: int  # the checkpoint's training step


# The config.data fields that say WHICH images a run learns from (not where a copy is cached, nor
# which test images are scored).
DATA_IDENTITY = ('dataset', 'root', 'normal_dir', 'subjects_csv', 'image_size', 'num_channels')


def data_identity(config) -> dict:
  """{field: value} of config.data's DATA_IDENTITY fields (None where absent)."""
  return {k: config.data.get(k, None) for k in DATA_IDENTITY}


def check_same_data(config, workdir: str) -> None:
  """A clear error when `workdir` holds a run trained on other data than `config` describes
  (resuming would mix two datasets in one model, or score the old model as if trained on these)."""
  if not files.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  old, new = data_identity(load_config(workdir)), data_identity(config)
  diff = {k: (old[k], new[k]) for k in new if json.dumps(old[k]) != json.dumps(new[k])}
  if diff:
    detail = ', '.join(f'data.{k}: run {a!r} vs config {b!r}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir!r} holds a run trained on other data ({detail}). Use a '
                     'fresh --workdir for these data, or the data config that trained it.')


def restore_for_inference(workdir: str, *, best: bool = True, ema: bool | None = None,
                          config=None) -> Restored:
  """(config, method, params, step) of a trained run: the best-by-validation (else latest) EMA
  params and the step of the checkpoint they came from.

  config: the config to build the method from (default: the run's own config.json); it must
  describe the same method and model (`check_same_model`)."""
  if config is None:
    config = load_config(workdir)
  else:
    check_same_model(config, workdir)
  method = methods.create(config)
  params, step = restore_params(workdir, method, best=best,
                                ema=config.localize.use_ema if ema is None else ema)
  return Restored(config, method, params, step)


def restore_params(workdir: str, method, *, best: bool = True, ema: bool = True):
  """(params, step): the best-by-validation (else latest intact) checkpoint's EMA (or raw) params
  of `method`'s run in `workdir`, checked against the method's shapes. The caller vouches that
  `method` is the run's (`restore_for_inference` checks config.json)."""
  key = 'ema_params' if ema else 'params'
  restored, damaged = None, []
  if best and files.isdir(os.path.join(workdir, BEST_DIR)):
    mngr = _manager(os.path.join(workdir, BEST_DIR), keep=1, best=True)
    step = mngr.best_step() or mngr.latest_step()
    if step is not None:
      restored, step = _restore_intact(mngr, [step], damaged)
    mngr.close()
    if restored is None and damaged:
      logging.warning('the best checkpoint in %s is damaged: using the latest intact one in %s',
                      os.path.join(workdir, BEST_DIR), os.path.join(workdir, CHECKPOINTS_DIR))
  if restored is None:
    mngr = _manager(os.path.join(workdir, CHECKPOINTS_DIR), keep=1, best=False)
    steps = sorted(mngr.all_steps(), reverse=True)
    restored, step = _restore_intact(mngr, steps, damaged)
    mngr.close()
    if restored is None and not damaged:
      raise FileNotFoundError(f'no checkpoint in {workdir!r} (looked in best/ and checkpoints/): '
                              'train first with run_train.py --workdir=' + workdir)
    if restored is None:
      raise DamagedCheckpointError(
          f'every checkpoint in {workdir!r} is damaged: '
          f'{"; ".join(f"{where}: {files.first_line(e)}" for where, e in damaged)}. Train again, or '
          'restore the run directory from a copy.')
  restored = restored[key]
  _check_params_fit(method, restored, workdir)
  return restored, int(step)


def _restore_intact(mngr: ocp.CheckpointManager, steps, damaged: list):
  """(the restored tree, its step) of the first of `steps` that restores (as saved); each damaged
  one is logged and appended to `damaged` as (its folder, the exception). (None, None) if none
  restores."""
  for step in steps:
    where = os.path.join(str(mngr.directory), str(step))
    try:
      return _read(lambda: mngr.restore(step, args=ocp.args.StandardRestore()), where), step
    except files.TransientReadError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many kinds on damage
      logging.warning('the checkpoint %s is damaged (%s: %s)', where, type(e).__name__,
                      files.first_line(e))
      damaged.append((where, e))
  return None, None


@contextlib.contextmanager
def _quiet_abandoned_reads(settle_s: float = 0.2, max_wait_s: float = 2.0):
  """Drops the 'Event loop is closed' errors of a failed restore's abandoned reads.

  When one read of a damaged checkpoint fails, Orbax closes its event loop; the array reads still in
  flight then complete into it, each printing a traceback (hundreds, burying the one useful line).
  On failure this waits until none has come for `settle_s` (at most `max_wait_s`), then puts the
  previous hook back."""
  previous = sys.unraisablehook
  last = [0.0]

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and 'Event loop is closed' in str(e):
      last[0] = time.monotonic()
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    last[0] = time.monotonic()
    end = last[0] + max_wait_s
    while time.monotonic() < min(end, last[0] + settle_s):
      time.sleep(0.02)
    raise
  finally:
    sys.unraisablehook = previous


def _leaf_shapes(tree) -> dict:
  """{path: shape} of the leaves of a pytree of arrays (or of Orbax's array metadata), paths as
  tuples of plain names, so that a dataclass and the dict Orbax saved it as compare equal."""
  import jax  # pylint: disable=g-import-not-at-top
  name = lambda k: str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
  return {tuple(name(k) for k in path): tuple(getattr(x, 'shape', ()))
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_shapes(mngr: ocp.CheckpointManager, step: int) -> dict | None:
  """The leaf shapes a checkpoint's metadata records; None where the metadata is unreadable."""
  try:
    meta = mngr.item_metadata(step)
    tree = getattr(meta, 'tree', meta)
    return _leaf_shapes(tree) if tree is not None else None
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: damage, not a mismatch
    return None


def _mismatch(workdir: str, step: int, saved: dict, want: dict) -> ValueError:
  diff = [(' / '.join(k), saved.get(k), want.get(k)) for k in sorted(set(saved) | set(want))
          if saved.get(k) != want.get(k)][:3]
  return ValueError(f'cannot restore the checkpoint at step {step} in {workdir!r} into this model: '
                    f'it holds another model (first differences, as (leaf, checkpoint shape, model '
                    f'shape): {diff}). Use a fresh --workdir, or the config that trained it.')


def _check_params_fit(method, params, workdir: str) -> None:
  """A clear error when restored params do not have the shapes config.json's model describes."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = shapes(params), shapes(jax.eval_shape(method.init, jax.random.PRNGKey(0)))
  if got != want:
    diff = [(k, got.get(k), want.get(k)) for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)][:3]
    raise ValueError(f'the checkpoint in {workdir!r} does not fit the {method.name!r} model that '
                     f'{os.path.join(workdir, CONFIG_FILE)} describes (first differences, as '
                     f'(param, checkpoint shape, config shape): {diff}); was another run copied '
                     'into it?')
