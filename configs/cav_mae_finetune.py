r"""CAV-MAE fine-tuning and linear-probing recipes (cav-mae spec sections 3, 5 and 6).

  --config configs/cav_mae_finetune.py:recipe=as20k,init_from=cav-mae-scale++.pth
  --config configs/cav_mae_finetune.py:recipe=as2m,mode=audioonly,init_from=DIR
  --config configs/cav_mae_finetune.py:recipe=vggsound,probe=true,init_from=DIR
  --config configs/cav_mae_finetune.py:size=tiny,data=synthetic      a tiny smoke-test run
  --config configs/cav_mae_finetune.py:data=videos,data_dir=D,init_from=DIR   your prepared
      clips (classes and splits from the prepared dataset; see data/prepared.py)

init_from (or --config.init_from=PATH) names a reference `.pth` (CAV-MAE pretraining or
fine-tuned), a model checkpoint directory (`export` output, DIR/averaged of a fine-tuning
run) or a pretraining workdir (its latest checkpoint). The encoder is taken from it, a
pretraining decoder is dropped, the classifier head starts fresh (CAVMAEFT.init_rules in
avmae_jax/models/cav_mae.py).

Recipes follow the reference's egs/ scripts: Adam (betas 0.95, 0.999, coupled weight decay
5e-7), the head (mlp_head_*) at `head` times the base lr, lr halved every epoch from
`lr_start` (0-based epoch count, MultiStepLR stepped per epoch), mixup 0.5, label smoothing
0.1, SpecAugment freqm 48 / timem 192, noise on, weight averaging of the models at the ends
of epochs wa_start..wa_end (1-based), the final evaluation averaging outputs over 10 frames.
mode: the training (and main evaluation) path: multimodal, audioonly or videoonly.
probe=true: linear probing, the reference's freeze_base: only the head (LayerNorm + Linear)
trains; the encoder stays bit-identical.
"""

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.data import config as data_config
from avmae_jax.training import optim

MODES = ("multimodal", "audioonly", "videoonly")
# Every parameter but the classifier head (mlp_head_0 LayerNorm, mlp_head_1 Linear).
PROBE_FROZEN = r"^(?!mlp_head_)"
HEAD = r"^mlp_head_"

# batch: global; lr: base; head: head lr multiplier; lr_start/lr_every: halve the lr at
# every epoch in range(lr_start, 1000, lr_every); wa: averaged epochs (1-based, inclusive).
RECIPES = {
    "as20k": dict(batch=36, lr=5e-5, head=100.0, epochs=15, lr_start=5, lr_every=1,
                  wa=(3, 15), balanced=False, loss="bce", data="audioset",
                  train_split="balanced_train"),
    "as2m": dict(batch=48, lr=1e-5, head=50.0, epochs=10, lr_start=2, lr_every=1,
                 wa=(1, 10), balanced=True, loss="bce", data="audioset",
                 train_split="balanced_train+unbalanced_train"),
    "vggsound": dict(batch=48, lr=1e-4, head=10.0, epochs=10, lr_start=2, lr_every=1,
                     wa=(3, 10), balanced=True, loss="ce", data="vggsound",
                     train_split="train"),
}
DATASETS = {  # TFDS builder name, held-out split, classes (prepare with avmae_jax.prepare)
    "audioset": ("avmae_audioset", "eval", 527),
    "vggsound": ("avmae_vggsound", "test", 309),
    "synthetic": ("", "test", 8),
    "videos": None,  # your clips under data_dir: splits and classes from the prepared dataset
}


def get_config(arg=None):
  arg = config_args.parse_arg(arg, recipe="as20k", mode="multimodal", size="base",
                              probe=False, data="", num_classes=0, init_from="",
                              data_dir="~/tensorflow_datasets")
  recipe = RECIPES[config_args.check_choice("recipe", arg.recipe, RECIPES)]
  config_args.check_choice("mode", arg.mode, MODES)
  data = config_args.check_choice("data", arg.data or recipe["data"], DATASETS)
  name, eval_split, classes = DATASETS[data] or ("", "", 0)

  # eval_every -1: at the end of every epoch (as the reference)
  config = config_args.training_run(recipe["batch"], recipe["epochs"], eval_every=-1,
                                    init_from=arg.init_from)

  config.mode = arg.mode
  config.eval_modes = []  # more modes to evaluate, e.g. ["missingvideoonly"]
  config.loss = recipe["loss"]  # bce: multi-label, mAP; ce: soft-target CE, accuracy
  config.wa_start, config.wa_end = recipe["wa"]  # 0, 0: no weight averaging
  config.final_eval_all_frames = True

  config.optimizer = optim.default_optimizer_config("adam_step")
  config.optimizer.lr = recipe["lr"]
  config.optimizer.lr_step_start = recipe["lr_start"]
  config.optimizer.lr_step_every = recipe["lr_every"]
  config.optimizer.lr_decay = 0.5
  config.optimizer.head_patterns = [HEAD]
  config.optimizer.head_lr_mult = recipe["head"]
  config.optimizer.frozen = [PROBE_FROZEN] if arg.probe else []

  config.data = data_config.default_data_config("finetune")  # mixup, smoothing, SpecAugment
  config.data.name, config.data.data_dir = name, arg.data_dir
  config.data.split = recipe["train_split"] if data not in ("synthetic", "videos") else "train"
  config.data.balanced_sampling = recipe["balanced"]
  config.eval_data = data_config.default_data_config("eval")
  config.eval_data.name, config.eval_data.data_dir = name, arg.data_dir
  config.eval_data.split = eval_split
  config.eval_data.batch_size = 64
  if data == "videos":
    classes = data_config.use_prepared_videos(config, arg.data_dir).num_classes
  if data == "synthetic":
    config.synthetic = dict(num_train=512, num_test=128, seed=0, num_classes=classes,
                            data_dir=arg.data_dir, num_workers=2)

  config.model = dict(
      kind="cav_mae_ft",
      **models.size_fields(arg.size, kind="cav_mae_ft"),
      num_classes=arg.num_classes or classes,
      img_size=224, audio_length=1024, num_mel_bins=128, patch_size=16, in_chans=3,
      mlp_ratio=4.0, norm_eps=1e-5,
      trainable_pos_embed=True,
      **config_args.compute_fields(),
  )
  return config
