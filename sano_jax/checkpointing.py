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
  """The config fields a checkpoint's shapes depend on."""
  m = config.model
  return {'image_size': config.data.image_size, 'num_channels': config.data.num_channels,
          'nf': m.nf, 'ch_mult': list(m.ch_mult), 'num_res_blocks': m.num_res_blocks,
          'attn_resolutions': list(m.attn_resolutions), 'num_head_channels': m.num_head_channels,
          'resblock_updown': m.resblock_updown, 'scale_shift_norm': m.scale_shift_norm,
          'num_groups': m.num_groups}


def check_same_model(config, workdir: str) -> None:
  """A clear error when `workdir` holds a run of another model than `config` describes."""
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  old = model_signature(load_config(workdir))
  new = model_signature(config)
  diff = {k: (old[k], new[k]) for k in new if json.dumps(old.get(k)) != json.dumps(new[k])}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a} vs config {b}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir!r} holds a checkpoint of a different model ({detail}). '
                     'Use a fresh --workdir, or the config that trained it.')


def restore_for_inference(workdir: str, *, best: bool = True, ema: bool | None = None):
  """(config, model, params) of a trained run: the best-by-validation (else latest) EMA params."""
  from sano_jax import models
  config = load_config(workdir)
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
  return config, models.create_model(config), restored
