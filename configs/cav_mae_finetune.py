r"""CAV-MAE fine-tuning model (cav-mae spec section 5).

  --config configs/cav_mae_finetune.py:size=base,num_classes=527,mode=multimodal
"""

import ml_collections

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.models import cav_mae


def get_config(arg=None):
  arg = config_args.parse_arg(arg, size="base", num_classes=527, mode="multimodal")
  if arg.mode not in cav_mae.FT_MODES:
    raise ValueError(f"mode must be one of {cav_mae.FT_MODES}, got {arg.mode!r}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 36  # AS-20K recipe
  config.mode = arg.mode

  config.model = dict(
      kind="cav_mae_ft",
      **models.size_fields(arg.size, kind="cav_mae_ft"),
      num_classes=arg.num_classes,
      img_size=224, audio_length=1024, num_mel_bins=128, patch_size=16, in_chans=3,
      mlp_ratio=4.0, norm_eps=1e-5,
      trainable_pos_embed=True,
      remat=False,
      dtype="float32",
  )
  return config
