"""The one definition of a prepared example, shared by the TFDS builders and the input pipeline.

Every dataset this project prepares (synthetic, manifest/folder of videos, reference JSON
datafiles, AudioSet, VGGSound) stores examples of this form:

  clip_id  : str                     the clip's id (video id, or file stem)
  labels   : uint8 [num_classes]     multi-hot over the label file's classes
  fbank    : float16 [TARGET_FRAMES, NUM_MEL_BINS]
             un-normalised Kaldi log-mel (cav-mae spec section 1, steps 1-4: first channel,
             16 kHz, waveform mean removed, padded with zeros or cropped to TARGET_FRAMES)
  frames   : JPEG-encoded uint8 [num_frames, FRAME_SIZE, FRAME_SIZE, 3] (RGB, shorter side
             resized to FRAME_SIZE then center-cropped); num_frames is a builder setting:
             10 for CAV-MAE (spec section 2 positions), denser (2 frames/s) for MAViL
  frame_times : float32 [num_frames]  seconds from the clip start of each stored frame
  path     : str                     where the clip came from

Normalisation, augmentation and frame choice happen in the input pipeline, never here,
so one prepared dataset serves pretraining, fine-tuning and evaluation.
"""

TARGET_FRAMES = 1024
NUM_MEL_BINS = 128
FRAME_SIZE = 224
CAV_MAE_NUM_FRAMES = 10
FPS2_NUM_FRAMES = 20  # `--frames fps2`, MAViL's: 2 frames/s over 10 s
SAMPLE_RATE = 16000
FRAME_SHIFT_S = 0.01  # the log-mel's hop (data/audio.py, frame_shift_ms)

# Where `prepare` caches per-clip features beside a dataset, and the video files it takes.
PREPARE_DIR = "_prepare"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg",
                    ".ts", ".3gp", ".ogv")

# Feature names, so that builders and pipeline never spell them twice.
CLIP_ID = "clip_id"
LABELS = "labels"
FBANK = "fbank"
FRAMES = "frames"
FRAME_TIMES = "frame_times"
PATH = "path"


def tfds_features(num_classes: int, num_frames: int = CAV_MAE_NUM_FRAMES):
  """Returns the `tfds.features.FeaturesDict` of a prepared example."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  return tfds.features.FeaturesDict({
      CLIP_ID: tfds.features.Text(),
      LABELS: tfds.features.Tensor(shape=(num_classes,), dtype=np.uint8),
      FBANK: tfds.features.Tensor(
          shape=(TARGET_FRAMES, NUM_MEL_BINS), dtype=np.float16, encoding="bytes"),
      FRAMES: tfds.features.Sequence(
          tfds.features.Image(shape=(FRAME_SIZE, FRAME_SIZE, 3), encoding_format="jpeg"),
          length=num_frames),
      FRAME_TIMES: tfds.features.Tensor(shape=(num_frames,), dtype=np.float32),
      PATH: tfds.features.Text(),
  })
