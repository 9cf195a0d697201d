r"""Files in, embeddings out: features of your own video and audio files, no dataset needed.

  python -m avmae_jax.embed --checkpoint CKPT --out DIR PATH [PATH ...] [--config CONFIG]
      [--pooled | --tokens] [--shard_size 1024] [--dtype float16] [--batch_size 16]

In Python: `avmae_jax.load(CKPT).embed(paths)` (the same arrays, in memory) and
`.embed_waveform(wave, sample_rate)` (a waveform's audio embedding, no file).

PATHs are files or folders (searched recursively): videos (mp4, mkv, webm, ...) and audio-only
files (wav, flac, mp3, ogg, m4a, ...). Each file is decoded exactly as `prepare` decodes a
clip (data/clip.py: first channel, 16 kHz, the Kaldi filterbank; frames at the reference's
positions over the whole file) and then goes through the config's eval_data transforms (the
normalisation, the evaluation frame, frame_resize), so a clip gives the features `extract`
gives for it once prepared. Without --config: the evaluation defaults of the model's family
(`data_config`) at the checkpoint's audio length and frame size.

Clip length: a file up to the model's audio length (target_length log-mel frames, 10.24 s for
1,024) is padded with zeros as the reference pads; a longer one is cut into windows of that
length (consecutive; the last one ends at the file's end and may overlap the one before), and
its audio embedding is the mean of the windows' embeddings (`windows` per clip is stored;
--nowindows keeps the first window only, which is what prepare + extract see). The video
embedding uses the frames chosen over the whole file, as prepare does.

Output: the shard format of `extract` (DIR/features-NNNNN.npz: audio, video, clip_id (the file
stem), labels (empty)) plus `path`, `windows` and `has_video` (False for audio-only files,
whose video rows are NaN) and DIR/index.json. A file that cannot be decoded (corrupt, not
media, no audio track) is listed with its reason in index.json's `failed` and on stderr and
skipped; every good file is written; the exit status is then 1.
"""

import json
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from avmae_jax import api
from avmae_jax import cli
from avmae_jax.data import schema
from avmae_jax.evaluators import common as eval_common

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma")
DTYPES = ("float32", "float16")
# Files decoded and embedded per round (bounds the decoded clips held in memory).
FILES_PER_ROUND = 256


class EmbedError(Exception):
  """A request that cannot be served (no files, bad option)."""


def find_files(paths: Sequence[str]) -> list[str]:
  """The media files named by `paths` (files as given; folders searched, sorted)."""
  media = schema.VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
  out = []
  for path in paths:
    if os.path.isdir(path):
      out += sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                    if f.lower().endswith(media))
    else:
      out.append(path)  # a missing or odd file is reported by decoding, with its reason
  return out


def is_audio_only(path: str) -> bool:
  return path.lower().endswith(AUDIO_EXTENSIONS)


def stored_frames(mode: str) -> int:
  """Frames decoded per clip, as `prepare --frames cavmae|fps2` stores them for a mode."""
  return schema.CAV_MAE_NUM_FRAMES if mode == "cav_mae" else schema.FPS2_NUM_FRAMES


def audio_windows(fbank: np.ndarray, length: int) -> np.ndarray:
  """[windows, length, bins]: one zero-padded window for a clip up to `length` frames, else
  consecutive windows, the last aligned to the clip's end."""
  t = fbank.shape[0]
  if t <= length:
    out = np.zeros((1, length, fbank.shape[1]), fbank.dtype)
    out[0, :t] = fbank
    return out
  starts = list(range(0, t - length + 1, length))
  if starts[-1] + length < t:
    starts.append(t - length)
  return np.stack([fbank[s:s + length] for s in starts])


def decode(path: str, num_frames: int, target_length: int,
           windows: bool = True) -> dict[str, Any]:
  """One file as prepare decodes it: {fbank windows, frames (JPEG bytes), has_video}.

  Raises audio.AudioError / video.VideoError naming the file and the reason.
  """
  from avmae_jax.data import audio  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import clip  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import video  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise audio.AudioError(f"{path}: no such file")
  has_video = not is_audio_only(path)
  # prepare's decoding (float16 log-mel, as prepared datasets store it), every frame kept.
  decoded = clip.extract_clip(path, num_frames, target_frames=None, with_video=has_video)
  fbank, frames, times = (decoded[k] for k in (schema.FBANK, schema.FRAMES,
                                               schema.FRAME_TIMES))
  if not has_video:  # black frames spread over the clip: the video tower's input is unused
    black = video.encode_jpeg(np.zeros((schema.FRAME_SIZE, schema.FRAME_SIZE, 3), np.uint8))
    seconds = len(fbank) * schema.FRAME_SHIFT_S
    frames, times = [black] * num_frames, np.arange(num_frames) * (seconds / num_frames)
  if not windows:  # the start only, as prepare + extract see a clip
    fbank = fbank[:target_length]
  return {"windows": audio_windows(fbank, target_length),
          "frames": list(frames), "frame_times": np.asarray(times, np.float32),
          "has_video": has_video}


def _dataset(decoded: list[dict[str, Any]]):
  """The windows of decoded files as an in-memory dataset of schema examples."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  fbank = np.concatenate([d["windows"] for d in decoded]).astype(np.float32)
  frames = [f for d in decoded for f in [d["frames"]] * len(d["windows"])]
  times = np.stack([t for d in decoded for t in [d["frame_times"]] * len(d["windows"])])
  ids = [f"{i}" for i, d in enumerate(decoded) for _ in range(len(d["windows"]))]
  return tf.data.Dataset.from_tensor_slices({
      schema.FBANK: fbank, schema.FRAMES: tf.constant(frames, tf.string),
      schema.FRAME_TIMES: times, schema.LABELS: np.zeros((len(ids), 1), np.float32),
      schema.CLIP_ID: ids})


def data_config(model: api.LoadedModel,
                config: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The input section embedding applies: `config.eval_data` when a training config is
  given, else the evaluation defaults of the model's family (the reference's log-mel
  normalisation, frame 5 / MAViL's 8 frames) at the model's audio length and frame size."""
  if config is not None:
    c = ml_collections.ConfigDict(config.eval_data.to_dict())
  else:
    from avmae_jax.data import config as data_config_lib  # pylint: disable=import-outside-toplevel
    mode = "mavil" if model.module.frames_per_input > 1 else "cav_mae"
    c = data_config_lib.default_data_config("eval", mode=mode)
    c.target_length = int(model.module.audio_length)
    if model.module.img_size != c.frame_size:
      c.frame_resize = int(model.module.img_size)
  c.name, c.builder_dir, c.eval_all_frames, c.return_clip_id = "", "", False, True
  return c


def embed_files(model: api.LoadedModel, data: ml_collections.ConfigDict, files: Sequence[str],
                pooled: bool = True, batch_size: int = 16, windows: bool = True,
                progress: bool = False) -> Iterator[tuple[Optional[dict], list[dict]]]:
  """Embeds `files` FILES_PER_ROUND at a time; yields (arrays, failed) per round.

  arrays (None when no file of the round decoded): audio, video, clip_id, labels (empty),
  path, windows, has_video, one row per good file. failed: [{path, reason}].
  """
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  import tqdm  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict(data.to_dict())
  c.batch_size = batch_size
  bar = tqdm.tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr)
  for start in range(0, len(files), FILES_PER_ROUND):
    good, decoded, failed = [], [], []
    for path in files[start:start + FILES_PER_ROUND]:
      try:
        decoded.append(decode(path, stored_frames(c.mode), c.target_length, windows))
        good.append(path)
      except ValueError as e:  # AudioError, VideoError: the message names the file
        failed.append({"path": path, "reason": str(e)})
      bar.update(1)
    if not good:
      yield None, failed
      continue
    sums = [None] * len(good)
    video = [None] * len(good)
    with pipeline.create_iterator(c, _dataset(decoded)) as batches:
      for batch in batches:
        keep = eval_common.valid_rows(batch)
        feats = model.features(batch["audio"], batch["frames"], pooled=pooled)
        audio_rows = np.asarray(feats["audio"], np.float64)[keep]
        video_rows = np.asarray(feats["video"], np.float32)[keep]
        for row, clip in enumerate(np.asarray(batch[schema.CLIP_ID])[keep]):
          i = int(clip.decode() if isinstance(clip, bytes) else clip)
          sums[i] = audio_rows[row] if sums[i] is None else sums[i] + audio_rows[row]
          if video[i] is None:
            video[i] = video_rows[row]
    n_windows = np.array([len(d["windows"]) for d in decoded])
    has_video = np.array([d["has_video"] for d in decoded])
    yield {
        "audio": np.stack([s / w for s, w in zip(sums, n_windows)]).astype(np.float32),
        "video": np.stack([v if h else np.full_like(v, np.nan)
                           for v, h in zip(video, has_video)]),
        "clip_id": np.array([os.path.splitext(os.path.basename(p))[0] for p in good], str),
        "labels": np.zeros((len(good), 0), np.float32),
        "path": np.array([os.path.abspath(p) for p in good], str),
        "windows": n_windows.astype(np.int32), "has_video": has_video}, failed
  bar.close()


def embed_waveform(model: api.LoadedModel, waveform: np.ndarray,
                   sample_rate: int = schema.SAMPLE_RATE, pooled: bool = True,
                   windows: bool = True,
                   config: Optional[ml_collections.ConfigDict] = None) -> np.ndarray:
  """The audio embedding of a mono waveform, as `embed` gives it for an audio file.

  The waveform (float, [-1, 1]) is resampled to 16 kHz if needed (swresample, as decoding
  does), then the Kaldi filterbank, the float16 storage rounding, the windows of a long clip
  and the config's normalisation; no TensorFlow. Returns [D] (pooled) or [La, D] tokens,
  averaged over the windows.
  """
  from avmae_jax.data import audio  # pylint: disable=import-outside-toplevel
  wave = np.asarray(waveform, np.float32)
  if wave.ndim != 1:
    raise ValueError(f"waveform must be mono, [samples]; got shape {wave.shape} (take one "
                     "channel, e.g. wave[:, 0])")
  if not np.all(np.isfinite(wave)):
    raise ValueError("waveform has NaN or infinite samples")
  if sample_rate != schema.SAMPLE_RATE:
    wave = audio.resample(wave, sample_rate, schema.SAMPLE_RATE)
  c = data_config(model, config)
  fbank = audio.clip_fbank(wave, target_frames=None).astype(np.float16)
  if not windows:
    fbank = fbank[:c.target_length]
  x = audio_windows(fbank, c.target_length).astype(np.float32)
  x = (x - np.float32(c.norm_mean)) / np.float32(c.norm_std_factor * c.norm_std)
  frames = np.zeros((len(x),) + tuple(model.module.input_shapes(1)[1].shape[1:]), np.float32)
  feats = model.features(x, frames, pooled=pooled)["audio"]
  return np.mean(feats.astype(np.float64), axis=0).astype(np.float32)


def embed(model: api.LoadedModel, config: Optional[ml_collections.ConfigDict],
          paths: Sequence[str], out: str, pooled: bool = True, shard_size: int = 1024,
          dtype: str = "float32", batch_size: int = 16, progress: bool = True,
          windows: bool = True, meta: Optional[dict] = None) -> dict[str, Any]:
  """Embeds the media files under `paths` into `out`; returns the index (also written).

  config: the training config (its eval_data transforms), or None for the model's defaults.
  """
  from avmae_jax import extract  # pylint: disable=import-outside-toplevel
  if dtype not in DTYPES:
    raise EmbedError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  if not isinstance(shard_size, int) or shard_size < 1:
    raise EmbedError(f"--shard_size must be a positive number of clips, got {shard_size!r}")
  files = find_files(paths)
  if not files:
    raise EmbedError(f"no video or audio files in {list(paths)}")
  data = data_config(model, config)
  os.makedirs(out, exist_ok=True)
  writer = extract.ShardWriter(out, shard_size, None)
  failed, shapes = [], {}
  for arrays, round_failed in embed_files(model, data, files, pooled, batch_size, windows,
                                          progress):
    failed += round_failed
    for item in round_failed:
      print(f"SKIPPED {item['reason']}", file=sys.stderr)
    if arrays is None:
      continue
    arrays["audio"] = arrays["audio"].astype(dtype)
    arrays["video"] = arrays["video"].astype(dtype)
    shapes = shapes or {k: list(v.shape[1:]) for k, v in arrays.items()}
    writer.add(arrays)
  writer.close()
  index = {**(meta or {}), "pooled": bool(pooled), "dtype": dtype, "shapes": shapes,
           "num_clips": sum(s["num_clips"] for s in writer.shards), "shards": writer.shards,
           "window_frames": int(data.target_length),
           "clip_length": ("padded to window_frames log-mel frames; longer clips: the mean "
                           "audio embedding of consecutive windows of window_frames (the last "
                           "ending at the clip's end), video from frames over the whole clip"
                           if windows else "the first window_frames log-mel frames (padded),"
                           " as prepare + extract"),
           "failed": failed}
  with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return index


def _define_flags() -> None:
  cli.define_model_flags("configs/FILE.py[:args] the model was trained with (its eval_data "
                         "transforms are applied); default: the model family's evaluation "
                         "defaults at the checkpoint's input sizes.",
                         "Model directory, training workdir or reference .pth.")
  flags.DEFINE_string("out", None, "Directory for the .npz shards and index.json.")
  flags.DEFINE_bool("pooled", None, "Mean-pooled [D] vectors per clip (the default).")
  flags.DEFINE_bool("tokens", None, "Whole token sequences [L, D] per clip instead.")
  flags.DEFINE_integer("shard_size", 1024, "Clips per .npz shard.")
  flags.DEFINE_integer("batch_size", 16, "Windows per forward pass.")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored feature dtype.")
  flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
  flags.DEFINE_bool("windows", True, "Average the audio over windows of a long clip; "
                    "--nowindows keeps its start only, as prepare + extract do.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  paths = argv[1:]
  with cli.command(argv[:1], EmbedError) as f:
    if f.pooled and f.tokens:
      raise app.UsageError("--pooled and --tokens exclude each other")
    if not paths:
      raise app.UsageError("give the files or folders to embed after the flags")
    if jax.process_count() > 1:
      raise EmbedError("embed runs in one process; use extract on a prepared dataset")
    model, where = cli.load_model(f.checkpoint, f.step)
    from avmae_jax import extract  # pylint: disable=import-outside-toplevel
    meta = extract.index_meta(where, f.checkpoint, f.step, data_config(model, f.config))
    index = embed(model, f.config, paths, f.out, not (f.tokens or f.pooled is False),
                  f.shard_size, f.dtype, f.batch_size, f.progress, f.windows, meta=meta)
  print(f"{index['num_clips']} file(s) embedded by {index['model']} into {f.out}; "
        f"{len(index['failed'])} skipped")
  return 1 if index["failed"] else 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
