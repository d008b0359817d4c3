"""Training on random crops of the stored images, scoring whole images (fully convolutional or over
blended tiles): crop offsets, tiling against a single pass, attention placement, end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from configs import tiny
from sano_jax import checkpointing, evaluate, input_pipeline as ip, methods, rundir, tiling
from sano_jax import train
from sano_jax.models.unet import UNet
from tests.helpers import random_values, split_slices, tiny_run_config


class GridSource:
  """Every example: a [S, S, 1] image whose pixel (y, x) holds y * S + x (a crop names its offset)."""

  def __init__(self, n, size):
    self.n, self.size = n, size
    self.image = (np.arange(size * size) % 256).reshape(size, size, 1).astype(np.uint8)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': self.image, 'mask': np.zeros_like(self.image), 'subject': f's{i}',
            'name': f'ex{i}'}


def _offsets(batch, size):
  """(top, left) of each crop in a batch of GridSource crops, from its top-left pixel."""
  images = batch['image'].reshape(-1, *batch['image'].shape[2:])
  first = np.round((images[:, 0, 0, 0].astype(np.float32) + 1) * 127.5).astype(int)
  return np.stack(np.divmod(first, size), axis=1)


def test_crop_offsets_are_uniform_over_the_stored_image():
  size, crop = 9, 5  # offsets in {0..4}^2: 25 cells
  it = ip.train_iterator(GridSource(16, size), global_batch_size=16, seed=7,
                         num_local_devices=1, crop_size=crop)
  batches = [next(it) for _ in range(100)]
  assert batches[0]['image'].shape == (1, 16, crop, crop, 1)
  offs = np.concatenate([_offsets(b, size) for b in batches])
  counts = np.bincount(offs[:, 0] * (size - crop + 1) + offs[:, 1], minlength=25)
  assert counts.shape == (25,) and counts.min() > 0  # every offset, including the last, occurs
  assert sps.chisquare(counts).pvalue > 1e-3, counts
  # Rows and columns independent: the crops are the images' windows at those offsets.
  for b in batches[:3]:
    for img, (y, x) in zip(b['image'][0], _offsets(b, size)):
      got = np.round((img.astype(np.float32) + 1) * 127.5).astype(np.uint8)
      np.testing.assert_array_equal(got, GridSource(1, size).image[y:y + crop, x:x + crop])


def test_crops_are_deterministic_across_process_counts_and_resume():
  size, crop = 12, 8
  src = GridSource(40, size)
  kw = dict(global_batch_size=8, seed=3, num_local_devices=2, crop_size=crop)
  one = [next(it) for it in [ip.train_iterator(src, **kw)] for _ in range(6)]
  p0 = ip.train_iterator(src, process_index=0, process_count=2, **kw)
  p1 = ip.train_iterator(src, process_index=1, process_count=2, **kw)
  late = ip.train_iterator(src, start_step=4, **kw)
  for k, b in enumerate(one):
    b0, b1 = next(p0), next(p1)
    np.testing.assert_array_equal(np.concatenate([_offsets(b0, size), _offsets(b1, size)]),
                                  _offsets(b, size))
    if k >= 4:
      np.testing.assert_array_equal(next(late)['image'], b['image'])
  assert len({tuple(map(tuple, _offsets(b, size))) for b in one}) == 6  # new crops each step


def test_random_crops_equal_slicing():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (5, 10, 10, 3), dtype=np.uint8)
  offsets = ip.crop_offsets(1, 2, 5, 4)
  got = ip.random_crops(images, offsets, 6)
  for g, im, (y, x) in zip(got, images, offsets):
    np.testing.assert_array_equal(g, im[y:y + 6, x:x + 6])


# --- tiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize('tile,overlap', [(16, 4), (16, 0), (20, 7), (8, 7)])
def test_tiles_of_a_pointwise_field_equal_the_single_pass(tile, overlap):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 37, 3))
  field = lambda x: [x ** 2, jnp.sin(x)]  # a pytree of fields, as SANO's t-set gives
  got = jax.jit(tiling.tiled(field, tile, overlap))(x)
  for g, want in zip(got, field(x)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_tiles_run_inside_shard_map_as_the_evaluation_runs_them():
  """evaluate.fit_stats runs the field under jax.shard_map over the local devices: the tiles' scan
  carry must be typed like the sharded input (it was not: run_eval.py with tile_size failed)."""
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  x = jax.random.normal(jax.random.PRNGKey(2), (2 * len(jax.devices()), 30, 22, 1))
  field = lambda x: [x ** 2, jnp.sin(x)]
  sharded = jax.jit(jax.shard_map(tiling.tiled(field, 16, 4), mesh=mesh, in_specs=P('batch'),
                                  out_specs=P('batch')))
  for g, want in zip(sharded(x), field(x)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def test_constant_field_has_no_seams_and_one_tile_is_the_single_pass():
  x = jnp.zeros((1, 48, 48, 1))
  const = jax.jit(tiling.tiled(lambda x: jnp.full(x.shape, 3.5), 16, 6))(x)
  np.testing.assert_allclose(const, 3.5, rtol=1e-6)
  # A field that depends on its window (mean over the tile) is NOT the single pass: the blend
  # really runs per tile, and stays inside the range of the tiles' values.
  x = jnp.arange(48.0)[None, :, None, None] * jnp.ones((1, 48, 48, 1))
  win = jax.jit(tiling.tiled(lambda x: jnp.broadcast_to(x.mean(), x.shape), 16, 6))(x)
  assert float(jnp.abs(win - x.mean()).max()) > 1.0
  assert float(win.min()) >= 7.5 - 1e-4 and float(win.max()) <= 39.5 + 1e-4
  # Along each column the blended map is monotone in the row: no dips or jumps at tile borders.
  assert bool(jnp.all(jnp.diff(win[0, :, 0, 0]) >= -1e-5))
  # An image that fits in one tile: the single pass itself.
  small = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  f = lambda x: jnp.cumsum(x, axis=1)
  np.testing.assert_array_equal(tiling.tiled(f, 16, 4)(small), f(small))
  assert tiling.tiled(f, None) is f


def test_tile_starts_cover_and_errors():
  for size, tile, ov in [(50, 16, 4), (64, 16, 0), (17, 16, 15)]:
    starts = tiling.tile_starts(size, tile, ov)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] == size - tile
    assert np.all(np.diff(starts) <= tile - ov)
  with pytest.raises(ValueError, match='tile_overlap=16'):
    tiling.tiled(lambda x: x, 16, 16)


def test_unet_attention_follows_the_training_input_size():
  kw = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_head_channels=8,
            num_groups=4)
  trained = UNet(input_size=16, **kw)
  params = random_values(jax.eval_shape(trained.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 16, 16, 1)), jnp.ones((1,))))
  # At 32 px the same blocks run (attention at level 1, 16 px there): same parameter tree.
  at32 = jax.eval_shape(trained.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                        jnp.ones((1,)))
  assert jax.tree.structure(at32) == jax.tree.structure(params)
  out = jax.jit(trained.apply)(params, jnp.ones((2, 32, 32, 1)), jnp.full((2,), 0.1))
  assert out.shape == (2, 32, 32, 1) and bool(jnp.isfinite(out).all())
  # Placement by the input's own size would move attention at 32 px: a different tree.
  by_input = jax.eval_shape(UNet(**kw).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                            jnp.ones((1,)))
  assert jax.tree.structure(by_input) != jax.tree.structure(params)


def test_crop_config_errors():
  config = tiny.get_config()
  config.data.crop_size = 24
  with pytest.raises(ValueError, match='crop_size=24 must lie in'):
    train.check_config(config, 1)
  config.data.image_size, config.data.crop_size = 32, 15
  with pytest.raises(ValueError, match='crop_size=15 is not divisible'):
    train.check_config(config, 1)
  config.data.crop_size, config.localize.tile_size, config.localize.tile_overlap = 16, 16, 16
  with pytest.raises(ValueError, match='tile_size=16'):
    train.check_config(config, 1)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def crop_run(tmp_path_factory):
  """20 steps on 16 px crops of the 32 px images, evaluated whole (6 steps did not beat the trivial
  baseline: test AUROC 0.636 against 0.651; 20 steps gave 0.786-0.867 over seeds 42, 1, 2, 3)."""
  root = tmp_path_factory.mktemp('crops')
  config = tiny_run_config(root / 'tfds', steps=20, **{'data.image_size': 32, 'data.crop_size': 16,
                                                       'eval.bootstrap_runs': 0})
  workdir = str(root / 'wd')
  train.train_and_evaluate(config, workdir)
  # The whole test split; 64 training and validation images for the baseline's mean and the stats.
  sources = split_slices(config, train=64, val=64)
  out = evaluate.evaluate(config, workdir, **sources)
  return config, workdir, out


def test_model_trained_on_crops_scores_whole_images(crop_run):
  config, workdir, out = crop_run
  assert out['data']['image_size'] == 32
  assert out['auroc'] > out['baseline']['auroc'] + 0.05  # it finds the planted anomalies
  assert checkpointing.load_config(workdir).data.crop_size == 16
  localizer = rundir.load_localizer(workdir)
  images = np.random.default_rng(0).uniform(0, 1, (3, 32, 32, 1)).astype(np.float32)
  z, mask = localizer(images)
  assert z.shape == (3, 32, 32) and mask.shape == (3, 32, 32)
  # The same model over tiles: one 32 px tile is the single pass exactly; 16 px tiles with 8 px
  # overlap give the same shapes, close but not identical (a tile cannot see beyond itself).
  _, method, params, _ = checkpointing.restore_for_inference(workdir)
  x = 2 * jnp.asarray(images) - 1
  whole = jax.jit(method.field_fn(params))(x)
  config = checkpointing.load_config(workdir)
  config.localize.tile_size, config.localize.tile_overlap = 32, 8
  np.testing.assert_array_equal(jax.jit(methods.create(config).field_fn(params))(x), whole)
  config.localize.tile_size = 16
  tiles = jax.jit(methods.create(config).field_fn(params))(x)
  assert tiles.shape == whole.shape and bool(jnp.isfinite(tiles).all())
  assert not np.array_equal(tiles, whole)
