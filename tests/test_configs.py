"""Every shipped config loads, has the keys other modules rely on, and passes the run's checks."""
import glob
import importlib
import os

import pytest

from sano_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))
KEYS = ['training.batch_size', 'training.num_train_steps', 'training.checkpoint_every',
        'training.eval_every', 'data.dataset', 'data.image_size', 'model.nf', 'model.ch_mult',
        'model.num_res_blocks', 'model.attn_resolutions', 'model.dtype', 'sde.beta_min',
        'sde.beta_max', 'sde.eps', 'localize.t', 'localize.n_sigma', 'localize.smoothing_sigma',
        'eval.bootstrap_runs', 'seed']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_complete_and_runnable(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  for key in KEYS:
    node = config
    for part in key.split('.'):
      node = node[part]
  train.check_config(config, num_devices=8 if config.training.batch_size % 8 == 0 else 4)


def test_paper_numbers_in_default():
  config = importlib.import_module('configs.default').get_config()
  assert (config.sde.beta_min, config.sde.beta_max, config.sde.num_scales) == (0.1, 20.0, 1000)
  assert (config.training.batch_size, config.optim.lr, config.data.image_size) == (64, 2e-4, 256)
  assert (config.localize.n_sigma, config.localize.smoothing_sigma) == (3.0, 2.0)
  assert config.eval.bootstrap_runs == 50


def test_check_config_errors():
  config = importlib.import_module('configs.tiny').get_config()
  config.training.steps_per_call = 3
  with pytest.raises(ValueError, match='multiple of training.steps_per_call=3'):
    train.check_config(config, 4)
  config = importlib.import_module('configs.tiny').get_config()
  config.model.dtype = 'float16'
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    train.check_config(config, 4)


VARIANTS = [(name, None) for name in CONFIGS] + [
    ('demo', v) for v in ('grass', 'gravel', 'retina', 'hubble')]


@pytest.mark.parametrize('name,variant', VARIANTS)
def test_every_config_builds_its_model_and_field(name, variant):
  """eval_shape (tracing, no compile) of init and of the field at the calibration's t-grid: every
  shipped config describes a model that builds, at its image size and channel count."""
  import jax  # pylint: disable=g-import-not-at-top
  from sano_jax import calibration, methods, multiscale  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  method = methods.create(config)
  params = jax.eval_shape(method.init, jax.random.PRNGKey(0))
  assert sum(x.size for x in jax.tree.leaves(params)) > 0
  multiscale.set_t(config, calibration.T_GRID)
  grid = methods.create(config)
  x = jax.ShapeDtypeStruct((2,) + method.image_shape, 'float32')
  fields = jax.eval_shape(grid.field, params, x)
  assert [f.shape for f in fields] == [x.shape] * len(calibration.T_GRID)


@pytest.mark.parametrize('method_name', ['ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm'])
def test_demo_config_builds_every_baseline(method_name):
  import jax  # pylint: disable=g-import-not-at-top
  from sano_jax import methods  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('configs.demo').get_config()
  config.method = method_name
  method = methods.create(config)
  params = jax.eval_shape(method.init, jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((2,) + method.image_shape, 'float32')
  out = jax.eval_shape(method.field, params, x)
  assert method.ts == (None,) and out.shape == x.shape
