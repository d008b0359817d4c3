"""The ADM U-Net: shapes, dtypes, zero-initialised output, time conditioning, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sano_jax.models.unet import UNet, timestep_embedding, upsample2x, avgpool2x

TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_head_channels=8,
            dropout=0.1, num_groups=4)


def init(model, shape=(2, 16, 16, 3)):
  return model.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.ones(shape[:1]))['params']


@pytest.fixture(scope='module')
def tiny_params():
  """init(UNet(**TINY)) with every weight perturbed (the output convolution starts at zero)."""
  params = init(UNet(**TINY))
  return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)


@pytest.mark.parametrize('updown', [True, False])
def test_output_shape_and_zero_init(updown):
  model = UNet(**TINY, resblock_updown=updown)
  params = init(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  out = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))(params, x, jnp.array([0.1, 0.9]))
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Zero-initialised output convolution: the untrained model predicts no noise at all.
  np.testing.assert_array_equal(out, 0.0)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any('AttentionBlock' in p for p in paths)  # attention at 8x8 = attn_resolutions


def test_depends_on_time_and_input_and_uses_dropout(tiny_params):
  model, params = UNet(**TINY), tiny_params
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  t = jnp.array([0.1, 0.5, 0.9])
  f = jax.jit(lambda x, t: model.apply({'params': params}, x, t))
  a = f(x, t)
  # Time and input conditioning: changing example 1's t or image changes example 1's output...
  t2 = t.at[1].set(0.3)
  x2 = x.at[1].multiply(0.5)
  for b in (f(x, t2), f(x2, t)):
    assert float(jnp.abs(b[1] - a[1]).max()) > 1e-3
    # ... and nothing else: examples are independent (no statistics across the batch).
    np.testing.assert_allclose(b[0], a[0], atol=1e-5)
    np.testing.assert_allclose(b[2], a[2], atol=1e-5)
  # The same example gives the same output at any position in the batch.
  np.testing.assert_allclose(f(x[::-1], t[::-1])[::-1], a, atol=1e-5)
  # Dropout in training: different rngs, different outputs; the same rng, the same output.
  train = jax.jit(lambda key: model.apply({'params': params}, x, t, train=True,
                                          rngs={'dropout': key}))
  d1, d2 = train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(1))
  assert float(jnp.abs(d1 - d2).max()) > 1e-4
  np.testing.assert_array_equal(train(jax.random.PRNGKey(0)), d1)
  assert float(jnp.abs(d1 - a).max()) > 1e-4
  # Eval mode ignores any dropout rng: the deterministic output, whatever the key.
  evaluate = jax.jit(lambda key: model.apply({'params': params}, x, t, train=False,
                                             rngs={'dropout': key}))
  for key in (0, 1):
    np.testing.assert_allclose(evaluate(jax.random.PRNGKey(key)), a, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(tiny_params):
  params = tiny_params
  bf16 = UNet(**TINY, dtype='bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(jax.eval_shape(lambda: init(bf16))))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  t = jnp.array([0.3, 0.6])
  ref = UNet(**TINY).apply({'params': params}, x, t)
  out = bf16.apply({'params': params}, x, t)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_helpers_against_numpy():
  x = np.random.RandomState(0).randn(2, 4, 6, 3).astype(np.float32)
  np.testing.assert_array_equal(upsample2x(x), x.repeat(2, 1).repeat(2, 2))
  np.testing.assert_allclose(avgpool2x(x), x.reshape(2, 2, 2, 3, 2, 3).mean((2, 4)), rtol=1e-6)
  emb = timestep_embedding(jnp.array([0.0, 10.0]), 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  np.testing.assert_allclose(emb[1, 0], np.cos(10.0), rtol=1e-6)


def test_bad_image_size_is_a_clear_error():
  with pytest.raises(ValueError, match='not divisible'):
    init(UNet(**TINY), shape=(1, 15, 15, 3))


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 16), 4), ((3, 4, 6, 12), 12), ((1, 8, 8, 8), 1)])
def test_group_norm_matches_flax(shape, groups):
  """The U-Net's GroupNorm (per-channel sums first and a closed-form gradient, for speed on CPU) is
  flax's GroupNorm: same parameters, same values and gradients (w.r.t. input and parameters, also
  through a following SiLU) up to float32 rounding."""
  import flax.linen as nn
  from sano_jax.models.unet import GroupNorm
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), shape)
  ours, ref = GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups)
  p = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(p) == jax.tree.structure(ours.init(jax.random.PRNGKey(1), x))
  p = jax.tree.map(lambda v: v + jax.random.normal(jax.random.PRNGKey(2), v.shape), p)
  np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), atol=2e-5)
  g = jax.random.normal(jax.random.PRNGKey(3), shape)
  grads = [jax.grad(lambda p, x, m=m: jnp.sum(nn.silu(m.apply(p, x)) * g), argnums=(0, 1))(p, x)
           for m in (ours, ref)]
  for a, b in zip(*(jax.tree.leaves(gr) for gr in grads)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
  bf = GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
  assert bf.dtype == jnp.bfloat16
