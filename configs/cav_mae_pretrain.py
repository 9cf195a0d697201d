r"""CAV-MAE pretraining recipes (cav-mae spec sections 4 and 6).

  --config configs/cav_mae_pretrain.py                       AS-2M, base model, the paper's recipe
  --config configs/cav_mae_pretrain.py:recipe=scale++        batch 256, lr 2e-4 (released model)
  --config configs/cav_mae_pretrain.py:data=vggsound,recipe=vggsound   VGGSound, from AS scale++
  --config configs/cav_mae_pretrain.py:size=tiny,data=synthetic        a tiny smoke-test run
  --config configs/cav_mae_pretrain.py:data=videos,data_dir=D          your clips, prepared
      with `python -m avmae_jax.prepare videos --folder CLIPS/ --data_dir D`

Loss weights select the paper's variants: the default is CAV-MAE (mae 1.0, contrast 0.01);
`--config.model.contrast_loss_weight=0` gives AV-MAE, `--config.model.mae_loss_weight=0` CAV.
The reference trained on 4 GPUs with per-GPU negatives; `--config.model.contrastive_groups=4`
reproduces that exactly (the default contrasts over the whole global batch).
"""

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.data import config as data_config
from avmae_jax.training import optim

# recipe: (global batch, lr, epochs); the lr halves after epochs 10, 15, 20 (start 10, every 5).
RECIPES = {
    "base": (48, 5e-5, 25),
    "scale+": (120, 1e-4, 25),
    "scale++": (256, 2e-4, 25),
    "vggsound": (120, 5e-5, 10),
}
DATASETS = {  # TFDS builder names (prepared with `python -m avmae_jax.prepare`)
    "audioset": ("avmae_audioset", "balanced_train+unbalanced_train", "eval"),  # AS-2M
    "vggsound": ("avmae_vggsound", "train", "test"),
    "synthetic": ("", "train", "test"),
    "videos": None,  # your clips under data_dir (data/prepared.py picks the splits)
}


def get_config(arg=None):
  arg = config_args.parse_arg(arg, size="base", recipe="base", data="audioset",
                              data_dir="~/tensorflow_datasets")
  config_args.check_choice("recipe", arg.recipe, RECIPES)
  config_args.check_choice("data", arg.data, DATASETS)
  batch, lr, epochs = RECIPES[arg.recipe]
  # init_from: e.g. the `export --imagenet_mae` output
  config = config_args.training_run(batch, epochs, eval_every=10000)

  config.optimizer = optim.default_optimizer_config()
  config.optimizer.lr = lr

  data_config.pretraining_sections(config, arg.data, arg.data_dir, DATASETS)
  if arg.data == "synthetic":
    config.synthetic = dict(num_train=512, num_test=128, seed=0, num_classes=8,
                            data_dir=arg.data_dir, num_workers=2)

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
      contrastive_groups=1,
      **config_args.compute_fields(),
  )
  return config
