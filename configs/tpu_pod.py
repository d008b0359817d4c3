"""The paper's set-up on a Cloud TPU pod slice (e.g. v4-32: 4 hosts x 4 chips).

Run the same command on every host with `--distributed`; each host reads its own shard of every
global batch. A larger global batch with the learning rate scaled along.
"""
from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.model.dtype = 'bfloat16'
  config.training.batch_size = 256
  config.optim.lr = 4e-4
  config.training.num_train_steps = 400 * (6146 // 256)
  config.training.steps_per_call = 4
  config.training.log_every = 20
  config.training.eval_every = 480
  config.training.checkpoint_every = 480
  config.data.worker_count = 16
  return config
