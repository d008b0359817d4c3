"""The paper's set-up on one host with 8 GPUs: bfloat16 compute, 2 steps per device call."""
from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.model.dtype = 'bfloat16'
  config.training.steps_per_call = 2
  config.data.worker_count = 8
  return config
