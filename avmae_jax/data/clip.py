"""One clip from a media file to the arrays of a prepared example, and its benchmark.

`extract_clip` is what every video-based builder runs per item; `benchmark_prepare` times it
on generated 10 s clips, pinned to one core, for `python -m avmae_jax.bench data`.
"""

import os
import tempfile
import time

import numpy as np

from avmae_jax.data import audio
from avmae_jax.data import schema
from avmae_jax.data import video


def extract_clip(path: os.PathLike | str,
                 num_frames: int = schema.CAV_MAE_NUM_FRAMES,
                 downmix: bool = False,
                 jpeg_quality: int = video.DEFAULT_JPEG_QUALITY,
                 target_frames: int | None = schema.TARGET_FRAMES,
                 with_video: bool = True) -> dict:
  """Decodes a media file into {fbank, frames, frame_times} of schema.py.

  target_frames: the log-mel padded or cropped to this many frames (None: every frame, as
  `embed` takes long clips). with_video=False (audio-only files): frames and frame_times
  are None.

  Raises:
    audio.AudioError, video.VideoError: with the file name and the reason.
  """
  wave = audio.load_audio(path, downmix=downmix)
  fbank = audio.clip_fbank(wave, target_frames=target_frames)
  if not np.all(np.isfinite(fbank)):
    raise audio.AudioError(f"{os.fspath(path)}: filterbank is not finite")
  frames = times = None
  if with_video:
    frames, times = video.extract_frames(path, num_frames=num_frames, quality=jpeg_quality)
  return {
      schema.FBANK: fbank.astype(np.float16),
      schema.FRAMES: frames,
      schema.FRAME_TIMES: times,
  }


def benchmark_prepare(num_clips: int = 4,
                      seconds: float = 10.0,
                      height: int = 360,
                      num_frames: int = schema.CAV_MAE_NUM_FRAMES,
                      fps: int = 30,
                      workdir: str | None = None,
                      pin_core: bool = True) -> dict:
  """Times `extract_clip` on generated H.264/AAC clips (16:9, `height` lines, stereo 44.1 kHz).

  Generation is not timed. With `pin_core` the process is pinned to one CPU during the
  measurement (and restored after), so the figure is per core, codec threads included.

  Returns:
    dict with clips_per_s_per_core, s_per_clip, fbank_ms_per_clip, num_clips, seconds,
    height, num_frames, pinned.
  """
  from avmae_jax.data import synthetic  # pylint: disable=import-outside-toplevel

  width = int(round(height * 16 / 9 / 2)) * 2
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    paths = []
    for i in range(num_clips):
      p = os.path.join(tmp, f"bench_{i}.mp4")
      scene = synthetic.draw_scene(1234, "train", i, seconds=seconds)
      synthetic.write_video(p, scene, width=width, height=height, fps=fps)
      paths.append(p)
    old_affinity = None
    if pin_core and hasattr(os, "sched_setaffinity"):
      old_affinity = os.sched_getaffinity(0)
      os.sched_setaffinity(0, {min(old_affinity)})
    try:
      extract_clip(paths[0], num_frames=num_frames)  # warm-up: codec and filter setup
      t0 = time.perf_counter()
      for p in paths:
        extract_clip(p, num_frames=num_frames)
      elapsed = time.perf_counter() - t0
      wave = audio.load_audio(paths[0])
      reps = 20
      t1 = time.perf_counter()
      for _ in range(reps):
        audio.clip_fbank(wave)
      fbank_ms = (time.perf_counter() - t1) / reps * 1e3
    finally:
      if old_affinity is not None:
        os.sched_setaffinity(0, old_affinity)
  return {
      "clips_per_s_per_core": num_clips / elapsed,
      "s_per_clip": elapsed / num_clips,
      "fbank_ms_per_clip": fbank_ms,
      "num_clips": num_clips,
      "seconds": seconds,
      "height": height,
      "num_frames": num_frames,
      "pinned": old_affinity is not None,
  }
