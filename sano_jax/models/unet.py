"""A Flax linen U-Net after Dhariwal & Nichol (2021, "ADM"), the score model s(x, t) of SANO §3.2.

The network predicts the noise eps of x(t) = alpha(t) x(0) + sigma(t) eps; the score is
-eps_hat / sigma(t) (see `sano_jax.score`). Parameters are float32; `dtype` sets the compute dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] of (continuous) timesteps t [B]: cos/sin(t * max_period^(-k/half))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of NHWC by broadcasting (no gather)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avgpool2x(x: jax.Array) -> jax.Array:
  """2x2 average pooling of NHWC by reshaping."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _gn_stats(x: jax.Array, groups: int, eps: float):
  """Per-(example, channel) broadcast mean and 1/std [B,1,C] of x [B,P,C] over its groups."""
  b, p, c = x.shape
  cg = c // groups
  n = p * cg
  mean = jnp.sum(x, axis=1).reshape(b, groups, cg).sum(-1) / n
  mean_sq = jnp.sum(x * x, axis=1).reshape(b, groups, cg).sum(-1) / n
  inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + eps)
  return jnp.repeat(mean, cg, axis=-1)[:, None, :], jnp.repeat(inv, cg, axis=-1)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float):
  """y = (x - mean) * rsqrt(var + eps) * scale + bias, x [B,P,C] float32, stats per (b, group)."""
  mean, inv = _gn_stats(x, groups, eps)
  return (x - mean) * (inv * scale) + bias


def _group_norm_fwd(x, scale, bias, groups, eps):
  mean, inv = _gn_stats(x, groups, eps)
  return (x - mean) * (inv * scale) + bias, (x, scale, mean, inv)


def _group_norm_bwd(groups, eps, res, dy):
  """The closed-form gradient in two passes over x and dy (per-channel sums, then elementwise):
  with g = dy * scale, dx = inv (g - mean_G(g) - xhat mean_G(g xhat)), the group means over
  P * C/G elements; d scale = sum dy xhat, d bias = sum dy."""
  del eps
  x, scale, mean, inv = res
  b, p, c = x.shape
  cg = c // groups
  n = p * cg
  xhat = (x - mean) * inv
  sum_dy = jnp.sum(dy, axis=1)  # [B, C]
  sum_dy_xhat = jnp.sum(dy * xhat, axis=1)
  group_mean = lambda v: jnp.repeat((v * scale).reshape(b, groups, cg).sum(-1) / n, cg,
                                    axis=-1)[:, None, :]
  dx = inv * (dy * scale - group_mean(sum_dy) - xhat * group_mean(sum_dy_xhat))
  return dx, jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm`'s maths and parameters ('scale', 'bias'; epsilon 1e-6; float32 statistics,
  var = E[x^2] - E[x]^2; y = (x - mean) * rsqrt(var + eps) * scale + bias) for channels-last input,
  written for XLA:CPU: the statistics are summed per channel over the spatial axes first ([B, H*W, C]
  reduced over its middle axis) and then per group, and the gradient is the closed-form one (a
  custom_vjp: one reduction pass and one elementwise pass over x and dy), instead of flax's reduction
  over the (H, W, C/G) axes of [B, H, W, G, C/G] and its autodiff. Same values and gradients up to
  float32 rounding (tests/test_unet.py). (Fusing the following scale-shift and SiLU into this op's
  custom_vjp was measured slower in the whole step; see benchmarks/README.md.)"""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {self.num_groups} groups do not divide {c} channels')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = _group_norm(x.astype(jnp.float32).reshape(b, -1, c), scale, bias, self.num_groups,
                    float(self.epsilon))
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x, jnp.float32)
    return y.reshape(x.shape).astype(dtype)


def group_norm(num_groups: int, channels: int, dtype, name: str | None = None) -> GroupNorm:
  """GroupNorm with the largest group count <= num_groups that divides `channels`."""
  return GroupNorm(num_groups=math.gcd(num_groups, channels), dtype=dtype, name=name)


class Resample(nn.Module):
  """Up- or down-sampling by 2, with an optional 3x3 convolution (ADM's Upsample/Downsample)."""
  mode: str  # 'up' or 'down'
  with_conv: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if self.mode == 'up':
      x = upsample2x(x)
      return nn.Conv(c, (3, 3), dtype=self.dtype)(x) if self.with_conv else x
    if self.with_conv:
      return nn.Conv(c, (3, 3), strides=(2, 2), dtype=self.dtype)(x)
    return avgpool2x(x)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, time embedding (scale-shift norm), GroupNorm-SiLU-dropout-conv(zero init), + skip."""
  out_ch: int
  dropout: float = 0.0
  scale_shift_norm: bool = True
  resample: str | None = None  # None, 'up' or 'down'
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    norm = lambda name, ch: group_norm(self.num_groups, ch, self.dtype, name)
    h = nn.silu(norm('norm0', x.shape[-1])(x))
    if self.resample == 'up':
      h, x = upsample2x(h), upsample2x(x)
    elif self.resample == 'down':
      h, x = avgpool2x(h), avgpool2x(x)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv0')(h)
    emb_out = nn.Dense(2 * self.out_ch if self.scale_shift_norm else self.out_ch,
                       dtype=self.dtype, name='emb')(nn.silu(emb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = norm('norm1', self.out_ch)(h) * (1 + scale) + shift
    else:
      h = norm('norm1', self.out_ch)(h + emb_out)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=zeros_init, name='conv1')(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, `num_head_channels` channels per head."""
  num_head_channels: int = 64
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    heads = max(1, c // self.num_head_channels)
    h = group_norm(self.num_groups, c, self.dtype)(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(h).reshape(b, hh * ww, 3, heads, c // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    h = jax.nn.dot_product_attention(q, k, v).reshape(b, hh, ww, c)
    h = nn.Dense(c, dtype=self.dtype, kernel_init=zeros_init, name='proj')(h)
    return x + h


class UNet(nn.Module):
  """The ADM U-Net: eps_hat = UNet(x, t), x [B,H,W,C] in [-1,1] (noised), t [B] in (0, 1]."""
  nf: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_head_channels: int = 64
  dropout: float = 0.1
  resblock_updown: bool = True
  scale_shift_norm: bool = True
  num_groups: int = 32
  out_channels: int | None = None
  time_scale: float = 999.0  # continuous t in [0,1] -> the DDPM step index scale of the embedding
  dtype: str = 'float32'
  # The training input size. Attention sits at the levels where input_size / 2^level is in
  # attn_resolutions, so a model trained on crops runs fully convolutionally on larger images with
  # the same blocks (None: decided by the size of the input it is called on).
  input_size: int | None = None

  @nn.compact
  def __call__(self, x, t, train: bool = False):
    dtype = jnp.dtype(self.dtype)
    b, height, width, channels = x.shape
    if height % 2 ** (len(self.ch_mult) - 1) or width % 2 ** (len(self.ch_mult) - 1):
      raise ValueError(f'image size {height}x{width} is not divisible by 2^{len(self.ch_mult) - 1} '
                       f'(model.ch_mult={tuple(self.ch_mult)} has {len(self.ch_mult)} levels)')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    emb = timestep_embedding(t * self.time_scale, self.nf)
    emb = nn.Dense(4 * self.nf, dtype=dtype, name='temb0')(emb.astype(dtype))
    emb = nn.Dense(4 * self.nf, dtype=dtype, name='temb1')(nn.silu(emb))

    res = lambda ch, resample=None: ResBlock(
        ch, self.dropout, self.scale_shift_norm, resample, self.num_groups, dtype)
    attn = lambda: AttentionBlock(self.num_head_channels, self.num_groups, dtype)

    attends = lambda h, level: ((self.input_size >> level) if self.input_size else h.shape[1]
                                ) in self.attn_resolutions

    h = nn.Conv(self.nf * self.ch_mult[0], (3, 3), dtype=dtype, name='conv_in')(x.astype(dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(self.nf * mult)(h, emb, train)
        if attends(h, level):
          h = attn()(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = (res(h.shape[-1], 'down')(h, emb, train) if self.resblock_updown
             else Resample('down', True, dtype)(h))
        skips.append(h)

    h = res(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = res(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res(self.nf * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if attends(h, level):
          h = attn()(h)
      if level != 0:
        h = (res(h.shape[-1], 'up')(h, emb, train) if self.resblock_updown
             else Resample('up', True, dtype)(h))
    assert not skips

    h = nn.silu(group_norm(self.num_groups, h.shape[-1], dtype, 'norm_out')(h))
    h = nn.Conv(self.out_channels or channels, (3, 3), dtype=dtype, kernel_init=zeros_init,
                name='conv_out')(h)
    return h.astype(jnp.float32)
