r"""The demo: tiny CAV-MAE pretraining on the built-in synthetic dataset, a few minutes on CPU.

  python -m avmae_jax.train --config configs/demo.py --workdir /tmp/avmae_demo
  python -m avmae_jax.train --config configs/demo.py:data=videos,data_dir=D --workdir W

Prepares the synthetic dataset on first use (512 training and 128 held-out clips of 8
classes whose sounds match what is seen), pretrains the tiny model and ends by printing
audio<->video retrieval R@1 on the held-out clips next to chance. data=videos runs the same
quick recipe on your clips, prepared under D by `python -m avmae_jax.prepare videos`.
"""

import os

from avmae_jax import config_args
from avmae_jax.training import optim

_PRETRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cav_mae_pretrain.py")


def get_config(arg=None):
  arg = config_args.parse_arg(arg, data="synthetic", data_dir="~/tensorflow_datasets",
                              steps=600)
  config_args.check_choice("data", arg.data, ("synthetic", "videos"))
  config = config_args.load_config(
      f"{_PRETRAIN}:size=tiny,data={arg.data},data_dir={arg.data_dir}")
  config.log_every = 50
  config.checkpoint_every = 200
  config.eval_data.batch_size = 64
  # Quarter-size inputs (the first 2.56 s of log-mel, frames at 112 px) make a step about
  # four times cheaper, so the demo takes enough steps within its few CPU minutes.
  config.model.audio_length = 256
  config.model.img_size = 112
  for section in (config.data, config.eval_data):
    section.target_length = 256
    section.frame_resize = 112
  # From scratch, a tiny model's one-directional InfoNCE at temperature 0.05 collapses to
  # log(batch) (all audio vectors alike) within a few dozen steps and never recovers.
  # Symmetric InfoNCE at 0.1, a full-weight contrastive term and a warmed-up, cosine-decayed
  # AdamW learn the audio-visual correspondence instead (the paper's recipe starts from
  # ImageNet-pretrained weights, which this demo does not have).
  config.model.contrast_loss_weight = 1.0
  config.model.bidirect_contrast = True
  config.model.contrast_temperature = 0.1
  config.optimizer = optim.default_optimizer_config("adamw_cosine")
  config_args.short_run(config, arg.steps, warmup_steps=min(40, arg.steps // 4), lr=5e-4)
  config.data.shuffle_buffer = 512 if arg.data == "synthetic" else 2048
  return config
