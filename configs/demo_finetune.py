r"""Demo fine-tuning: the demo's tiny model classifies the built-in synthetic dataset's classes.

  python -m avmae_jax.train --config configs/demo.py --workdir /tmp/avmae_demo
  python -m avmae_jax.train --config configs/demo_finetune.py:init_from=/tmp/avmae_demo \
      --workdir /tmp/avmae_demo_ft
  python -m avmae_jax.train --config configs/demo_finetune.py --workdir /tmp/avmae_demo_scratch

init_from: the demo's pretraining workdir (or another checkpoint of the same model); ''
trains the same model from scratch with the same steps, data order and augmentation: the
comparison that shows what pretraining gives. mode: multimodal, audioonly or videoonly;
probe=true trains the head only. The run (one to three minutes on a 2-core CPU) ends by
printing held-out accuracy and mAP on the synthetic test clips (the weight-averaged model,
outputs averaged over each clip's 10 frames).

The model geometry (size, input lengths), the synthetic dataset and its normalisation come
from configs/demo.py, so that the pretrained demo model always fits. The recipe is the
VGGSound one (single-label: cross-entropy on soft targets, accuracy; label smoothing,
SpecAugment, noise, weight averaging), scaled down to a few CPU minutes: batch 32, 128
steps (8 epochs of the 512 training clips), a larger lr for a small model trained briefly,
halved every epoch over the second half of the run, whose epochs' weights are averaged,
and no mixup (a regulariser for long runs; this one is 8 epochs).
"""

import os

from avmae_jax import config_args
from avmae_jax.data import prepared

_HERE = os.path.dirname(os.path.abspath(__file__))
# Fields copied from the pretraining demo: the encoder's shape, the inputs, the data.
_MODEL_FIELDS = ("embed_dim", "num_heads", "modality_specific_depth", "shared_depth",
                 "img_size", "audio_length", "num_mel_bins", "patch_size", "in_chans",
                 "mlp_ratio", "norm_eps")
_DATA_FIELDS = ("mode", "target_length", "num_mel_bins", "frame_size", "frame_resize",
                "norm_mean", "norm_std", "norm_std_factor")


def get_config(arg=None):
  arg = config_args.parse_arg(arg, init_from="", mode="multimodal", steps=128, probe=False,
                              data="synthetic", data_dir="~/tensorflow_datasets")
  demo = config_args.load_config(os.path.join(_HERE, "demo.py")
                                 + f":data={arg.data},data_dir={arg.data_dir}")
  config = config_args.load_config(
      os.path.join(_HERE, "cav_mae_finetune.py")
      + f":recipe=vggsound,size=tiny,data={arg.data},mode={arg.mode},probe={arg.probe},"
      f"data_dir={arg.data_dir}")
  for field in _MODEL_FIELDS:
    config.model[field] = demo.model[field]
  for field in _DATA_FIELDS:
    if field in demo.data:
      config.data[field] = demo.data[field]
      config.eval_data[field] = demo.data[field]
  if arg.data == "synthetic":
    config.synthetic = demo.synthetic.to_dict()
    config.model.num_classes = demo.synthetic.num_classes
    num_train = demo.synthetic.num_train
  else:  # the class count is the prepared dataset's (cav_mae_finetune.py)
    num_train = prepared.read(config.data.builder_dir).count(config.data.split)

  config.init_from = arg.init_from
  config.batch_size = 32
  config.total_steps = arg.steps
  config.log_every = 16
  config.checkpoint_every = 1000
  config.keep_checkpoints = 1
  config.eval_every = arg.steps  # one single-frame evaluation at the end, then the final one
  config.eval_data.batch_size = 64
  config.data.shuffle_buffer = num_train
  config.data.balanced_sampling = False  # short runs: every clip as often as any other
  config.data.mixup = 0.0
  config.optimizer.lr = 1e-3 if arg.probe else 5e-4
  epochs = arg.steps // max(num_train // config.batch_size, 1)
  config.optimizer.lr_step_start = max(epochs // 2, 1)
  config.optimizer.lr_step_every = 1
  if epochs >= 2:
    config.wa_start, config.wa_end = epochs // 2 + 1, epochs
  else:
    config.wa_start = config.wa_end = 0
  return config
