"""SANO on the embedded texture data at a CPU size (``make demo``).

Variants: ``--config=configs/demo.py:grass`` (a known hard case), ``:gravel``, ``:retina`` (RGB).
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'brick'
  config = default.get_config()
  config.data.dataset = f'sano_textures/{variant}'
  config.data.image_size = 32
  config.data.num_channels = 3 if variant == 'retina' else 1

  config.model.nf = 32
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.num_head_channels = 32
  config.model.dropout = 0.0
  config.model.resblock_updown = False
  config.model.num_groups = 8

  config.optim.warmup_steps = 100
  config.training.batch_size = 32
  config.training.num_train_steps = 2000
  config.training.ema_rate = 0.999
  config.training.log_every = 50
  config.training.eval_every = 500
  config.training.checkpoint_every = 500
  config.eval.batch_size = 64
  return config
