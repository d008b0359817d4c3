"""A tiny model for tests and smoke runs: 16 px, a few channels."""
import ml_collections

from configs import demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = demo.get_config(arg)
  config.data.image_size = 16
  config.model.nf = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_head_channels = 8
  config.model.num_groups = 4
  config.training.batch_size = 8
  config.training.num_train_steps = 20
  config.training.log_every = 5
  config.training.eval_every = 10
  config.training.checkpoint_every = 10
  config.training.eval_batches = 2
  config.eval.batch_size = 8
  config.eval.bootstrap_runs = 5
  config.eval.group_by = ()  # in-memory test sources have no group attributes; tests ask for them
  config.localize.stats = 'global'  # the paper's rule (the demo uses per-pixel statistics)
  config.localize.calibrate = False  # tests ask for it (tests/test_calibration.py)
  config.localize.min_synthetic_images = 0  # one synthetic anomaly per image (a test asks more)
  # The baselines at the same tiny size (config.method=...).
  config.autoencoder.nf = 8
  config.autoencoder.ch_mult = (1, 2)
  config.autoencoder.latent_channels = 4
  config.autoencoder.num_groups = 4
  config.vqvae.num_codes = 16
  config.anovaegan.disc_nf = 8
  config.anovaegan.disc_layers = 2
  config.anoddpm.num_steps = 3
  return config
