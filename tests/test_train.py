"""The training step and run: multi-device equivalence, learning, resume, and clear errors."""

import jax
import numpy as np
import pytest

from sano_jax import methods, train
from tests.helpers import tiny_config


def _setup(config):
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  state = train.create_train_state(config, method, tx, jax.random.PRNGKey(0))
  return method, tx, state


def _run_steps(config, state, batches, devices):
  method, tx, _ = _setup(config)
  mesh = train.make_mesh(devices)
  step, _ = train.make_steps(config, method, tx, mesh)
  s = train.replicate(state, mesh)
  stacked = config.training.steps_per_call > 1
  for b in batches:
    s, metrics = step(s, train.shard_batch({'image': b}, mesh, stacked=stacked))
  return train.to_host(s), metrics


def _global_batches(n, bs, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.uniform(-1, 1, (bs, 16, 16, 1)).astype(np.float32) for _ in range(n)]


@pytest.mark.four_devices
def test_four_device_step_equals_one_device_step():
  assert jax.device_count() == 4
  config = tiny_config(**{'model.dropout': 0.0, 'optim.warmup_steps': 0})
  _, _, state = _setup(config)
  batches = _global_batches(2, 8)
  one, _ = _run_steps(config, state, [b[None] for b in batches], jax.devices()[:1])
  four, _ = _run_steps(config, state, [b.reshape(4, 2, 16, 16, 1) for b in batches], jax.devices())
  assert int(one.step) == int(four.step) == 2
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(jax.tree.leaves(one.ema_params), jax.tree.leaves(four.ema_params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # And the step did change the params.
  assert max(float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params))) > 1e-4


@pytest.mark.four_devices
def test_scanned_steps_equal_single_steps():
  config = tiny_config(**{'optim.warmup_steps': 0})
  _, _, state = _setup(config)
  batches = [b.reshape(4, 2, 16, 16, 1) for b in _global_batches(2, 8)]
  single, _ = _run_steps(config, state, batches, jax.devices())
  config2 = tiny_config(**{'optim.warmup_steps': 0, 'training.steps_per_call': 2})
  stacked = np.stack(batches, axis=1)  # [ndev, k, b, ...]
  scanned, _ = _run_steps(config2, state, [stacked], jax.devices())
  assert int(scanned.step) == 2
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(scanned.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
