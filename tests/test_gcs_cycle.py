"""A whole run in a gs:// workdir (issue 11 item 4): train (preempted at step 4 and resumed to 6)
-> evaluate -> load_localizer -> localize, on the fake bucket of tests/fake_gcs.py, against the same
run straight through in a local workdir.

The bucket is reached only through gs:// URIs (epath and Orbax); code that bypassed them would fail
or leave a local 'gs:' folder, which the `fake_gcs` fixture reports. TensorBoard's writer would
reach for the real GCS through TensorFlow's gfile, so the fixture makes it unimportable: training
and evaluation skip their summaries, on both workdirs alike.
"""
import json
import math
import os

import jax
import numpy as np

from sano_jax import checkpointing, evaluate, files, preemption, rundir, train
from tests import multihost_eval_worker as worker

STEPS, PREEMPT_AT = 6, 4


def _config():
  """The multi-host evaluation test's tiny config and data (gratings; two test images in three
  hold a bright square; a `kind` group), trained for STEPS steps."""
  config = worker.config('exact')
  t = config.training
  t.num_train_steps = t.eval_every = t.checkpoint_every = STEPS
  t.log_every = 3
  return config


def _evaluate_and_localize(workdir, data):
  """(metrics.json dict, params, (z, mask) of the first 8 test images) of the trained `workdir`."""
  out = evaluate.evaluate(_config(), workdir, train_source=data['train'],
                          val_source=data['validation'], test_source=data['test'])
  localizer = rundir.load_localizer(workdir)
  images = np.stack([ex['image'] for ex in data['test'][:8]]).astype(np.float32) / 255.0
  z, mask = localizer(images)
  params = checkpointing.restore_for_inference(workdir)[2]
  return out, params, (np.asarray(z), np.asarray(mask))


def _comparable(metrics: dict, workdir: str):
  """metrics.json without timings, with the workdir in paths replaced by 'WD'."""
  def norm(v):
    if isinstance(v, dict):
      return {k: norm(x) for k, x in v.items() if k != 'timing'}
    if isinstance(v, list):
      return [norm(x) for x in v]
    return v.replace(workdir, 'WD') if isinstance(v, str) else v
  return norm(json.loads(json.dumps(metrics)))


def _assert_close(a, b, where='metrics'):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), where
    for k in a:
      _assert_close(a[k], b[k], f'{where}.{k}')
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f'{where}[{i}]')
  elif isinstance(a, float) and isinstance(b, float):
    assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (where, a, b)
  else:
    assert a == b, (where, a, b)


def test_train_eval_localize_cycle_in_a_bucket_equals_a_local_one(fake_gcs, tmp_path, monkeypatch):
  data = worker.sources()
  kw = dict(train_source=data['train'], val_source=data['validation'])

  # Local, straight through.
  local = str(tmp_path / 'local')
  train.train_and_evaluate(_config(), local, **kw)
  local_out, local_params, (local_z, local_mask) = _evaluate_and_localize(local, data)

  # In the bucket: preempted at step PREEMPT_AT (a checkpoint there), then resumed to STEPS.
  wd = fake_gcs.url('runs', 'tiny')
  with monkeypatch.context() as m:
    m.setattr(preemption.Preemption, 'reached', lambda self, step, k=1: step >= PREEMPT_AT)
    assert int(train.train_and_evaluate(_config(), wd, **kw).step) == PREEMPT_AT
  assert files.listdir(f'{wd}/checkpoints') == [str(PREEMPT_AT)]
  assert not files.exists(f'{wd}/best')  # validation runs at step STEPS only
  assert int(train.train_and_evaluate(_config(), wd, **kw).step) == STEPS
  # A calibration file of the layout before the inference bundle: the evaluation removes it.
  files.atomic_write_json(f'{wd}/calibration.json', {'t': [0.1], 'rule': 'global', 'n_sigma': 2.0})
  out, params, (z, mask) = _evaluate_and_localize(wd, data)

  # What the run left in the bucket.
  assert files.read_json(f'{wd}/config.json')['training']['num_train_steps'] == STEPS
  assert str(STEPS) in files.listdir(f'{wd}/checkpoints')
  assert files.listdir(f'{wd}/best') == [str(STEPS)]
  rows = [json.loads(r) for r in files.read_text(f'{wd}/metrics.jsonl').splitlines()]
  # Both runs appended to it (an object cannot be appended to: rewritten whole), each starting
  # with its compile step.
  assert [r['step'] for r in rows if 'perf/compile_and_first_step_s' in r] == [1, PREEMPT_AT + 1]
  assert [r['step'] for r in rows if 'train/loss' in r] == [3, STEPS]
  assert [r['step'] for r in rows if 'validation/loss' in r] == [STEPS]
  assert not files.exists(f'{wd}/calibration.json')
  bundle = rundir.load(wd)
  assert tuple(bundle.stats.image_shape) == (16, 16, 1) and bundle.step == STEPS
  assert files.read_json(f'{wd}/eval/metrics.json') == json.loads(json.dumps(out))
  assert out['score_stats']['path'] == f'{wd}/{bundle.manifest["parts"]["stats"]["file"]}'
  assert files.exists(out['curves']['points'])
  figures = ['groups_kind.png', 'pr.png', 'roc.png', 'test_grid_00.png', 'z_histogram.png']
  assert files.listdir(f'{wd}/eval/figures') == figures
  assert sorted(out['figures'] + list(out['curves']['figures'].values())
                + [out['groups']['kind']['figure']]) == [f'{wd}/eval/figures/{f}' for f in figures]
  # TensorBoard cannot reach the fake bucket (TensorFlow's gfile goes to the real GCS): skipped.
  assert out['tensorboard'] is None and 'tensorboard' not in files.listdir(f'{wd}/eval')
  assert 'tensorboard' not in files.listdir(wd)
  # No temporary sibling of an atomic write is left anywhere in the bucket.
  left = [n for _, _, names in os.walk(fake_gcs.root) for n in names if '.tmp' in n]
  assert not left, left

  # The same run: params, z-maps, masks and metrics equal the local workdir's.
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(local_params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(z, local_z, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, local_mask)
  assert out['num_positive_pixels'] > 0 and math.isfinite(out['auroc'])
  _assert_close(_comparable(out, wd), _comparable(local_out, local))
