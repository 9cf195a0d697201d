r"""MAViL fine-tuning and linear probing (MAViLFT: encoders, fusion, LayerNorm + Linear heads).

  --config configs/mavil_finetune.py:recipe=as20k,init_from=STAGE2_WORKDIR
  --config configs/mavil_finetune.py:recipe=as2m,mode=audioonly,init_from=DIR
  --config configs/mavil_finetune.py:recipe=vggsound,probe=true,init_from=DIR
  --config configs/mavil_finetune.py:size=tiny,data=synthetic,init_from=DIR   CPU minutes
  --config configs/mavil_finetune.py:data=videos,data_dir=D,init_from=DIR     your clips
      (prepared with --frames fps2; classes and splits from the prepared dataset)

init_from (or --config.init_from=PATH): a MAViL stage-1 or stage-2 training workdir (its
latest checkpoint), a model directory, or a MAViL `.pth`. Every encoder tensor is copied
(patch embeddings, cls tokens, both ViTs, the fusion blocks it has); the decoders, mask
tokens and the pretraining `norm` are dropped; the heads and any fusion block beyond the
pretrained ones (the fine-tuning model has one more, as the released one) start fresh
(models/mavil.py, MAViLFT.init_rules; the run prints the lists).

mode: multimodal (fusion, audio and video tokens pooled separately and concatenated,
`fc_norm_av`/`head_av`), audioonly or videoonly (that modality's ViT pooled, no fusion:
`fc_norm_a`/`head_a` or `fc_norm_v`/`head_v`); the model carries the heads its mode needs
(`heads` multimodal or unimodal). probe=true trains the head only (LayerNorm + Linear).

Recipe: the spec's fine-tuning defaults (weight decay 0.05, drop_path 0.1 (stochastic depth
rising linearly to the last block), layer-wise lr decay 0.75 (embeddings at 0.75^L of the
heads' lr); AdamW; cosine with warmup; lr = base_lr * batch / 256) with the schedules of Audio-MAE's fine-tuning (our choice: the
MAViL paper's are not in the spec): as20k batch 32, base lr 1e-3, 60 epochs, 4 warmup;
as2m batch 512, base lr 2e-4, 100 epochs, 20 warmup, balanced sampling; vggsound batch
256, base lr 5e-4, 60 epochs, 4 warmup, softmax cross-entropy. Mixup 0.5, label smoothing
0.1, SpecAugment 48/192 (the pipeline's fine-tuning defaults, in MAViL's input mode).
probe=true turns stochastic depth off (MAE's linear probing: the frozen encoder runs as
in evaluation).

data=synthetic: the geometry, inputs and dataset of configs/mavil_pretrain.py's synthetic
variant (so its models fit), single-label cross-entropy, `steps` steps.
"""

import os


from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.data import config as data_config
from avmae_jax.training import optim

_HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("multimodal", "audioonly", "videoonly")
HEAD = r"^(fc_norm_|head_)"
PROBE_FROZEN = r"^(?!fc_norm_|head_)"
# batch: global; lr: base per 256 clips; warmup/epochs in epochs (our choice: Audio-MAE's).
RECIPES = {
    "as20k": dict(batch=32, lr=1e-3, epochs=60, warmup=4.0, balanced=False, loss="bce",
                  data="audioset", train_split="balanced_train"),
    "as2m": dict(batch=512, lr=2e-4, epochs=100, warmup=20.0, balanced=True, loss="bce",
                 data="audioset", train_split="balanced_train+unbalanced_train"),
    "vggsound": dict(batch=256, lr=5e-4, epochs=60, warmup=4.0, balanced=False, loss="ce",
                     data="vggsound", train_split="train"),
}
# The authors' fine-tuning code defaults (mavil spec).
DROP_PATH, LAYER_DECAY = 0.1, 0.75
DATASETS = {  # TFDS builder name (2 frames/s), held-out split, classes
    "audioset": ("avmae_audioset/fps2", "eval", 527),
    "vggsound": ("avmae_vggsound/fps2", "test", 309),
    "synthetic": ("", "test", 8),
    "videos": None,  # your clips under data_dir: splits and classes from the prepared dataset
}
# Model fields taken from the pretraining config (the encoder's shape and the inputs).
_ENCODER_FIELDS = ("embed_dim", "num_heads", "encoder_depth", "img_size", "num_frames",
                   "tubelet_size", "audio_length", "num_mel_bins", "patch_size", "in_chans",
                   "mlp_ratio", "norm_eps", "trainable_pos_embed", "dtype",
                   "scan_layers", "remat_policy", "attention")
_DATA_FIELDS = ("mode", "target_length", "num_mel_bins", "frame_size", "frame_resize",
                "num_frames", "mavil_fps", "norm_mean", "norm_std", "norm_std_factor")


def get_config(arg=None):
  arg = config_args.parse_arg(arg, recipe="as20k", mode="multimodal", size="base",
                              probe=False, data="", num_classes=0, init_from="", steps=200,
                              data_dir="~/tensorflow_datasets")
  recipe = RECIPES[config_args.check_choice("recipe", arg.recipe, RECIPES)]
  config_args.check_choice("mode", arg.mode, MODES)
  data = config_args.check_choice("data", arg.data or recipe["data"], DATASETS)
  name, eval_split, classes = DATASETS[data] or ("", "", 0)
  # The pretraining config of the same size and data: its encoder and inputs.
  pretrain = config_args.load_config(
      os.path.join(_HERE, "mavil_pretrain.py")
      + f":size={arg.size},data={data},data_dir={arg.data_dir}")

  # eval_every -1: at the end of every epoch (as the reference)
  config = config_args.training_run(recipe["batch"], recipe["epochs"], eval_every=-1,
                                    init_from=arg.init_from)

  config.mode = arg.mode
  config.eval_modes = []  # more modes to evaluate (the model must have their heads)
  config.loss = recipe["loss"]  # bce: multi-label, mAP; ce: soft-target CE, accuracy
  config.wa_start, config.wa_end = 0, 0  # no weight averaging in this recipe
  # MAViL takes a clip of num_frames frames; CAV-MAE's 10-frame averaging does not apply.
  config.final_eval_all_frames = False

  config.optimizer = optim.default_optimizer_config("adamw_cosine")
  config.optimizer.b2 = 0.999  # MAE fine-tuning's AdamW (pretraining uses 0.95)
  config.optimizer.lr = recipe["lr"]
  config.optimizer.lr_scale_by_batch = True
  config.optimizer.warmup_epochs = recipe["warmup"]
  config.optimizer.min_lr = 1e-6  # MAE fine-tuning's floor
  config.optimizer.head_patterns = [HEAD]
  config.optimizer.layer_decay = LAYER_DECAY
  config.optimizer.frozen = [PROBE_FROZEN] if arg.probe else []

  config.data = data_config.default_data_config("finetune", mode="mavil")
  config.data.name, config.data.data_dir = name, arg.data_dir
  config.data.split = recipe["train_split"] if data not in ("synthetic", "videos") else "train"
  config.data.balanced_sampling = recipe["balanced"]
  config.eval_data = data_config.default_data_config("eval", mode="mavil")
  config.eval_data.name, config.eval_data.data_dir = name, arg.data_dir
  config.eval_data.split = eval_split
  config.eval_data.batch_size = 64
  if data == "videos":
    classes = data_config.use_prepared_videos(config, arg.data_dir, mode="mavil").num_classes
  for field in _DATA_FIELDS:
    config.data[field] = pretrain.data[field]
    config.eval_data[field] = pretrain.data[field]

  config.model = dict(
      kind="mavil_ft",
      **models.size_fields(arg.size, kind="mavil_ft"),
      num_classes=arg.num_classes or classes,
      heads="multimodal" if arg.mode == "multimodal" else "unimodal",
      drop_path_rate=0.0 if arg.probe else DROP_PATH,
  )
  for field in _ENCODER_FIELDS:
    config.model[field] = pretrain.model[field]

  if data == "synthetic":
    config.synthetic = pretrain.synthetic.to_dict()
    config.model.num_classes = arg.num_classes or pretrain.synthetic.num_classes
    config.loss = "ce"  # one class per synthetic clip: softmax, accuracy
    config_args.short_run(config, arg.steps, warmup_steps=min(20, arg.steps // 5),
                          lr=1e-3 if arg.probe else 5e-4)
    config.log_every = 25
    config.checkpoint_every = 1000
    config.keep_checkpoints = 1
    config.data.shuffle_buffer = pretrain.synthetic.num_train
    config.data.balanced_sampling = False
    config.data.mixup = 0.0  # slows a run this short down a lot
    # SpecAugment's time mask scaled to the shorter spectrogram (192 of 1024 frames).
    config.data.timem = config.data.target_length * 192 // 1024
    config.optimizer.min_lr = 0.0
  return config
