"""Per-image standardization of the network input (config.data.normalize): the formula against
numpy, its invariance to a photo's exposure, and that training and scoring both apply it."""
import jax
import numpy as np
import pytest

from sano_jax import checkpointing, intensity, methods, train
from tests.helpers import ONE_LEVEL, tiny_config


def _images(n=3, size=16, channels=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)).astype(np.float32)


def test_standardize_is_the_formula_and_forgets_each_images_exposure():
  x = _images()
  got = jax.jit(lambda v: intensity.standardize(v, 'per_image'))(x)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  std = x.astype(np.float64).std(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(got, intensity.TARGET_STD * (x - mean) / std, atol=1e-5)
  np.testing.assert_allclose(np.std(got, axis=(1, 2, 3)), intensity.TARGET_STD, rtol=1e-4)
  # Another gain and offset per image (exposure): the same standardized image.
  gain = np.asarray([0.3, 1.0, 2.5], np.float32)[:, None, None, None]
  offset = np.asarray([-0.4, 0.0, 0.2], np.float32)[:, None, None, None]
  np.testing.assert_allclose(intensity.standardize(gain * x + offset, 'per_image'), got,
                             atol=1e-4)
  # A flat image maps to zeros, not NaN; 'none' is the input itself.
  flat = np.full((1, 4, 4, 1), 0.3, np.float32)
  np.testing.assert_array_equal(intensity.standardize(flat, 'per_image'), 0.0)
  assert intensity.standardize(x, 'none') is x


def test_an_unknown_mode_is_refused_naming_the_field():
  with pytest.raises(ValueError, match=r"config.data.normalize must be one of none, per_image, "
                                       r"got 'per_photo'"):
    methods.create(tiny_config(**{'data.normalize': 'per_photo'}))


def _step_and_loss(config, batch):
  """Params after one training step from fixed initial params, and the validation loss of batch."""
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  state = train.create_train_state(config, method, tx, jax.random.PRNGKey(0))
  mesh = train.make_mesh(jax.devices()[:1])
  step, evaluate = train.make_steps(config, method, tx, mesh)
  n = len(batch)  # one device: batches are [1, n, ...]
  val = evaluate(state.params, train.shard_batch(
      {'image': batch[None], 'index': np.arange(n)[None], 'valid': np.ones((1, n), bool)}, mesh),
                 jax.random.PRNGKey(1))
  new, _ = step(train.replicate(state, mesh), train.shard_batch({'image': batch[None]}, mesh))
  return train.to_host(new).params, float(val['loss_sum'])


def test_training_and_scoring_see_the_standardized_input():
  """With 'per_image', a training step, the validation loss and the field on images x are those of
  'none' on the standardized images; the field ignores a photo's exposure."""
  on = tiny_config(**{'method': 'ae', 'data.normalize': 'per_image', 'data.num_channels': 1,
                      'optim.warmup_steps': 0, **ONE_LEVEL})
  off = tiny_config(**{'method': 'ae', 'data.num_channels': 1, 'optim.warmup_steps': 0,
                       **ONE_LEVEL})
  x = 0.3 * _images(4, channels=1, seed=2) + 0.2  # exposure away from the standardized one
  x_std = np.asarray(intensity.standardize(x, 'per_image'))
  (p_on, loss_on), (p_off, loss_off) = _step_and_loss(on, x), _step_and_loss(off, x_std)
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5)
  assert abs(_step_and_loss(off, x)[1] - loss_off) > 1e-3 * abs(loss_off)  # it did change the input

  method = methods.create(on)
  field = jax.jit(method.field_fn(p_on))
  np.testing.assert_allclose(field(x), jax.jit(methods.create(off).field_fn(p_on))(x_std),
                             atol=1e-5)
  np.testing.assert_allclose(field(1.7 * x - 0.1), field(x), atol=1e-4)


def test_a_run_trained_standardized_is_refused_without_it(tmp_path):
  checkpointing.save_config(tiny_config(**{'data.normalize': 'per_image'}), str(tmp_path))
  with pytest.raises(ValueError, match='normalize: checkpoint per_image vs config None'):
    checkpointing.check_same_model(tiny_config(), str(tmp_path))
  assert 'normalize' not in methods.create(tiny_config()).signature()  # old runs' signatures
