"""Orbax checkpoints of a run directory, and restoring a trained model for inference.

Layout of a workdir:
  config.json            the config of the run (checked on resume, read by inference)
  checkpoints/<step>/    the latest few TrainStates (resume)
  best/<step>/           params and EMA params with the best validation loss (the paper's model selection)
  score_stats.npz        healthy score statistics (written by the evaluation)

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed run
never leaves a half-written checkpoint behind; every process calls save, the primary one writes.
This module imports no training code.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp


def _manager(path: str, *, keep: int, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False,
      best_fn=(lambda m: m['val_loss']) if best else None, best_mode='min')
  return ocp.CheckpointManager(os.path.abspath(path), options=options)


class CheckpointStore:
  """The latest `keep` train states under checkpoints/, the best-by-validation params under best/."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep=keep, best=False)
    self._best = None

  @property
  def best(self) -> ocp.CheckpointManager:
    if self._best is None:
      self._best = _manager(os.path.join(self.workdir, 'best'), keep=1, best=True)
    return self._best

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any) -> None:
    self.latest.save(step, args=ocp.args.StandardSave(state))
    self.latest.wait_until_finished()

  def save_best(self, step: int, params: Any, val_loss: float) -> None:
    self.best.save(step, args=ocp.args.StandardSave(params), metrics={'val_loss': float(val_loss)})
    self.best.wait_until_finished()

  def restore_latest(self, target: Any) -> Any:
    step = self.latest.latest_step()
    return self.latest.restore(step, args=ocp.args.StandardRestore(target))

  def close(self) -> None:
    self.latest.close()
    if self._best is not None:
      self._best.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, 'config.json.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, os.path.join(workdir, 'config.json'))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a sano-jax run directory '
                            '(train one with run_train.py --workdir=...)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_signature(config) -> dict:
  """The method and the config values its checkpoint's shapes depend on."""
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  return methods.create(config).signature()


def check_same_model(config, workdir: str) -> None:
  """A clear error when `workdir` holds a run of another method or model than `config` describes."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  saved = load_config(workdir)
  old_name, new_name = methods.method_name(saved), methods.method_name(config)
  if old_name != new_name:
    raise ValueError(f'workdir {workdir!r} holds a {old_name!r} run, but config.method={new_name!r}: '
                     f'use --config.method={old_name} (or omit --config to use the run\'s own '
                     'config), or a fresh --workdir for the other method.')
  old = model_signature(saved)
  new = model_signature(config)
  diff = {k: (old.get(k), new[k]) for k in new if json.dumps(old.get(k)) != json.dumps(new[k])}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir!r} holds a checkpoint of a different model ({detail}). '
                     'Use a fresh --workdir, or the config that trained it.')


def restore_for_inference(workdir: str, *, best: bool = True, ema: bool | None = None,
                          config=None):
  """(config, method, params) of a trained run: the best-by-validation (else latest) EMA params.

  config: the config to build the method from (default: the run's own config.json); it must
  describe the same method and model (`check_same_model`)."""
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  if config is None:
    config = load_config(workdir)
  else:
    check_same_model(config, workdir)
  ema = config.localize.use_ema if ema is None else ema
  key = 'ema_params' if ema else 'params'
  restored = None
  if best and os.path.isdir(os.path.join(workdir, 'best')):
    mngr = _manager(os.path.join(workdir, 'best'), keep=1, best=True)
    step = mngr.best_step() or mngr.latest_step()
    if step is not None:
      restored = mngr.restore(step, args=ocp.args.StandardRestore())[key]
    mngr.close()
  if restored is None:
    mngr = _manager(os.path.join(workdir, 'checkpoints'), keep=1, best=False)
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {workdir!r} (looked in best/ and checkpoints/): '
                              'train first with run_train.py --workdir=' + workdir)
    restored = mngr.restore(step, args=ocp.args.StandardRestore())[key]
    mngr.close()
  method = methods.create(config)
  _check_params_fit(method, restored, workdir)
  return config, method, restored


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
                     f'{os.path.join(workdir, "config.json")} describes (first differences, as '
                     f'(param, checkpoint shape, config shape): {diff}); was another run copied '
                     'into it?')
