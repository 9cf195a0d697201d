r"""MAViL pretraining, stage 1 (reconstruction + contrast) and stage 2 (self-training).

  --config configs/mavil_pretrain.py:size=base                        AS-2M, stage 1
  --config configs/mavil_pretrain.py:size=base,stage=2 --config.teacher=STAGE1_WORKDIR
  --config configs/mavil_pretrain.py:size=base,data=vggsound          VGGSound, stage 1
  --config configs/mavil_pretrain.py:size=tiny,data=synthetic         minutes on a CPU
  --config configs/mavil_pretrain.py:data=videos,data_dir=D           your clips, prepared
      with `python -m avmae_jax.prepare videos --folder CLIPS/ --data_dir D --frames fps2`

Stage 2 needs `config.teacher` (or the `teacher=PATH` argument): a stage-1 or stage-2
training workdir (its latest checkpoint) or a model directory. The teacher is built from
its own model.json, loaded once, frozen, and run on unmasked clips inside each train step
to make the targets (avmae_jax.models.mavil.compute_teacher_targets); the student is a
fresh model of this config. Rounds of self-training: round k+1 is another stage-2 run
whose teacher is round k's workdir, e.g.
  python -m avmae_jax.train --config configs/mavil_pretrain.py:size=base --workdir R0
  python -m avmae_jax.train --config configs/mavil_pretrain.py:size=base,stage=2 \
      --config.teacher=R0 --workdir R1
  python -m avmae_jax.train --config configs/mavil_pretrain.py:size=base,stage=2 \
      --config.teacher=R1 --workdir R2
(the spec's default is one round, R1).

Recipe (mavil spec, "Our defaults"): AdamW, betas (0.9, 0.95), weight decay 0.05 (not on
biases and norms, as MAE), linear warmup then cosine decay to 0, lr = base_lr * batch / 256,
masking 0.8 (audio) / 0.9 (video), loss weights 0.01 (inter- and intra-modal InfoNCE,
temperature 0.1), norm_pix_loss. The paper's batch, base lr and epochs are not in the spec;
ours follow Audio-MAE's AS-2M pretraining (batch 512, base lr 2e-4, 32 epochs, 3 warmup
epochs) and are fields like every other choice. Inputs: 10 s of log-mel (1024 x 128)
normalised as (x - mean) / (2 std), 8 frames at 2 frames/s (the `fps2` datasets, 20
stored frames per clip; `python -m avmae_jax.prepare ... --frames fps2`).

data=synthetic: the built-in synthetic dataset (prepared on first use, 20 frames per clip)
with reduced inputs (2.56 s of log-mel, 4 frames of 112 px: a step is ~10x cheaper) and a
short run of `steps` steps (default 400 for stage 1, 800 for stage 2), so that size=tiny
trains in a few CPU minutes. Stage 2 runs twice as long because its student starts from
scratch and learns from the teacher's features: at 400 steps its fine-tuned accuracy was
equal to stage 1's (pretraining seed 0) or 3 points lower (seed 1); at 800 it is 1.6 points
higher on average over three pretraining seeds, with a higher mAP for each (README, "MAViL").
Its contrastive weights are 1.0, not 0.01: at 0.01 the inter-modal InfoNCE stays at chance (accuracy 0.04
for 1/32) through a 400-step run from scratch, so neither retrieval nor the stage-2 teacher
gets a cross-modal signal; at 1.0 it reaches 0.22 (measured, tiny, 400 steps).
"""

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.data import config as data_config
from avmae_jax.training import optim

DATASETS = {  # TFDS builder name (2 frames/s variants), train split, held-out split
    "audioset": ("avmae_audioset/fps2", "train", "eval"),
    "vggsound": ("avmae_vggsound/fps2", "train", "test"),
    "synthetic": ("", "train", "test"),
    "videos": None,  # your clips under data_dir (data/prepared.py picks the splits)
}
STAGES = (1, 2)
# Our choice where the spec is silent: Audio-MAE's AS-2M pretraining schedule.
BATCH, BASE_LR, EPOCHS, WARMUP_EPOCHS = 512, 2e-4, 32, 3.0
# data=synthetic: reduced inputs (first 2.56 s of log-mel; 4 frames = 2 s at 2 fps, 112 px).
SMALL_AUDIO, SMALL_FRAMES, SMALL_IMAGE = 256, 4, 112
SMALL_CONTRAST_WEIGHT = 1.0
SMALL_STEPS = {1: 400, 2: 800}  # the default `steps` per stage


def get_config(arg=None):
  arg = config_args.parse_arg(arg, size="base", data="audioset", stage=1, teacher="",
                              steps=0, data_dir="~/tensorflow_datasets")
  config_args.check_choice("data", arg.data, DATASETS)
  config_args.check_choice("stage", arg.stage, STAGES)
  if arg.teacher and arg.stage != 2:
    raise ValueError("teacher is the stage-2 teacher; add stage=2")
  # init_from: a model checkpoint dir or MAViL .pth (stage 2: keep it empty)
  config = config_args.training_run(BATCH, EPOCHS, eval_every=10000)
  # Stage 2: the teacher's training workdir or model directory (required there).
  config.teacher = arg.teacher

  config.optimizer = optim.default_optimizer_config("adamw_cosine")
  config.optimizer.lr = BASE_LR  # per 256 clips: lr_scale_by_batch
  config.optimizer.lr_scale_by_batch = True
  config.optimizer.warmup_epochs = WARMUP_EPOCHS
  config.optimizer.min_lr = 0.0

  data_config.pretraining_sections(config, arg.data, arg.data_dir, DATASETS, mode="mavil")

  config.model = dict(
      kind="mavil",
      **models.size_fields(arg.size, kind="mavil"),
      stage=arg.stage,
      img_size=224, num_frames=8, tubelet_size=2, audio_length=1024, num_mel_bins=128,
      patch_size=16, in_chans=3, mlp_ratio=4.0, norm_eps=1e-6,
      norm_pix_loss=True,  # stage 1 targets; stage 2 predicts the teacher's features
      mask_ratio_a=0.8, mask_ratio_v=0.9,
      contrast_temperature=0.1,
      inter_contrast_weight=0.01,
      intra_contrast_weight=0.01,
      stage2_contrastive=True,  # stage 2 keeps the contrastive terms next to the MSE
      trainable_pos_embed=False,
      **config_args.compute_fields(),
  )

  if arg.data == "synthetic":
    config.synthetic = dict(num_train=512, num_test=128, seed=0, num_classes=8,
                            data_dir=arg.data_dir, num_workers=2, num_frames=20)
    config.model.audio_length = SMALL_AUDIO
    config.model.num_frames = SMALL_FRAMES
    config.model.img_size = SMALL_IMAGE
    for section in (config.data, config.eval_data):
      section.target_length = SMALL_AUDIO
      section.num_frames = SMALL_FRAMES
      section.frame_resize = SMALL_IMAGE
    config.model.inter_contrast_weight = SMALL_CONTRAST_WEIGHT
    config.model.intra_contrast_weight = SMALL_CONTRAST_WEIGHT
    steps = arg.steps or SMALL_STEPS[arg.stage]
    config_args.short_run(config, steps, warmup_steps=min(40, steps // 4), lr=5e-4)
    config.log_every = 50
    config.checkpoint_every = 200
    config.data.shuffle_buffer = 512
  return config
