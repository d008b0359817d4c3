"""A damaged checkpoint (a truncated file, a missing entry) is detected on restore: training resumes
from the newest intact one and ends as if nothing had happened, inference falls back from best/ to
checkpoints/, a checkpoint of another model is still reported as such, and a run directory with no
intact checkpoint is a clear error (never a silent fresh start)."""
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from sano_jax import checkpointing, files, train
from tests.helpers import assert_same_checkpoint, grating_source, tiny_config

STEPS = {'training.num_train_steps': 30, 'training.checkpoint_every': 10,
         'training.eval_every': 30, 'training.log_every': 10}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, final host state) of a tiny run with checkpoints at steps 10, 20 and 30."""
  wd = tmp_path_factory.mktemp('trained') / 'run'
  src = grating_source(16)
  state = train.train_and_evaluate(tiny_config(**STEPS), str(wd), train_source=src, val_source=src)
  assert sorted(os.listdir(wd / 'checkpoints')) == ['10', '20', '30']
  return wd, state


def _copy(trained, tmp_path):
  wd = tmp_path / 'run'
  shutil.copytree(trained[0], wd)
  return wd


def _truncate_largest_file(folder):
  """Halves the largest file under `folder` (the array data)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_entry(folder):
  """Deletes the OCDBT manifest of the checkpoint's item (a missing directory entry)."""
  os.remove(os.path.join(folder, 'default', 'manifest.ocdbt'))


def _steps(wd, sub='checkpoints'):
  d = wd / sub
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


def test_resumes_from_newest_intact_checkpoint(trained, tmp_path, caplog):
  wd = _copy(trained, tmp_path)
  _truncate_largest_file(wd / 'checkpoints' / '30')
  _delete_entry(wd / 'checkpoints' / '20')
  caplog.set_level(logging.INFO, logger='absl')
  src = grating_source(16)
  state = train.train_and_evaluate(tiny_config(**STEPS), str(wd), train_source=src, val_source=src)
  log = caplog.text
  assert 'the checkpoint at step 30 in' in log and 'the checkpoint at step 20 in' in log, log
  assert 'is damaged' in log and f'resumed from {wd} at step 10' in log, log
  # The damaged ones were moved aside; steps 20 and 30 were trained and saved again, identically.
  assert _steps(wd, 'damaged_checkpoints') == [20, 30]
  assert _steps(wd) == [10, 20, 30] and int(state.step) == 30
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(trained[1])):
    np.testing.assert_array_equal(x, y)
  assert_same_checkpoint(wd, trained[0], 30)


def test_no_intact_checkpoint_is_a_clear_error(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  for step in (10, 20, 30):
    (_truncate_largest_file if step != 20 else _delete_entry)(wd / 'checkpoints' / str(step))
  src = grating_source(16)
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=re.escape(f"every checkpoint in '{wd}/checkpoints' is damaged: "
                                     'steps [30, 20, 10]')):
    train.train_and_evaluate(tiny_config(**STEPS), str(wd), train_source=src, val_source=src)
  assert _steps(wd) == [10, 20, 30] and not (wd / 'damaged_checkpoints').exists()  # nothing moved


def test_another_models_checkpoint_is_not_damage(trained, tmp_path):
  """Shapes or a tree structure that differ from the model's are a mismatch, not damage."""
  wd = _copy(trained, tmp_path)
  store = checkpointing.CheckpointStore(str(wd))
  host = trained[1]
  wider = jax.tree.map(lambda x: np.zeros((2,) + np.shape(x), np.asarray(x).dtype), host)
  with pytest.raises(ValueError, match=r'step 30 .* holds another model \(first differences'):
    store.restore_latest(wider)
  fewer = {'step': host.step, 'params': host.params}
  with pytest.raises(ValueError, match=r'step 30 .* holds another model'):
    store.restore_latest(fewer)
  store.close()
  assert _steps(wd) == [10, 20, 30] and not (wd / 'damaged_checkpoints').exists()


def test_inference_falls_back_from_damaged_best(trained, tmp_path, caplog):
  wd = _copy(trained, tmp_path)
  (best,) = _steps(wd, 'best')
  _truncate_largest_file(wd / 'best' / str(best))
  caplog.set_level(logging.WARNING, logger='absl')
  _, _, params, _ = checkpointing.restore_for_inference(str(wd))
  assert 'the best checkpoint in' in caplog.text and 'is damaged' in caplog.text, caplog.text
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(trained[1].ema_params)):
    np.testing.assert_array_equal(x, y)  # the latest checkpoint's (step 30) EMA params
  for step in _steps(wd):
    _truncate_largest_file(wd / 'checkpoints' / str(step))
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=re.escape(f"every checkpoint in '{wd}' is damaged: {wd}/best/")):
    checkpointing.restore_for_inference(str(wd))


def _flaky(monkeypatch, failures: int, error=TimeoutError('deadline exceeded while reading')):
  """Orbax's restore fails `failures` times with a storage error, then reads; no sleeping."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real = ocp.CheckpointManager.restore
  calls = []

  def restore(self, *a, **kw):
    calls.append(a[0] if a else kw.get('step'))
    if len(calls) <= failures:
      raise error
    return real(self, *a, **kw)
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  monkeypatch.setattr(files, 'BACKOFF_S', 0.0)
  return calls


def test_a_storage_error_is_retried_and_is_never_damage(trained, tmp_path, monkeypatch):
  """Two timeouts, then the read works: the run resumes from its newest checkpoint, retrying it,
  and nothing is moved aside (before, any error set the newer checkpoints aside)."""
  wd = _copy(trained, tmp_path)
  calls = _flaky(monkeypatch, failures=2)
  store = checkpointing.CheckpointStore(str(wd))
  state = train.create_train_state(tiny_config(**STEPS), *_method_and_tx(), jax.random.PRNGKey(0))
  restored = store.restore_latest(state)
  store.close()
  assert calls == [30, 30, 30] and int(restored.step) == 30
  assert _steps(wd) == [10, 20, 30] and _steps(wd, 'damaged_checkpoints') == []


def test_a_storage_error_that_persists_is_raised_and_moves_nothing(trained, tmp_path, monkeypatch):
  wd = _copy(trained, tmp_path)
  calls = _flaky(monkeypatch, failures=100, error=OSError('HTTP 503 Service Unavailable'))
  store = checkpointing.CheckpointStore(str(wd))
  state = train.create_train_state(tiny_config(**STEPS), *_method_and_tx(), jax.random.PRNGKey(0))
  with pytest.raises(files.TransientReadError, match=r'checkpoints/30 failed 4 times with '
                     r'a storage error \(OSError: HTTP 503.*nothing was moved'):
    store.restore_latest(state)
  store.close()
  assert calls == [30] * (files.RETRIES + 1)
  assert _steps(wd) == [10, 20, 30] and _steps(wd, 'damaged_checkpoints') == []
  with pytest.raises(files.TransientReadError, match=r'best/30 failed'):
    checkpointing.restore_for_inference(str(wd))  # never a silent fall-back to checkpoints/


def _method_and_tx():
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  config = tiny_config(**STEPS)
  method = methods.create(config)
  return method, train.create_optimizer(config, method)
