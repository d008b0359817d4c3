"""The method interface: each method's own maths against closed forms and hand computations, the
device-count equivalence of its training step, and clear errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sano_jax import checkpointing, localization, anomaly_maps, score_stats, methods, train
from sano_jax import rundir
from sano_jax.baselines import autoencoders as aes
from tests.helpers import ONE_LEVEL, tiny_config

KEY = jax.random.PRNGKey


def _images(n=4, size=16, channels=1, seed=1):
  return jax.random.uniform(KEY(seed), (n, size, size, channels), minval=-1.0, maxval=1.0)


def _setup(config):
  method = methods.create(config)
  tx = train.create_optimizer(config, method)
  return method, tx, train.create_train_state(config, method, tx, KEY(0))


def _steps(config, method, tx, state, batches, devices):
  mesh = train.make_mesh(devices)
  step, _ = train.make_steps(config, method, tx, mesh)
  s = train.replicate(state, mesh)
  for b in batches:
    s, metrics = step(s, train.shard_batch({'image': b}, mesh))
  return train.to_host(s), train.to_host(metrics)


def test_anoddpm_trains_exactly_like_sano():
  from sano_jax.baselines import anoddpm
  assert anoddpm.AnoDDPM.losses is methods.SANO.losses and anoddpm.AnoDDPM.init is methods.SANO.init


@pytest.mark.four_devices
@pytest.mark.parametrize('name', [m for m in methods.METHODS if m != 'anoddpm'])  # = sano's step
def test_four_device_step_equals_one_device_step(name):
  """Two steps on 4 devices (2 images each) give the params and loss of the same steps on 1."""
  assert jax.device_count() == 4
  config = tiny_config(**{'method': name, 'model.dropout': 0.0, 'optim.warmup_steps': 0,
                          **ONE_LEVEL})
  method, tx, state = _setup(config)
  batches = [np.asarray(_images(8, seed=s)) for s in (1, 2)]
  one, m1 = _steps(config, method, tx, state, [b[None] for b in batches], jax.devices()[:1])
  four, m4 = _steps(config, method, tx, state, [b.reshape(4, 2, 16, 16, 1) for b in batches],
                    jax.devices())
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  changed = [float(np.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params))]
  assert max(changed) > 1e-4


def test_vae_kl_is_the_closed_form_of_a_diagonal_gaussian():
  rng = np.random.default_rng(0)
  mu, logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(scale=0.7, size=(3, 2, 2, 4))
  got = np.asarray(aes.kl_diag_gaussian(jnp.asarray(mu, jnp.float32), jnp.asarray(logvar, jnp.float32)))
  for i in range(3):  # KL(N(m, S) || N(0, I)) = 1/2 (tr S + m'm - k - log det S), full matrices
    m, cov = mu[i].ravel(), np.diag(np.exp(logvar[i].ravel()))
    want = 0.5 * (np.trace(cov) + m @ m - m.size - np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(got[i], want, rtol=1e-5)
  # The VAE's 'kl' term is that KL of its encoder's q(z|x), per data dimension.
  method = methods.create(tiny_config(method='vae', **ONE_LEVEL))
  params = method.init(KEY(0))
  x = _images()
  m_enc, lv_enc = method.encode(params, x)
  out = method.losses(params, x, jnp.arange(4), KEY(3), train=True)
  m_enc, lv_enc = np.asarray(m_enc, np.float64), np.asarray(lv_enc, np.float64)
  want = 0.5 * np.sum(m_enc**2 + np.exp(lv_enc) - 1 - lv_enc, axis=(1, 2, 3)) / (16 * 16)
  np.testing.assert_allclose(out['kl'], want, rtol=1e-4)
  np.testing.assert_allclose(out['loss'], out['rec'] + method.kl_weight * out['kl'], rtol=1e-6)


def test_vqvae_straight_through_passes_the_decoder_gradient_to_the_encoder():
  method = methods.create(tiny_config(method='vqvae', **ONE_LEVEL))
  params = method.init(KEY(0))
  x = _images()
  rec = lambda p: jnp.mean(method.losses(p, x, jnp.arange(4), KEY(1), train=True)['rec'])
  grads = jax.grad(rec)(params)
  # By hand: the gradient of the reconstruction at z_q = e, sent through the encoder's VJP.
  z_e = method.encode(params, x)
  e, _ = method.quantize(params, z_e)
  g_zq = jax.grad(lambda z: jnp.mean(jnp.square(method.decode(params, z) - x)))(e)
  _, vjp = jax.vjp(lambda p: method.encode(p, x), params)
  (by_hand,) = vjp(g_zq)
  for a, b in zip(jax.tree.leaves(grads['encoder']), jax.tree.leaves(by_hand['encoder'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['encoder'])) > 0
  np.testing.assert_array_equal(grads['codebook'], 0.0)  # the codebook learns from its own term


def test_cevae_inpaints_masked_inputs():
  config = tiny_config(method='cevae', **ONE_LEVEL)
  method = methods.create(config)
  params = method.init(KEY(0))
  x, ids, rng = _images(), jnp.arange(4), KEY(5)
  x_masked, mask = method.mask_input(x, ids, rng)
  mask = np.asarray(mask[..., 0]) > 0
  for i in range(4):  # one rectangle per example, inside replaced, outside kept
    rows, cols = np.flatnonzero(mask[i].any(1)), np.flatnonzero(mask[i].any(0))
    assert rows.size and cols.size and mask[i].sum() == rows.size * cols.size
    assert np.all(np.asarray(x_masked)[i][~mask[i]] == np.asarray(x)[i][~mask[i]])
    assert not np.allclose(np.asarray(x_masked)[i][mask[i]], np.asarray(x)[i][mask[i]])
  out = method.losses(params, x, ids, rng, train=True)
  inpaint = np.mean((np.asarray(method.reconstruct(params, x_masked)) - np.asarray(x))**2,
                    axis=(1, 2, 3))
  np.testing.assert_allclose(out['inpaint'], inpaint, rtol=1e-5)
  plain = aes.VAE(config).losses(params, x, ids, rng, train=True)  # the same net, no context term
  np.testing.assert_allclose(out['loss'], plain['loss'] + method.ce_weight * out['inpaint'], rtol=1e-5)


def test_anovaegan_step_updates_both_networks_with_their_own_objectives():
  config = tiny_config(**{'method': 'anovaegan', 'optim.warmup_steps': 0, **ONE_LEVEL})
  method, tx, state = _setup(config)
  x, ids, rng = _images(), jnp.arange(4), KEY(2)
  params = state.params
  out = method.losses(params, x, ids, rng, train=True)
  # The discriminator loss of the docstring: -log sigmoid(D(x)) - log(1 - sigmoid(D(x_hat))).
  x_hat, _ = method.sample_reconstruction(params, x, ids, rng)
  d_real = np.asarray(method.discriminate(params['disc'], x), np.float64)
  d_fake = np.asarray(method.discriminate(params['disc'], x_hat), np.float64)
  sig = lambda v: 1 / (1 + np.exp(-v))
  np.testing.assert_allclose(out['discriminator'], -np.log(sig(d_real)) - np.log(1 - sig(d_fake)),
                             rtol=1e-5)
  # One 'loss': each network's gradient is its own objective's.
  grads = jax.grad(lambda p: jnp.mean(method.losses(p, x, ids, rng, train=True)['loss']))(params)
  g_disc = jax.grad(lambda d: jnp.mean(method.discriminator_loss(d, x, x_hat)))(params['disc'])
  gen = lambda v: jnp.mean(method.losses({'vae': v, 'disc': params['disc']}, x, ids, rng,
                                         train=True)['loss']
                           - method.losses({'vae': v, 'disc': params['disc']}, x, ids, rng,
                                           train=True)['discriminator'])
  g_gen = jax.grad(gen)(params['vae'])
  for a, b in zip(jax.tree.leaves(grads['disc']), jax.tree.leaves(g_disc)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(grads['vae']), jax.tree.leaves(g_gen)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # One train step moves both networks.
  new, _ = _steps(config, method, tx, state, [np.asarray(_images(8))[None]], jax.devices()[:1])
  for part in ('vae', 'disc'):
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(new.params[part]), jax.tree.leaves(params[part])))
    assert moved > 1e-6, part


@pytest.mark.parametrize('name', methods.METHODS)
def test_field_jits_and_vmaps(name):
  """The localizer of every method: jit(localize) == vmap over single images, shapes and dtype."""
  config = tiny_config(method=name, **ONE_LEVEL)
  method = methods.create(config)
  params = method.init(KEY(0))
  images = (np.asarray(_images(3)) + 1) / 2
  stats = score_stats.fit_score_stats(method.field_fn(params), [images])
  loc = jax.jit(lambda p, im: localization.localize(method.field_fn(p), im, stats))
  z, mask = loc(params, images)
  assert z.shape == (3, 16, 16) and z.dtype == jnp.float32 and mask.dtype == jnp.bool_
  z1 = jax.vmap(lambda im: loc(params, im[None])[0][0])(jnp.asarray(images))
  np.testing.assert_allclose(z1, z, rtol=1e-4, atol=1e-5)


def test_unknown_method_and_ignored_blocks():
  with pytest.raises(ValueError, match="unknown method 'gan'.*sano, ae, vae, cevae, vqvae, "
                                       'anovaegan, anoddpm'):
    methods.create(tiny_config(method='gan'))
  with pytest.raises(ValueError, match="unknown method 'gan'"):
    train.check_config(tiny_config(method='gan'), 4)
  # Another method's block is ignored, even when it would not build.
  config = tiny_config(method='ae')
  config.vqvae = ml_collections.ConfigDict({'num_codes': 'not a number'})
  del config['anovaegan']
  assert methods.create(config).signature() == methods.create(tiny_config(method='ae')).signature()


def test_workdir_of_another_method_is_a_clear_error(tmp_path):
  checkpointing.save_config(tiny_config(method='vqvae'), str(tmp_path))
  with pytest.raises(ValueError, match="holds a 'vqvae' run, but config.method='sano'"):
    checkpointing.check_same_model(tiny_config(method='sano'), str(tmp_path))
  with pytest.raises(ValueError, match="holds a 'vqvae' run, not 'ae'"):
    rundir.load_localizer(str(tmp_path), method='ae')
  # A config of the same method with another codebook size: the differing field is named.
  with pytest.raises(ValueError, match='num_codes: checkpoint 16 vs config 32'):
    checkpointing.check_same_model(tiny_config(**{'method': 'vqvae', 'vqvae.num_codes': 32}),
                                   str(tmp_path))


_TOY = '''"""A toy method: field = x - b, b a learned per-channel brightness (loss: mean (x - b)^2)."""
import jax.numpy as jnp
from sano_jax.method_base import Method


class Toy(Method):
  name = 'toy'

  def __init__(self, config):
    super().__init__(config)
    self.weight = float(config.toy.weight)  # its own config block

  @staticmethod
  def downsampling(config):
    return 'toy', 0

  def init(self, rng):
    return {'b': jnp.zeros((self.image_shape[-1],))}

  def losses(self, params, x, ids, rng, *, train, dropout_rng=None):
    return {'loss': self.weight * jnp.mean(jnp.square(x - params['b']), axis=(1, 2, 3))}

  def field(self, params, x):
    return x - params['b']


METHODS = {'toy': Toy}
'''


def test_a_new_method_is_one_module_in_baselines_and_one_config_block(tmp_path, monkeypatch):
  """A module with METHODS = {'toy': Toy} beside the baselines, and config.toy: the registry finds
  it, and training, evaluation and load_localizer run it with no other change. Its field is
  x - b with b the learned brightness, so the z-map is |x - b| smoothed over the healthy std."""
  from sano_jax import baselines, evaluate, rundir, train  # pylint: disable=g-import-not-at-top
  from tests.helpers import grating_source  # pylint: disable=g-import-not-at-top
  (tmp_path / 'toy_method.py').write_text(_TOY)
  monkeypatch.setattr(baselines, '__path__', list(baselines.__path__) + [str(tmp_path)])
  assert 'toy' in methods.registry() and 'toy' not in methods.METHODS
  config = tiny_config(method='toy', **{'training.num_train_steps': 4, 'training.eval_every': 4,
                                        'training.checkpoint_every': 4, 'training.log_every': 4,
                                        'eval.bootstrap_runs': 2})
  config.toy = ml_collections.ConfigDict({'weight': 1.0})
  wd = str(tmp_path / 'run')
  healthy = grating_source(8)
  test = grating_source(4, seed=3)
  train.train_and_evaluate(config, wd, train_source=healthy, val_source=healthy)
  out = evaluate.evaluate(config, wd, train_source=healthy, val_source=healthy, test_source=test)
  assert out['localization']['method'] == 'toy'
  bundle = rundir.load(wd)
  assert type(bundle.method).__name__ == 'Toy' and bundle.params['b'].shape == (1,)
  images = np.stack([test[i]['image'] for i in range(2)]).astype(np.float32) / 255.0
  z, _ = rundir.load_localizer(wd)(images)
  want = np.asarray(anomaly_maps.gaussian_filter2d(
      np.abs(2.0 * images[..., 0] - 1.0 - np.asarray(bundle.params['b'])[0]),
      float(bundle.config.localize.smoothing_sigma))) / float(bundle.stats.std)
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
