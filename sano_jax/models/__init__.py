"""Score models. `create_model(config)` builds the U-Net of `config.model`."""
from sano_jax.models.unet import UNet


def crop_size(config) -> int:
  """The model's training input size: `config.data.crop_size`, else the stored `image_size`."""
  crop = config.data.get('crop_size')
  return int(config.data.image_size if crop is None else crop)


def create_model(config) -> UNet:
  """The U-Net described by `config.model` (keys of configs/default.py)."""
  m = config.model
  return UNet(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), num_head_channels=m.num_head_channels,
              dropout=m.dropout, resblock_updown=m.resblock_updown,
              scale_shift_norm=m.scale_shift_norm, num_groups=m.num_groups,
              out_channels=config.data.num_channels, dtype=m.dtype,
              input_size=crop_size(config))
