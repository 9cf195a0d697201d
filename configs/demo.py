r"""The demo: tiny CAV-MAE pretraining on the built-in synthetic dataset, a few minutes on CPU.

  python -m avmae_jax.train --config configs/demo.py --workdir /tmp/avmae_demo

Prepares the synthetic dataset on first use (512 training and 128 held-out clips of 8
classes whose sounds match what is seen), pretrains the tiny model and ends by printing
audio<->video retrieval R@1 on the held-out clips next to chance.
"""

import os

from avmae_jax import config_args

_PRETRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cav_mae_pretrain.py")


def get_config(arg=None):
  arg = config_args.parse_arg(arg, data_dir="~/tensorflow_datasets", steps=120)
  config = config_args.load_config(
      f"{_PRETRAIN}:size=tiny,data=synthetic,data_dir={arg.data_dir}")
  config.batch_size = 32
  config.total_steps = arg.steps
  config.log_every = 10
  config.checkpoint_every = 60
  config.eval_every = arg.steps
  config.eval_data.batch_size = 64
  # A small model learns the audio-visual correspondence faster with a larger step size
  # and a stronger contrastive term than the paper's base recipe.
  config.optimizer.lr = 1e-3
  config.model.contrast_loss_weight = 0.1
  config.data.shuffle_buffer = 512
  return config
