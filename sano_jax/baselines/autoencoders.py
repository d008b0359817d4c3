"""The reconstruction baselines of SANO's Table 1 behind the method interface (`sano_jax.methods`).

Each localizes by reconstruction error, as in the SANO paper: field = x - x_hat (x in [-1, 1]), so the
anomaly map is A = G_sigma * mean_c |x - x_hat| and the healthy-statistics thresholds apply as they do
to SANO's score. The networks are in `sano_jax/models/autoencoder.py` (architecture and what we
changed to fit 16-256 px are written there). Per example, with D = H W C pixels:

  ae        (Baur et al. 2021)      loss = mean_d (x_hat - x)^2
  vae       (Kingma & Welling 2014) loss = mean_d (x_hat_z - x)^2 + w_kl KL(q(z|x) || N(0, I)) / D,
                                    z = mu + exp(logvar / 2) eps, KL = 1/2 sum(mu^2 + e^logvar - 1 - logvar)
  cevae     (Zimmerer et al. 2018)  the VAE loss + w_ce mean_d (x_hat(x~) - x)^2, x~ = x with a random
                                    rectangle replaced by uniform noise (context encoding, inpainting);
                                    x_hat(x~) decodes the latent mean of x~
  vqvae     (van den Oord 2017;     loss = mean_d (x_hat - x)^2 + mean |sg(z_e) - e|^2 + beta mean |z_e - sg(e)|^2,
             Razavi et al. 2019)    e the nearest codebook vector, x_hat = dec(z_e + sg(e - z_e)) (straight-through)
  anovaegan (Baur et al. 2018)      generator (a VAE): mean_d |x_hat_z - x| + w_kl KL / D + w_adv softplus(-D(x_hat_z));
                                    discriminator: softplus(-D(x)) + softplus(D(sg(x_hat_z)))
                                    (non-saturating GAN, D a logit). 'loss' is their sum, the generator
                                    term seeing sg(discriminator params), so that each network's
                                    gradient is its own objective's; each has its own Adam.

For the map, the VAE family decodes the latent mean (no sampling): a deterministic reconstruction.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp

from sano_jax.method_base import Method
from sano_jax.models import autoencoder as ae_models

sg = jax.lax.stop_gradient


def per_example_mean(x: jax.Array) -> jax.Array:
  """mean over all but the first axis: [B, ...] -> [B]."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def kl_diag_gaussian(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, diag e^logvar) || N(0, I)) per example [B] = 1/2 sum(mu^2 + e^logvar - 1 - logvar)."""
  kl = 0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def example_keys(rng: jax.Array, ids: jax.Array, tag: int) -> jax.Array:
  """One key per example [B], fold_in(fold_in(rng, ids[i]), tag): independent of the batch split."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), tag))(ids)


def example_normal(rng: jax.Array, ids: jax.Array, shape, tag: int) -> jax.Array:
  """N(0, I) of `shape` [B, ...], example i from its `example_keys`."""
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(example_keys(rng, ids, tag))


def context_mask(rng: jax.Array, height: int, width: int, max_fraction: float) -> jax.Array:
  """One random axis-aligned rectangle [H, W] (1 inside), sides uniform in [max(1, H/8), max_fraction H]."""
  kh, kw, ky, kx = jax.random.split(rng, 4)
  side = lambda k, n: jax.random.randint(k, (), max(1, n // 8), max(2, int(max_fraction * n)) + 1)
  h, w = side(kh, height), side(kw, width)
  y0 = jax.random.randint(ky, (), 0, height - h + 1)
  x0 = jax.random.randint(kx, (), 0, width - w + 1)
  yy, xx = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return ((yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)).astype(jnp.float32)


def code_perplexity(codes: jax.Array, num_codes: int) -> jax.Array:
  """exp(entropy) of the empirical code distribution: 1 (one code used) .. num_codes (uniform)."""
  p = jnp.bincount(codes.reshape(-1), length=num_codes) / codes.size
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class AE(Method):
  """config.method='ae': the deterministic convolutional autoencoder."""
  name = 'ae'
  module_cls = ae_models.AutoEncoder

  @staticmethod
  def downsampling(config) -> tuple[str, int]:
    return 'autoencoder', len(config.autoencoder.ch_mult)

  def __init__(self, config):
    super().__init__(config)
    a = config.autoencoder
    self.arch = {'nf': int(a.nf), 'ch_mult': [int(m) for m in a.ch_mult],
                 'latent_channels': int(a.latent_channels), 'num_groups': int(a.num_groups)}
    self.model = self.build(config)

  def build(self, config):
    a = self.arch
    return self.module_cls(nf=a['nf'], ch_mult=tuple(a['ch_mult']),
                           latent_channels=a['latent_channels'], out_channels=self.image_shape[-1],
                           num_groups=a['num_groups'])

  def signature(self) -> dict:
    return {**super().signature(), 'autoencoder': self.arch}

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1,) + self.train_shape))['params']

  def apply(self, params, *args, method=None):
    return self.model.apply({'params': params}, *args, method=method)

  def reconstruct(self, params, x):
    """The deterministic reconstruction x_hat used for the anomaly map."""
    return self.apply(params, x)

  def field(self, params, x):
    x = x.astype(jnp.float32)
    return x - self.reconstruct(params, x)

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    del ids, rng, train, dropout_rng
    return {'loss': per_example_mean(jnp.square(self.reconstruct(params, x) - x))}


class VAE(AE):
  """config.method='vae' (config.vae.kl_weight)."""
  name = 'vae'
  module_cls = ae_models.VAE

  def __init__(self, config):
    super().__init__(config)
    self.kl_weight = float(config[self.name].kl_weight)

  def encode(self, params, x):
    return self.apply(params, x, method=self.module_cls.encode)

  def decode(self, params, z):
    return self.apply(params, z, method=self.module_cls.decode)

  def sample_reconstruction(self, params, x, ids, rng):
    """(x_hat from z ~ q(z|x), KL / D per example): the reparameterised VAE pass."""
    mu, logvar = self.encode(params, x)
    z = mu + jnp.exp(0.5 * logvar) * example_normal(rng, ids, mu.shape, tag=0)
    return self.decode(params, z), kl_diag_gaussian(mu, logvar) / x[0].size

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    x_hat, kl = self.sample_reconstruction(params, x, ids, rng)
    rec = per_example_mean(jnp.square(x_hat - x))
    return {'loss': rec + self.kl_weight * kl, 'rec': rec, 'kl': kl}


class CEVAE(VAE):
  """config.method='cevae' (config.cevae.{kl_weight, ce_weight, max_box_fraction})."""
  name = 'cevae'

  def __init__(self, config):
    super().__init__(config)
    c = config.cevae
    self.ce_weight, self.max_box_fraction = float(c.ce_weight), float(c.max_box_fraction)

  def mask_input(self, x, ids, rng):
    """(x~, mask [B,H,W,1]): one random rectangle per example replaced by uniform noise in [-1, 1]."""
    h, w = x.shape[1:3]
    keys = example_keys(rng, ids, tag=1)
    mask = jax.vmap(lambda k: context_mask(k, h, w, self.max_box_fraction))(keys)[..., None]
    noise = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2), x.shape[1:],
                                                  minval=-1.0, maxval=1.0))(keys)
    return x * (1.0 - mask) + noise * mask, mask

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    out = super().losses(params, x, ids, rng, train=train)
    x_masked, _ = self.mask_input(x, ids, rng)
    inpaint = per_example_mean(jnp.square(self.reconstruct(params, x_masked) - x))
    return {**out, 'loss': out['loss'] + self.ce_weight * inpaint, 'inpaint': inpaint}


class VQVAE(AE):
  """config.method='vqvae' (config.vqvae.{num_codes, commitment})."""
  name = 'vqvae'

  def __init__(self, config):
    self.num_codes = int(config.vqvae.num_codes)
    self.commitment = float(config.vqvae.commitment)
    super().__init__(config)

  def build(self, config):
    a = self.arch
    return ae_models.VQVAE(nf=a['nf'], ch_mult=tuple(a['ch_mult']),
                           latent_channels=a['latent_channels'], out_channels=self.image_shape[-1],
                           num_groups=a['num_groups'], num_codes=self.num_codes)

  def signature(self) -> dict:
    return {**super().signature(), 'num_codes': self.num_codes}

  def encode(self, params, x):
    return self.apply(params, x, method=ae_models.VQVAE.encode)

  def quantize(self, params, z_e):
    return self.apply(params, z_e, method=ae_models.VQVAE.quantize)

  def decode(self, params, z):
    return self.apply(params, z, method=ae_models.VQVAE.decode)

  def codes(self, params, x):
    """The code indices [B, h, w] of images x in [-1, 1]."""
    return self.quantize(params, self.encode(params, x))[1]

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    z_e = self.encode(params, x)
    e, _ = self.quantize(params, z_e)
    x_hat = self.decode(params, z_e + sg(e - z_e))  # straight-through: d x_hat / d z_e = d / d e
    rec = per_example_mean(jnp.square(x_hat - x))
    codebook = per_example_mean(jnp.square(sg(z_e) - e))
    commit = per_example_mean(jnp.square(z_e - sg(e)))
    return {'loss': rec + codebook + self.commitment * commit, 'rec': rec, 'codebook': codebook,
            'commitment': commit}


class AnoVAEGAN(VAE):
  """config.method='anovaegan' (config.anovaegan.{kl_weight, adv_weight, disc_lr, disc_nf,
  disc_layers}). params = {'vae': generator, 'disc': discriminator}."""
  name = 'anovaegan'

  @staticmethod
  def learning_rates(config) -> dict:
    return {'optim.lr': config.optim.lr, 'anovaegan.disc_lr': config.anovaegan.disc_lr}

  def __init__(self, config):
    super().__init__(config)
    c = config.anovaegan
    self.adv_weight = float(c.adv_weight)
    self.disc_arch = {'disc_nf': int(c.disc_nf), 'disc_layers': int(c.disc_layers)}
    self.disc = ae_models.Discriminator(nf=self.disc_arch['disc_nf'],
                                        num_layers=self.disc_arch['disc_layers'],
                                        num_groups=self.arch['num_groups'])
    self.disc_optim = copy.deepcopy(config.optim)
    with self.disc_optim.unlocked():
      self.disc_optim.lr = float(c.disc_lr)

  def signature(self) -> dict:
    return {**super().signature(), **self.disc_arch}

  def init(self, rng):
    r_vae, r_disc = jax.random.split(rng)
    x = jnp.zeros((1,) + self.train_shape)
    return {'vae': super().init(r_vae),
            'disc': self.disc.init(r_disc, x)['params']}

  def apply(self, params, *args, method=None):
    return self.model.apply({'params': params['vae']}, *args, method=method)

  def discriminate(self, disc_params, x):
    """The discriminator's logit [B] (real: > 0)."""
    return self.disc.apply({'params': disc_params}, x)

  def discriminator_loss(self, disc_params, x, x_fake):
    """softplus(-D(x)) + softplus(D(x_fake)) per example: -log sigmoid(D(x)) - log(1 - sigmoid(D(x~)))."""
    return (jax.nn.softplus(-self.discriminate(disc_params, x))
            + jax.nn.softplus(self.discriminate(disc_params, x_fake)))

  def losses(self, params, x, ids, rng, *, train: bool, dropout_rng=None) -> dict:
    x_hat, kl = self.sample_reconstruction(params, x, ids, rng)
    rec = per_example_mean(jnp.abs(x_hat - x))
    adv = jax.nn.softplus(-self.discriminate(sg(params['disc']), x_hat))
    generator = rec + self.kl_weight * kl + self.adv_weight * adv
    disc = self.discriminator_loss(params['disc'], x, sg(x_hat))
    return {'loss': generator + disc, 'select': rec + self.kl_weight * kl, 'rec': rec, 'kl': kl,
            'adversarial': adv, 'discriminator': disc}

  def optimizer_groups(self):
    labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
    return labels, {'vae': None, 'disc': self.disc_optim}  # None: config.optim


METHODS = {m.name: m for m in (AE, VAE, CEVAE, VQVAE, AnoVAEGAN)}  # read by sano_jax/methods.py
