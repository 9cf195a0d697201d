"""Machinery shared by the video-based TFDS builders: items, per-item cache, failures, Beam.

A builder lists `Item`s (one per clip) per split; `process_item` turns one into a schema.py
example, or records why it could not and yields nothing. Both the per-item feature cache and
the failure records are single files under `<dataset dir>/_prepare/` (written through
tf.io.gfile, so they also work on GCS from Dataflow workers): an interrupted or repeated run
only decodes what is missing, and a bad clip never stops the others. After preparation the
records are gathered into `<dataset version dir>/failures.jsonl`.

The same `process_item` runs in a plain loop (optionally a local process pool) or inside an
Apache Beam pipeline (`beam=True`: DirectRunner locally, Dataflow/Flink/Spark through
`tfds.download.DownloadConfig(beam_runner=..., beam_options=...)`).
"""

import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
import traceback
import uuid

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from avmae_jax.data import audio
from avmae_jax.data import clip
from avmae_jax.data import schema
from avmae_jax.data import video

FAILURES_FILE = "failures.jsonl"
PREPARE_DIR = schema.PREPARE_DIR
# Bumped when cached per-item features would change meaning.
_CACHE_FORMAT = 1
VIDEO_EXTENSIONS = schema.VIDEO_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class Item:
  """One clip to prepare.

  Attributes:
    key: unique within its split (TFDS example key, cache and failure file name).
    clip_id: stored as `clip_id`.
    path: the media file (kind 'video') or the wav/flac file (kind 'reference').
    labels: indices of the positive classes.
    kind: 'video' decodes audio and frames from `path`; 'reference' reads an extracted wav
      plus the JPEG files in `frame_paths` (the CAV-MAE datafile layout).
    frame_paths: the reference layout's frame files, in order.
    error: set when the item is known bad before decoding (e.g. no file found).
  """
  key: str
  clip_id: str
  path: str
  labels: tuple[int, ...] = ()
  kind: str = "video"
  frame_paths: tuple[str, ...] = ()
  error: str = ""


@dataclasses.dataclass
class ClipConfig(tfds.core.BuilderConfig):
  """num_frames: frames stored per clip (10: CAV-MAE positions; 20: 2 frames/s over 10 s)."""
  num_frames: int = schema.CAV_MAE_NUM_FRAMES
  downmix: bool = False
  jpeg_quality: int = video.DEFAULT_JPEG_QUALITY


CLIP_CONFIGS = [
    ClipConfig(name="cavmae", description="10 frames at the CAV-MAE reference positions.",
               num_frames=schema.CAV_MAE_NUM_FRAMES),
    ClipConfig(name="fps2", description="20 frames, 2 frames/s over 10 s (MAViL windows).",
               num_frames=20),
]


class ItemError(ValueError):
  """An item is bad; the message names the file and the reason."""


def read_label_csv(path: os.PathLike | str) -> list[tuple[str, str]]:
  """Reads an `index,mid,display_name` label file into [(mid, display_name)] by index."""
  import csv  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  with tf.io.gfile.GFile(path) as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
    raise ValueError(f"{path}: expected a CSV with columns index,mid,display_name")
  rows.sort(key=lambda r: int(r["index"]))
  if [int(r["index"]) for r in rows] != list(range(len(rows))):
    raise ValueError(f"{path}: indices must be 0..N-1")
  return [(r["mid"], r["display_name"]) for r in rows]


class LabelMap:
  """Maps label strings (mid, display name or index) to class indices."""

  def __init__(self, classes: list[tuple[str, str]]):
    self.classes = classes
    self._lookup = {}
    for i, (mid, name) in enumerate(classes):
      self._lookup.setdefault(name, i)
      self._lookup.setdefault(mid, i)

  def __len__(self):
    return len(self.classes)

  @property
  def names(self) -> list[str]:
    return [name for _, name in self.classes]

  def parse(self, labels: str, sep: str = ",") -> tuple[int, ...]:
    """'a,b' -> (index_a, index_b); raises KeyError naming an unknown label."""
    out = []
    for token in labels.split(sep):
      token = token.strip().strip('"')
      if not token:
        continue
      if token in self._lookup:
        out.append(self._lookup[token])
      elif token.isdigit() and int(token) < len(self.classes):
        out.append(int(token))
      else:
        raise KeyError(f"unknown label {token!r}")
    return tuple(sorted(set(out)))


def multi_hot(labels, num_classes: int) -> np.ndarray:
  out = np.zeros(num_classes, np.uint8)
  out[list(labels)] = 1
  return out


def _cache_name(item: Item, config: ClipConfig) -> str:
  sig = json.dumps([_CACHE_FORMAT, item.kind, item.path, item.frame_paths, config.num_frames,
                    config.downmix, config.jpeg_quality])
  digest = hashlib.sha1(sig.encode()).hexdigest()[:12]
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item.key)[:80]
  return f"{safe}-{digest}"


def _write_atomic(path: str, data: bytes):
  # A unique temporary name: Beam runners may run the same item twice at once (retries,
  # speculative execution), and two writers must not share one partial file.
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _save_features(path: str, feats: dict):
  frames = feats[schema.FRAMES]
  buf = io.BytesIO()
  np.savez(buf, fbank=feats[schema.FBANK], frame_times=feats[schema.FRAME_TIMES],
           jpeg=np.frombuffer(b"".join(frames), np.uint8),
           jpeg_sizes=np.array([len(f) for f in frames], np.int64))
  _write_atomic(path, buf.getvalue())


def _load_features(path: str) -> dict | None:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      z = np.load(io.BytesIO(f.read()))
      blob = z["jpeg"].tobytes()
      ends = np.cumsum(z["jpeg_sizes"])
      frames = [blob[s:e] for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]
      return {schema.FBANK: z["fbank"], schema.FRAME_TIMES: z["frame_times"],
              schema.FRAMES: frames}
  except Exception:  # pylint: disable=broad-except
    return None  # A damaged cache file is just recomputed.


def _reference_jpeg(path: str, quality: int) -> bytes:
  """A reference-layout frame file: passed through if already 224x224 RGB JPEG."""
  if not tf.io.gfile.exists(path):
    raise ItemError(f"{path}: missing frame file")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    img = Image.open(io.BytesIO(data))
    if (img.format == "JPEG" and img.mode == "RGB"
        and img.size == (schema.FRAME_SIZE, schema.FRAME_SIZE)):
      img.verify()
      return data
    return video.process_image(img, quality=quality)
  except Exception as e:  # pylint: disable=broad-except
    raise ItemError(f"{path}: unreadable image ({e})") from e


def extract_reference(item: Item, config: ClipConfig) -> dict:
  """Features of a CAV-MAE datafile entry: extracted wav + frame_{i} JPEGs."""
  if not tf.io.gfile.exists(item.path):
    raise ItemError(f"{item.path}: missing audio file")
  wave = audio.load_wav(item.path, downmix=config.downmix)
  if wave.shape[0] < 400:
    raise ItemError(f"{item.path}: audio too short ({wave.shape[0]} samples)")
  fbank = audio.clip_fbank(wave)
  frames = [_reference_jpeg(p, config.jpeg_quality) for p in item.frame_paths]
  # The layout does not record frame times: nominal even spacing over the (<= 10 s) clip.
  span = min(wave.shape[0] / schema.SAMPLE_RATE, video.REFERENCE_SECONDS)
  times = np.arange(len(frames), dtype=np.float32) * np.float32(span / len(frames))
  return {schema.FBANK: fbank.astype(np.float16), schema.FRAMES: frames,
          schema.FRAME_TIMES: times}


def _failure_path(failures_dir: str, item: Item) -> str:
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item.key)[:120]
  return os.path.join(failures_dir, safe + ".json")


def process_item(item: Item, *, config: ClipConfig, num_classes: int, cache_dir: str,
                 failures_dir: str, split: str = "") -> list[tuple[str, dict]]:
  """Features of one item as [(key, example)], or [] after recording why it failed."""
  failure_file = _failure_path(failures_dir, item)
  try:
    if item.error:
      raise ItemError(item.error)
    cache_file = os.path.join(cache_dir, _cache_name(item, config) + ".npz")
    feats = _load_features(cache_file) if tf.io.gfile.exists(cache_file) else None
    if feats is None:
      if item.kind == "reference":
        feats = extract_reference(item, config)
      elif not tf.io.gfile.exists(item.path):
        raise ItemError(f"{item.path}: missing file")
      else:
        feats = clip.extract_clip(item.path, num_frames=config.num_frames,
                                  downmix=config.downmix, jpeg_quality=config.jpeg_quality)
      if not np.all(np.isfinite(feats[schema.FBANK])):
        raise ItemError(f"{item.path}: filterbank is not finite")
      if len(feats[schema.FRAMES]) != config.num_frames:
        raise ItemError(f"{item.path}: {len(feats[schema.FRAMES])} frames, "
                        f"expected {config.num_frames}")
      _save_features(cache_file, feats)
  except Exception as e:  # pylint: disable=broad-except
    # Any failure of one item (bad file, codec error, bug on odd input) is recorded, not fatal.
    known = isinstance(e, (ItemError, audio.AudioError, video.VideoError))
    reason = str(e) if known else f"{item.path}: {type(e).__name__}: {e}"
    record = {"split": split, "key": item.key, "clip_id": item.clip_id, "path": item.path,
              "reason": reason}
    if not known:
      record["traceback"] = traceback.format_exc(limit=5)
    _write_atomic(failure_file, json.dumps(record).encode())
    return []
  if tf.io.gfile.exists(failure_file):
    tf.io.gfile.remove(failure_file)
  example = {
      schema.CLIP_ID: item.clip_id,
      schema.LABELS: multi_hot(item.labels, num_classes),
      schema.PATH: item.path,
      **feats,
  }
  return [(item.key, example)]


def parallel_map(fn, items, num_workers: int, window_per_worker: int = 4):
  """Yields fn(item) in order, from `num_workers` processes (in-process when 1).

  A bounded window of pending items keeps memory flat for millions of items; a crashed worker
  raises BrokenProcessPool instead of hanging.
  """
  if num_workers <= 1:
    yield from map(fn, items)
    return
  import collections  # pylint: disable=import-outside-toplevel
  from concurrent import futures  # pylint: disable=import-outside-toplevel
  # spawn: the parent holds TensorFlow threads, which fork does not copy safely.
  with futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    pending = collections.deque()
    it = iter(items)
    for item in it:
      pending.append(pool.submit(fn, item))
      if len(pending) >= num_workers * window_per_worker:
        break
    while pending:
      result = pending.popleft().result()
      for item in it:
        pending.append(pool.submit(fn, item))
        break
      yield result


class ClipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the video-based builders: subclasses list items and classes.

  Args (keyword, besides the TFDS ones: data_dir, config, version):
    beam: generate examples with an Apache Beam pipeline (one item per element).
    num_workers: local worker processes when not using Beam (1 = in-process).
    progress: show a per-clip progress bar (non-Beam runs).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = CLIP_CONFIGS

  def __init__(self, *, beam: bool = False, num_workers: int = 1, progress: bool = True,
               **kwargs):
    self._beam = beam
    self._num_workers = max(1, int(num_workers))
    self._progress = progress
    super().__init__(**kwargs)

  # --- For subclasses.
  def _class_names(self) -> list[str]:
    raise NotImplementedError

  def _split_items(self, dl_manager) -> dict[str, list[Item]]:
    raise NotImplementedError

  # --- TFDS.
  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=schema.tfds_features(len(self._class_names()), self.builder_config.num_frames),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(class_names=self._class_names()),
    )

  @property
  def prepare_dir(self) -> str:
    # Beside the version folders (TFDS ignores non-version names there). Built from the root,
    # not from data_dir, which points into a temporary folder while generating.
    return os.path.join(os.fspath(self.data_dir_root), self.name, self.builder_config.name,
                        PREPARE_DIR)

  def _split_generators(self, dl_manager):
    failures_dir = os.path.join(self.prepare_dir, "failures")
    # Records of a previous run are stale: every item is retried now.
    if tf.io.gfile.exists(failures_dir):
      tf.io.gfile.rmtree(failures_dir)
    tf.io.gfile.makedirs(failures_dir)
    tf.io.gfile.makedirs(os.path.join(self.prepare_dir, "cache"))
    splits = self._split_items(dl_manager)
    # Some builders learn their class names from the files only now.
    self.info.metadata["class_names"] = self._class_names()
    return {split: self._generate_examples(items, split) for split, items in splits.items()}

  def _generate_examples(self, items: list[Item], split: str = ""):
    fn = functools.partial(
        process_item, config=self.builder_config, num_classes=len(self._class_names()),
        cache_dir=os.path.join(self.prepare_dir, "cache"),
        failures_dir=os.path.join(self.prepare_dir, "failures"), split=split)
    if self._beam:
      beam = tfds.core.lazy_imports.apache_beam
      return (f"Create{split}" >> beam.Create(items)
              | f"Process{split}" >> beam.FlatMap(fn))
    return self._generate_locally(items, fn, split)

  def _generate_locally(self, items, fn, split):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(items), desc=f"{self.name}/{split}", unit="clip",
               disable=not self._progress)
    failed = 0
    try:
      for out in parallel_map(fn, items, self._num_workers):
        failed += not out
        bar.update(1)
        bar.set_postfix(failed=failed)
        yield from out
    finally:
      bar.close()

  def download_and_prepare(self, *args, **kwargs):
    super().download_and_prepare(*args, **kwargs)
    failures_dir = os.path.join(self.prepare_dir, "failures")
    if tf.io.gfile.exists(failures_dir):
      records = []
      for name in sorted(tf.io.gfile.listdir(failures_dir)):
        if name.endswith(".json"):
          with tf.io.gfile.GFile(os.path.join(failures_dir, name)) as f:
            records.append(json.loads(f.read()))
      with tf.io.gfile.GFile(os.path.join(self.data_dir, FAILURES_FILE), "w") as f:
        for r in records:
          f.write(json.dumps(r) + "\n")

  def failures(self) -> list[dict]:
    """Records of the items the last preparation skipped ({split, key, path, reason})."""
    path = os.path.join(self.data_dir, FAILURES_FILE)
    if not tf.io.gfile.exists(path):
      return []
    with tf.io.gfile.GFile(path) as f:
      return [json.loads(line) for line in f if line.strip()]


def find_media(root: os.PathLike | str, extensions=VIDEO_EXTENSIONS) -> list[str]:
  """Media files under root (recursive), sorted."""
  out = []
  for dirpath, _, files in tf.io.gfile.walk(os.fspath(root)):
    for name in files:
      if name.lower().endswith(extensions):
        out.append(os.path.join(dirpath, name))
  return sorted(out)
