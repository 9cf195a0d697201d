"""The `config.data` section of the input pipeline: defaults and validation.

TensorFlow-free, so that training configs can embed `default_data_config()` without
importing TensorFlow; the pipeline itself (pipeline.py) consumes the section. Field
meanings are commented where the defaults are set.
"""

import sys

import ml_collections

from avmae_jax.data import prepared
from avmae_jax.data import schema

MODES = ('cav_mae', 'mavil')
STAGES = ('pretrain', 'finetune', 'eval')
DTYPE_NAMES = ('float32', 'bfloat16')

# (mean, std, std factor): normalised = (x - mean) / (factor * std).
CAV_MAE_NORM = (-5.081, 4.4849, 1.0)
MAVIL_NORM = (-4.2677393, 4.5689974, 2.0)


def default_data_config(stage: str = 'pretrain',
                        mode: str = 'cav_mae') -> ml_collections.ConfigDict:
  """The `config.data` section with the reference's defaults for a stage and model.

  Args:
    stage: 'pretrain' (noise on, no SpecAugment/mixup), 'finetune' (noise, SpecAugment
      48/192, mixup 0.5, label smoothing 0.1) or 'eval' (one ordered pass, no
      augmentation, frame 5, clip ids).
    mode: 'cav_mae' (one frame, mean/std -5.081/4.4849) or 'mavil' (8 frames at 2
      frames/s, (x - mean) / (2 std) with -4.2677393/4.5689974).
  """
  if stage not in STAGES:
    raise ValueError(f'stage must be one of {STAGES}, got {stage!r}')
  if mode not in MODES:
    raise ValueError(f'config.data.mode must be one of {MODES}, got {mode!r}')
  c = ml_collections.ConfigDict()
  # Where the prepared examples are: a TFDS builder name (+ data_dir), or a
  # prepared dataset's directory (builder_dir). Tests pass a tf.data.Dataset instead.
  c.name = ''
  c.data_dir = ''
  c.builder_dir = ''
  c.split = 'train' if stage != 'eval' else 'test'
  # True: shuffled, endless epochs, random frame, augmentation. False: one ordered
  # pass, frame `frame_use`, no augmentation or smoothing, last batch padded.
  c.training = stage != 'eval'
  c.batch_size = 48  # GLOBAL; each host yields batch_size // process_count.
  c.shuffle_buffer = 2048  # encoded clips (~0.45 MB each) held for shuffling.
  c.shuffle_files = True
  c.seed = 0
  c.mode = mode
  # Audio (spec 1).
  c.target_length = schema.TARGET_FRAMES
  c.num_mel_bins = schema.NUM_MEL_BINS
  mean, std, factor = CAV_MAE_NORM if mode == 'cav_mae' else MAVIL_NORM
  c.norm_mean = mean
  c.norm_std = std
  c.norm_std_factor = factor  # MAViL divides by 2 std.
  c.noise = stage != 'eval'
  # Generator of the 131k noise values per clip: 'hash' (a counter-based integer hash
  # inside the XLA-compiled transforms; fast) or 'philox' (tf stateless_uniform).
  c.noise_rng = 'hash'
  c.freqm = 48 if stage == 'finetune' else 0
  c.timem = 192 if stage == 'finetune' else 0
  # Labels and mixup (spec 3).
  c.mixup = 0.5 if stage == 'finetune' else 0.0
  c.mixup_alpha = 10.0
  c.label_smooth = 0.1 if stage == 'finetune' else 0.0
  c.balanced_sampling = False
  c.balanced_weights_file = ''  # optional .npy/.csv of per-clip weights of the shard.
  # Frames (spec 2; MAViL).
  c.frame_size = schema.FRAME_SIZE  # the stored frames' size
  # > 0: resize decoded frames to this square size (area averaging), e.g. 112 for
  # quick low-resolution runs; the model's img_size must match. 0: keep frame_size.
  c.frame_resize = 0
  c.frame_use = -1  # evaluation frame; -1 means 5 (the reference's choice).
  c.eval_all_frames = False  # CAV-MAE evaluation aggregation: all 10 frames.
  c.num_frames = 8 if mode == 'mavil' else 1
  c.mavil_fps = 2.0
  # Output.
  c.dtype = 'float32'  # or 'bfloat16', for audio and frames.
  c.return_clip_id = stage == 'eval'
  c.num_parallel_calls = -1  # -1 = AUTOTUNE.
  c.prefetch = 4  # batches.
  # Compile the batch transforms with XLA (several times faster on CPU hosts).
  c.jit_transforms = True
  return c


def pretraining_sections(config: ml_collections.ConfigDict, data: str, data_dir: str,
                         datasets: dict, mode: str = 'cav_mae') -> None:
  """config.data and config.eval_data of a pretraining recipe.

  `data` is "videos" (your clips under data_dir: `use_prepared_videos`) or a key of
  `datasets`, {data: (TFDS builder name, training split, held-out split)}.
  """
  config.data = default_data_config('pretrain', mode=mode)
  config.eval_data = default_data_config('eval', mode=mode)
  config.eval_data.batch_size = 64
  if data == 'videos':
    use_prepared_videos(config, data_dir, mode)
    return
  name, train_split, eval_split = datasets[data]
  config.data.name, config.data.data_dir = name, data_dir
  config.data.split = train_split
  config.eval_data.name, config.eval_data.data_dir = name, data_dir
  config.eval_data.split = eval_split


_NOTED = set()


def use_prepared_videos(config: ml_collections.ConfigDict, data_dir: str,
                        mode: str = 'cav_mae') -> prepared.PreparedDataset:
  """Points config.data and config.eval_data at the clips `prepare videos` wrote under data_dir.

  Training split: the manifest's train; held out: its test/eval/validation split, else the
  last `prepared.HELD_OUT_PERCENT` % of train (stated on stderr). Returns the dataset (for
  its class count). Raises PreparedDatasetError saying what data_dir holds and what to run.
  """
  dataset = prepared.find(data_dir, 'avmae_videos', prepared.FRAMES_FOR_MODE[mode],
                          field='data_dir')
  train_split, held_out, note = dataset.train_and_eval_splits()
  for section, split in ((config.data, train_split), (config.eval_data, held_out)):
    section.name, section.data_dir = '', ''
    section.builder_dir = dataset.builder_dir
    section.split = split
  if dataset.builder_dir not in _NOTED:  # a config built from another says it once
    _NOTED.add(dataset.builder_dir)
    print(f'avmae_jax: {dataset.builder_dir}: {note}', file=sys.stderr)
  return dataset


def validate_config(c) -> None:
  """Raises ValueError naming the first bad field of a `config.data` section."""

  def bad(field, msg):
    raise ValueError(f'config.data.{field}: {msg} (got {c.get(field)!r})')

  if c.mode not in MODES:
    bad('mode', f'must be one of {MODES}')
  if not isinstance(c.batch_size, int) or c.batch_size <= 0:
    bad('batch_size', 'must be a positive int (the GLOBAL batch size)')
  if not isinstance(c.shuffle_buffer, int) or c.shuffle_buffer < 0:
    bad('shuffle_buffer', 'must be an int >= 0')
  if not isinstance(c.seed, int):
    bad('seed', 'must be an int')
  if not isinstance(c.target_length, int) or c.target_length <= 0:
    bad('target_length', 'must be a positive int')
  if c.num_mel_bins != schema.NUM_MEL_BINS:
    bad('num_mel_bins', f'prepared data has {schema.NUM_MEL_BINS} bins')
  if not float(c.norm_std) > 0:
    bad('norm_std', 'must be > 0')
  if not float(c.norm_std_factor) > 0:
    bad('norm_std_factor', 'must be > 0')
  if not isinstance(c.freqm, int) or not 0 <= c.freqm <= c.num_mel_bins:
    bad('freqm', f'must be an int in [0, {c.num_mel_bins}]')
  if not isinstance(c.timem, int) or not 0 <= c.timem <= c.target_length:
    bad('timem', f'must be an int in [0, {c.target_length}]')
  if not 0.0 <= float(c.mixup) <= 1.0:
    bad('mixup', 'is a probability, must be in [0, 1]')
  if not float(c.mixup_alpha) > 0:
    bad('mixup_alpha', 'must be > 0')
  if not 0.0 <= float(c.label_smooth) < 1.0:
    bad('label_smooth', 'must be in [0, 1)')
  if not isinstance(c.get('frame_resize', 0), int) or c.get('frame_resize', 0) < 0:
    bad('frame_resize', 'must be 0 (keep the stored size) or a positive size in pixels')
  if not isinstance(c.frame_use, int) or c.frame_use < -1:
    bad('frame_use', 'must be -1 (frame 5) or a frame index >= 0')
  if c.mode == 'mavil':
    if not isinstance(c.num_frames, int) or c.num_frames <= 0:
      bad('num_frames', 'must be a positive int in mavil mode')
    if not float(c.mavil_fps) > 0:
      bad('mavil_fps', 'must be > 0')
    if c.eval_all_frames:
      bad('eval_all_frames', 'is a CAV-MAE option; MAViL always takes num_frames')
  elif c.num_frames != 1:
    bad('num_frames', "must be 1 in cav_mae mode (use eval_all_frames for 10)")
  if c.eval_all_frames and c.training:
    bad('eval_all_frames', 'applies to evaluation (training=False) only')
  if c.noise_rng not in ('hash', 'philox'):
    bad('noise_rng', "must be 'hash' or 'philox'")
  if c.dtype not in DTYPE_NAMES:
    bad('dtype', f'must be one of {DTYPE_NAMES}')
  if not isinstance(c.prefetch, int) or c.prefetch < 0:
    bad('prefetch', 'must be an int >= 0')
  if not isinstance(c.num_parallel_calls, int) or (
      c.num_parallel_calls <= 0 and c.num_parallel_calls != -1):
    bad('num_parallel_calls', 'must be -1 (AUTOTUNE) or a positive int')
  if c.balanced_sampling and not c.training:
    bad('balanced_sampling', 'only applies when training')
  if c.balanced_weights_file and not c.balanced_sampling:
    bad('balanced_weights_file', 'is set but balanced_sampling is off')
  if c.builder_dir and c.name:
    bad('builder_dir', 'set either name (+ data_dir) or builder_dir, not both')
