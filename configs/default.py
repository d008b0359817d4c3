"""The paper's set-up: 11k Hands at 256 px, an ADM-style U-Net, batch 64, Adam 2e-4 (SANO §3.2).

Override any field from the command line, e.g. ``--config.training.batch_size=8``.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 42
  # 'sano' (the paper) or a baseline of Table 1: 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm'.
  # Each method reads its own block below; the blocks of the other methods are ignored.
  config.method = 'sano'

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'hands11k/256'  # any TFDS name of the data contract (docs/design.md)
  data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (None: default)
  data.manual_dir = ml_collections.config_dict.placeholder(str)  # 11k Hands manual download
  data.image_size = 256  # the stored images: statistics and localization see them whole
  # Training draws a random crop_size x crop_size window of each stored image (uniform offsets,
  # deterministic in (seed, step)); None trains on the whole image. The U-Net and autoencoders
  # are fully convolutional, so a model trained on crops scores whole images.
  data.crop_size = ml_collections.config_dict.placeholder(int)
  # Random up-down and left-right flips of each training image (deterministic in (seed, step)):
  # off for the paper's hands, whose orientation is part of what is healthy.
  data.random_flips = False
  data.num_channels = 3
  # Each network input standardized to its own mean and std ('per_image'; photos whose exposure
  # varies) or used as it is ('none', the paper; on KolektorSDD 'per_image' scored lower):
  # sano_jax/intensity.py.
  data.normalize = 'none'
  data.train_split = 'train'
  data.validation_split = 'validation'
  data.test_split = 'test'
  data.worker_count = 0  # grain worker processes (0: in-process)
  # Folder datasets (configs/folder.py).
  data.normal_dir = ml_collections.config_dict.placeholder(str)
  data.test_dir = ml_collections.config_dict.placeholder(str)
  data.mask_dir = ml_collections.config_dict.placeholder(str)
  data.subjects_csv = ml_collections.config_dict.placeholder(str)
  # An MVTec AD category folder (train/good, test/<type>/, ground_truth/<type>/): supplies the three
  # folders above where they are not set (configs/mvtec.py).
  data.root = ml_collections.config_dict.placeholder(str)
  # Masks must hold 0 and one other value; with a threshold, values above it are anomalous (for
  # masks saved with anti-aliased edges or as JPEG), e.g. --config.data.mask_threshold=127.
  data.mask_threshold = ml_collections.config_dict.placeholder(float)

  config.model = model = ml_collections.ConfigDict()
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 4, 4)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.num_head_channels = 64
  model.dropout = 0.1
  model.resblock_updown = True
  model.scale_shift_norm = True
  model.num_groups = 32
  model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay float32)

  # The reconstruction baselines' network (sano_jax/models/autoencoder.py): latent at H / 2^levels.
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.nf = 32
  ae.ch_mult = (1, 2, 4, 4)
  ae.latent_channels = 16
  ae.num_groups = 8
  config.vae = ml_collections.ConfigDict({'kl_weight': 1.0})
  config.cevae = ml_collections.ConfigDict({'kl_weight': 1.0, 'ce_weight': 1.0,
                                            'max_box_fraction': 0.5})
  config.vqvae = ml_collections.ConfigDict({'num_codes': 128, 'commitment': 0.25})
  config.anovaegan = ml_collections.ConfigDict({'kl_weight': 1.0, 'adv_weight': 0.01,
                                                'disc_lr': 1e-4, 'disc_nf': 32, 'disc_layers': 3})
  # AnoDDPM (Wyatt et al. 2022): SANO's model, localizing by reconstruction from t_start.
  config.anoddpm = ml_collections.ConfigDict({'t_start': 0.25, 'num_steps': 25,
                                              'clip_denoised': True, 'seed': 0})

  config.sde = sde = ml_collections.ConfigDict()
  sde.beta_min = 0.1
  sde.beta_max = 20.0
  sde.num_scales = 1000
  sde.eps = 1e-5
  sde.likelihood_weighting = False

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8
  optim.warmup_steps = 5000
  optim.grad_clip = 1.0
  optim.weight_decay = 0.0

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64  # global batch, over all devices and hosts
  # "400 iterations" in the paper; read as 400 epochs of 6146 images at batch 64.
  training.num_train_steps = 400 * (6146 // 64)
  training.steps_per_call = 1  # >1: lax.scan over several steps per device call
  training.ema_rate = 0.9999
  # The t of each training example (sano_jax/losses.py): 'uniform' on [sde.eps, 1] (the paper) or
  # 'log_uniform' on [t_sampling_min, 1] (None: sde.eps), which trains where localization reads.
  training.t_sampling = 'uniform'
  training.t_sampling_min = ml_collections.config_dict.placeholder(float)
  training.log_every = 100
  training.eval_every = 2000
  training.checkpoint_every = 2000
  training.keep_checkpoints = 3
  training.eval_batches = -1  # validation batches per evaluation (-1: the whole split)

  config.localize = localize = ml_collections.ConfigDict()
  localize.t = (0.01,)  # one t, or a t-set: --config.localize.t=0.02,0.1,0.4 (sano_jax/multiscale.py)
  localize.n_sigma = 3.0
  localize.smoothing_sigma = 2.0
  # 'global' (the paper), 'per_pixel' (Genc et al.), 'quantile', 'density', 'density_mean'
  localize.stats = 'global'
  localize.two_sided = False
  # The density rules on log maps centred per image (sano_jax/multiscale.py); the calibration
  # chooses it.
  localize.density_centred = False
  localize.target_fpr = 1e-3  # for stats='quantile'
  localize.use_ema = True
  # Whole-image inference: None = one fully convolutional pass; an int = blended overlapping tiles
  # of that size (bounded memory on large images; sano_jax/tiling.py).
  localize.tile_size = ml_collections.config_dict.placeholder(int)
  localize.tile_overlap = 16
  # run_eval.py chooses t, the rule and N from synthetic anomalies on healthy validation images
  # (sano_jax/calibration.py; never reads test labels). False: the settings above, as given.
  localize.calibrate = False
  # The synthetic anomaly kinds it scores candidates on (sano_jax/calibration.py ALL_KINDS:
  # cutpaste, rescaled, noise, shift, blur, crack), e.g. --config.localize.synthetic_kinds=crack,noise
  localize.synthetic_kinds = ('cutpaste', 'rescaled', 'noise', 'shift')
  # At least this many synthetic anomalies over the calibration's two folds: a validation split
  # of n smaller images gets ceil(this / n) per image (sano_jax/calibration.py MIN_SYNTHETIC).
  localize.min_synthetic_images = 256

  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 32
  ev.bootstrap_runs = 50
  ev.num_bins = 2**16
  ev.num_figures = 8
  ev.exact_max_pixels = 20_000_000  # exact sort-based metrics up to here, binned above
  # Per-group metrics (metrics.json `groups`, figures/groups_*.png; sano_jax/groups.py): per-image
  # attributes of the test split (hands11k: skin_color, aspect_of_hand, gender, ...; folder data:
  # extra columns of subjects_csv). () or --config.eval.group_by='' for none.
  ev.group_by = ('skin_color', 'aspect_of_hand')
  return config
