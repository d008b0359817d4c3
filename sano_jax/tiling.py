"""Whole-image inference in bounded memory: a field function run over overlapping tiles, blended.

A model trained on crops (`config.data.crop_size`) scores the whole stored image. The U-Net and
the autoencoders are fully convolutional, so the default is ONE pass over the whole image
(`config.localize.tile_size=None`). With `tile_size=T`, the image is cut into T x T tiles whose
starts are

    0, s, 2s, ..., and H - T (the last tile ends at the border),   s = T - overlap,

the field (any pytree of [B, H, W, ...] arrays, e.g. SANO's K scores) is computed per tile, and
the tiles are blended with a separable window w(i) w(j) that ramps linearly over the overlap:

    F(p) = sum_k w_k(p) f_k(p) / sum_k w_k(p),    w > 0 everywhere inside a tile.

The blend is a convex combination at every pixel, so a field that is the same in every tile
(a constant, or any pointwise function of x) comes out exactly as the single pass, with no seams;
a model's field differs from the single pass only by the context a tile cannot see. The tiles
run in a `lax.scan` whose carry is the blended canvas: memory is that of one tile's forward pass
plus two full-size maps, whatever the image size.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> np.ndarray:
  """Starts 0, s, 2s, ... of T-wide tiles covering [0, size), the last one ending at `size`."""
  if tile <= 0 or not 0 <= overlap < tile:
    raise ValueError(f'tile_size={tile} must be > 0 and tile_overlap={overlap} in [0, tile_size)')
  if size <= tile:
    return np.zeros((1,), np.int32)
  stride = tile - overlap
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] != size - tile:
    starts.append(size - tile)
  return np.asarray(starts, np.int32)


def blend_window(tile: int, overlap: int) -> np.ndarray:
  """1-D weights [T]: (k + 0.5) / overlap over the first and last `overlap` pixels, 1 between."""
  w = np.ones((tile,), np.float32)
  if overlap:
    ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    w[:overlap] = np.minimum(w[:overlap], ramp)
    w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
  return w


def tiled(field_fn: Callable, tile: int | None, overlap: int = 0) -> Callable:
  """x [B,H,W,C] -> field_fn's pytree of [B,H,W,...], computed over blended T x T tiles.

  tile=None, or an image no larger than one tile, is the single pass `field_fn(x)` itself.
  """
  if tile is None:
    return field_fn
  tile, overlap = int(tile), int(overlap)
  tile_starts(tile, tile, overlap)  # validates tile and overlap now, not at the first call

  def fn(x):
    b, h, w = x.shape[:3]
    if h <= tile and w <= tile:
      return field_fn(x)
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, min(overlap, th - 1)), tile_starts(w, tw, min(overlap, tw - 1))
    wy = jnp.asarray(blend_window(th, min(overlap, th - 1)) if len(ys) > 1 else np.ones(th))
    wx = jnp.asarray(blend_window(tw, min(overlap, tw - 1)) if len(xs) > 1 else np.ones(tw))
    weight = wy[:, None] * wx[None, :]  # [th, tw]
    starts = jnp.asarray([(y, x0) for y in ys for x0 in xs], jnp.int32)
    out_shapes = jax.eval_shape(field_fn, jax.ShapeDtypeStruct((b, th, tw) + x.shape[3:], x.dtype))

    def canvas(s):  # zeros shaped like the whole field, typed like x (under shard_map: varying
      # over the mesh axis as the field is, else scan refuses the carry)
      return jax.lax.full_like(x, 0, jnp.float32, (s.shape[0], h, w) + s.shape[3:])

    def expand(wt, a):  # [h', w'] -> broadcastable against a [B, h', w', ...]
      return wt.reshape((1,) + wt.shape + (1,) * (a.ndim - 3))

    def add_tile(carry, start):
      acc, total = carry
      y, x0 = start[0], start[1]
      patch = jax.lax.dynamic_slice(x, (0, y, x0) + (0,) * (x.ndim - 3), (b, th, tw) + x.shape[3:])
      f = field_fn(patch)

      def accumulate(a, v):
        idx = (0, y, x0) + (0,) * (a.ndim - 3)
        cur = jax.lax.dynamic_slice(a, idx, v.shape)
        return jax.lax.dynamic_update_slice(a, cur + expand(weight, v) * v.astype(jnp.float32), idx)

      acc = jax.tree.map(accumulate, acc, f)
      cur = jax.lax.dynamic_slice(total, (y, x0), (th, tw))
      total = jax.lax.dynamic_update_slice(total, cur + weight, (y, x0))
      return (acc, total), None

    init = (jax.tree.map(canvas, out_shapes), jnp.zeros((h, w), jnp.float32))
    (acc, total), _ = jax.lax.scan(add_tile, init, starts)
    return jax.tree.map(lambda a, s: (a / expand(total, a)).astype(s.dtype), acc, out_shapes)

  return fn
