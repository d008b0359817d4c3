"""Convolutional autoencoders for the reconstruction baselines of SANO's Table 1.

Architecture: the spatial-bottleneck convolutional autoencoder of Baur et al. ("Autoencoders for
unsupervised anomaly segmentation in brain MR images: a comparative study", MedIA 2021; the models
of the SANO paper's Table 1 follow that study): an encoder of stride-2 convolutions that halves the
resolution at each level, a spatial latent [H/2^L, W/2^L, latent_channels], and a mirrored decoder.
What we changed to make one network serve 16 to 256 px:
  * depth and width are config values (`config.autoencoder.ch_mult`, `nf`), so the latent is
    H / 2^len(ch_mult) at any input size (e.g. 4x4 at 32 px, 16x16 at 256 px with 4 levels);
  * GroupNorm instead of BatchNorm: no batch statistics, so a step on a global batch gives the
    same params on 1 device or many (tests/test_methods.py), and evaluation is per-image;
  * nearest-neighbour upsampling + 3x3 convolution instead of transposed convolutions (no
    checkerboard artefacts in |x - x_hat|, the anomaly map);
  * a linear output layer (images in [-1, 1], no tanh), LeakyReLU(0.2) activations.
The variants: `AutoEncoder` (AE), `VAE` (Kingma & Welling; encoder -> mean and log-variance of a
diagonal Gaussian latent; ceVAE and AnoVAEGAN reuse it), `VQVAE` (van den Oord et al. 2017, Razavi
et al. 2019: one codebook on the spatial latent, straight-through gradients), and the small
`Discriminator` of AnoVAEGAN (Baur et al. 2018; a PatchGAN-style stack of stride-2 convolutions whose
patch logits are averaged into one logit per image). Models import nothing of ours.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=math.gcd(num_groups, channels), epsilon=1e-6)


def _act(x):
  return nn.leaky_relu(x, 0.2)


def _check_size(x, levels: int):
  h, w = x.shape[1:3]
  if h % 2**levels or w % 2**levels:
    raise ValueError(f'image size {h}x{w} is not divisible by 2^{levels} '
                     f'(autoencoder.ch_mult has {levels} levels)')


class Encoder(nn.Module):
  """x [B,H,W,C] -> [B, H/2^L, W/2^L, out_channels]: per level, a stride-2 4x4 conv then a 3x3 conv."""
  nf: int
  ch_mult: Sequence[int]
  out_channels: int
  num_groups: int = 8

  @nn.compact
  def __call__(self, x):
    _check_size(x, len(self.ch_mult))
    h = nn.Conv(self.nf, (3, 3))(x)
    for mult in self.ch_mult:
      ch = self.nf * mult
      h = nn.Conv(ch, (4, 4), strides=(2, 2))(_act(_norm(h.shape[-1], self.num_groups)(h)))
      h = nn.Conv(ch, (3, 3))(_act(_norm(ch, self.num_groups)(h)))
    return nn.Conv(self.out_channels, (1, 1))(_act(_norm(h.shape[-1], self.num_groups)(h)))


class Decoder(nn.Module):
  """z [B, h, w, c] -> [B, h 2^L, w 2^L, out_channels]: per level, nearest 2x upsampling + 3x3 convs."""
  nf: int
  ch_mult: Sequence[int]
  out_channels: int
  num_groups: int = 8

  @nn.compact
  def __call__(self, z):
    h = nn.Conv(self.nf * self.ch_mult[-1], (3, 3))(z)
    for mult in reversed(self.ch_mult):
      ch = self.nf * mult
      b, hh, ww, c = h.shape
      h = jax.image.resize(_act(_norm(c, self.num_groups)(h)), (b, 2 * hh, 2 * ww, c), 'nearest')
      h = nn.Conv(ch, (3, 3))(h)
      h = nn.Conv(ch, (3, 3))(_act(_norm(ch, self.num_groups)(h)))
    return nn.Conv(self.out_channels, (3, 3))(_act(_norm(h.shape[-1], self.num_groups)(h)))


class AutoEncoder(nn.Module):
  """x_hat = decode(encode(x)), a deterministic spatial bottleneck."""
  nf: int = 32
  ch_mult: Sequence[int] = (1, 2, 4)
  latent_channels: int = 16
  out_channels: int = 1
  num_groups: int = 8

  def setup(self):
    self.encoder = Encoder(self.nf, tuple(self.ch_mult), self.latent_channels, self.num_groups)
    self.decoder = Decoder(self.nf, tuple(self.ch_mult), self.out_channels, self.num_groups)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x))


class VAE(AutoEncoder):
  """encode(x) -> (mu, logvar) of q(z|x) = N(mu, diag exp(logvar)); decode(z) -> x_hat.

  __call__ decodes the mean (the deterministic reconstruction used for the anomaly map)."""

  def setup(self):
    self.encoder = Encoder(self.nf, tuple(self.ch_mult), 2 * self.latent_channels, self.num_groups)
    self.decoder = Decoder(self.nf, tuple(self.ch_mult), self.out_channels, self.num_groups)

  def encode(self, x):
    mu, logvar = jnp.split(self.encoder(x), 2, axis=-1)
    return mu, jnp.clip(logvar, -30.0, 20.0)

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


class VQVAE(AutoEncoder):
  """encode(x) -> z_e [B,h,w,D]; quantize(z_e) -> nearest codebook vectors e_k [B,h,w,D] and codes
  k [B,h,w]; decode(z_q) -> x_hat. `codebook` is [num_codes, D] (D = latent_channels)."""
  num_codes: int = 128

  def setup(self):
    super().setup()
    self.codebook = self.param('codebook', nn.initializers.normal(1.0),
                               (self.num_codes, self.latent_channels))

  def quantize(self, z_e):
    # As a jax array: restored params are numpy arrays, which a traced index cannot index.
    codebook = jnp.asarray(self.codebook)
    d = (jnp.sum(z_e**2, -1, keepdims=True) - 2.0 * z_e @ codebook.T
         + jnp.sum(codebook**2, -1))  # squared distances [B,h,w,K]
    codes = jnp.argmin(d, axis=-1)
    return jnp.take(codebook, codes, axis=0), codes

  def __call__(self, x):
    return self.decode(self.quantize(self.encode(x))[0])


class Discriminator(nn.Module):
  """x [B,H,W,C] -> one logit per image: stride-2 convs (LeakyReLU, no normalisation of the input
  layer), a 1-channel patch-logit conv, averaged over positions."""
  nf: int = 32
  num_layers: int = 3
  num_groups: int = 8

  @nn.compact
  def __call__(self, x):
    h = _act(nn.Conv(self.nf, (4, 4), strides=(2, 2))(x))
    for i in range(1, self.num_layers):
      ch = self.nf * 2**i
      h = _act(_norm(ch, self.num_groups)(nn.Conv(ch, (4, 4), strides=(2, 2))(h)))
    return jnp.mean(nn.Conv(1, (3, 3))(h), axis=(1, 2, 3))
