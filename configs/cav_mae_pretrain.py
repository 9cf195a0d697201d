r"""CAV-MAE pretraining (cav-mae spec sections 4 and 6).

  --config configs/cav_mae_pretrain.py:size=base     the paper's model
  --config configs/cav_mae_pretrain.py:size=tiny     tests and the demo

Loss weights select the paper's variants: the default is CAV-MAE (mae 1.0, contrast 0.01);
`--config.model.contrast_loss_weight=0` gives AV-MAE, `--config.model.mae_loss_weight=0` CAV.
"""

import ml_collections

from avmae_jax import config_args
from avmae_jax import models


def get_config(arg=None):
  arg = config_args.parse_arg(arg, size="base")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 48  # global; the AS-2M base recipe

  config.model = dict(
      kind="cav_mae",
      **models.size_fields(arg.size),
      img_size=224, audio_length=1024, num_mel_bins=128, patch_size=16, in_chans=3,
      mlp_ratio=4.0, norm_eps=1e-5,
      norm_pix_loss=True,
      trainable_pos_embed=False,
      mask_ratio_a=0.75, mask_ratio_v=0.75,
      mask_mode="unstructured",  # or time | freq | tf (audio; video is always unstructured)
      mae_loss_weight=1.0,
      contrast_loss_weight=0.01,
      bidirect_contrast=False,
      contrast_temperature=0.05,
      chain_shared_blocks_in_contrast=False,
      remat=False,
      dtype="float32",  # compute dtype; parameters stay float32
  )
  return config
