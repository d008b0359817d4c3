"""SANO on your own images, at a CPU size.

  python run_train.py --config=configs/folder.py --workdir=DIR \
      --config.data.normal_dir=HEALTHY_DIR --config.data.test_dir=TEST_DIR \
      --config.data.mask_dir=MASK_DIR [--config.data.subjects_csv=CSV] \
      [--config.data.image_size=64] [--config.data.num_channels=3]

Healthy images are split into train/validation by subject (the file stem, or the subject column of
``subjects_csv`` with columns name,subject); test images need a mask with the same stem in
``mask_dir`` (any image format, nonzero = anomalous). Images of any size are resized to
``image_size`` (see ``sano_jax/datasets/folder.py``). The dataset is built on first use into
``config.data.data_dir`` (default: the TFDS data dir), keyed by a fingerprint of the folders.
The argument picks the image size, e.g. ``--config=configs/folder.py:128``.
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'folder'
  config.data.image_size = int(arg) if arg else 64
  config.data.num_channels = 3
  config.data.validation_fraction = 0.2  # of the healthy images, by subject

  # nf 16, not 32: on KolektorSDD (64 px, 1500 steps x 16, two seeds each, docs/results.md) nf 16
  # localized the cracks better (pixel AUROC 0.850 / 0.872 against 0.812 / 0.836; AUPRO 0.400 /
  # 0.456 against 0.309 / 0.353) and trains ~2.5x faster. Widen it for larger images if needed.
  config.model.nf = 16
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.num_head_channels = 32
  config.model.dropout = 0.0
  config.model.resblock_updown = False
  config.model.num_groups = 8

  config.optim.warmup_steps = 100
  config.training.batch_size = 16
  config.training.num_train_steps = 5000
  config.training.ema_rate = 0.999
  config.training.log_every = 50
  config.training.eval_every = 500
  config.training.checkpoint_every = 500
  config.eval.batch_size = 16
  # Per-group metrics: name extra columns of subjects_csv, e.g. --config.eval.group_by=site,scanner
  config.eval.group_by = ()
  # New data: nobody knows its best t, rule or N. run_eval.py chooses them on synthetic anomalies
  # made from the healthy validation images (sano_jax/calibration.py; no test label is read).
  config.localize.calibrate = True
  return config
