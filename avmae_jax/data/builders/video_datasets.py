"""TFDS builders over real clips: a manifest or folder of videos, CAV-MAE datafiles, AudioSet,
VGGSound. All produce schema.py examples through `common.ClipBuilder` (per-item cache,
failure records, optional Apache Beam).
"""

import csv
import io
import json
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from avmae_jax.data import schema
from avmae_jax.data.builders import common

_SPLIT_NAMES = ("train", "test", "validation", "eval", "balanced_train", "unbalanced_train")


def _resolve(path: str, base_dir: str) -> str:
  return path if os.path.isabs(path) or "://" in path else os.path.join(base_dir, path)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


class AvmaeVideos(common.ClipBuilder):
  """Audio-visual clips from a manifest CSV or a folder of videos.

  Manifest: CSV with a header; `path` (absolute or relative to the manifest) is required;
  optional `labels` (comma-separated mids, display names or indices), `clip_id` (default: the
  file stem) and `split` (default `train`). Classes come from `label_csv`
  (`index,mid,display_name`) when given, else from the sorted distinct labels.

  Folder: every video under it; a file's class is its first sub-folder (ImageFolder style);
  top-level folders named like splits (train/, test/...) are splits. Without sub-folders the
  clips get no label (one placeholder class).
  """

  name = "avmae_videos"

  def __init__(self, *, manifest: str | None = None, folder: str | None = None,
               label_csv: str | None = None, **kwargs):
    if manifest and folder:
      raise ValueError("Give either a manifest or a folder, not both.")
    self._manifest = manifest
    self._folder = folder
    self._label_csv = label_csv
    self._rows = None
    self._labels = None
    super().__init__(**kwargs)

  def _load(self):
    if self._rows is not None:
      return
    rows = []  # (split, clip_id, path, label string)
    if self._manifest:
      with tf.io.gfile.GFile(self._manifest) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
          raise ValueError(f"{self._manifest}: manifest needs a header with a 'path' column")
        base = os.path.dirname(self._manifest)
        for r in reader:
          path = _resolve(r["path"].strip(), base)
          rows.append((r.get("split") or "train", r.get("clip_id") or _stem(path), path,
                       r.get("labels") or ""))
    elif self._folder:
      if not tf.io.gfile.isdir(self._folder):
        raise ValueError(f"{self._folder}: not a folder")
      for path in common.find_media(self._folder):
        parts = os.path.relpath(path, self._folder).split(os.sep)[:-1]
        split = "train"
        if parts and parts[0] in _SPLIT_NAMES:
          split, parts = parts[0], parts[1:]
        rows.append((split, _stem(path), path, parts[0] if parts else ""))
    else:
      raise ValueError("AvmaeVideos needs manifest= or folder= to prepare.")
    if self._label_csv:
      self._labels = common.LabelMap(common.read_label_csv(self._label_csv))
    else:
      names = sorted({t.strip() for r in rows for t in r[3].split(",") if t.strip()})
      self._labels = common.LabelMap([(n, n) for n in names] or [("unlabelled", "unlabelled")])
    self._rows = rows

  def _class_names(self):
    self._load()
    return self._labels.names

  def _split_items(self, dl_manager):
    del dl_manager
    self._load()
    splits = {}
    for i, (split, clip_id, path, labels) in enumerate(self._rows):
      error = ""
      try:
        parsed = self._labels.parse(labels)
      except KeyError as e:
        parsed, error = (), f"{path}: {e.args[0]}"
      splits.setdefault(split, []).append(common.Item(
          key=f"{i:08d}_{clip_id}", clip_id=clip_id, path=path, labels=parsed, error=error))
    return splits


class AvmaeDatafile(common.ClipBuilder):
  """CAV-MAE reference datafiles: JSON `{"data": [{video_id, wav, video_path, labels}]}` plus
  the label CSV, with audio already extracted (`wav`) and frames at
  `{video_path}/frame_{i}/{video_id}.jpg`, i = 0..9. Nothing is decoded from video again;
  frames already 224x224 RGB JPEG are stored byte for byte. frame_times are nominal
  (i * clip length / 10): the layout does not record them.
  """

  name = "avmae_datafile"
  BUILDER_CONFIGS = [common.CLIP_CONFIGS[0]]

  def __init__(self, *, datafiles: dict[str, str] | None = None, label_csv: str | None = None,
               **kwargs):
    self._datafiles = datafiles or {}
    self._label_csv = label_csv
    self._labels = common.LabelMap(common.read_label_csv(label_csv)) if label_csv else None
    super().__init__(**kwargs)
    if self.builder_config.num_frames != schema.CAV_MAE_NUM_FRAMES:
      raise ValueError("The reference layout holds exactly 10 frames per clip.")

  def _class_names(self):
    if self._labels is None:
      raise ValueError("AvmaeDatafile needs label_csv= to prepare.")
    return self._labels.names

  def _split_items(self, dl_manager):
    del dl_manager
    if not self._datafiles:
      raise ValueError("AvmaeDatafile needs datafiles={split: json path} to prepare.")
    splits = {}
    for split, json_path in self._datafiles.items():
      with tf.io.gfile.GFile(json_path) as f:
        entries = json.load(f)["data"]
      base = os.path.dirname(json_path)
      items = []
      for i, e in enumerate(entries):
        vid = e["video_id"]
        error = ""
        try:
          labels = self._labels.parse(e.get("labels", ""))
        except KeyError as err:
          labels, error = (), f"{json_path} entry {vid}: {err.args[0]}"
        frame_dir = _resolve(e["video_path"], base)
        items.append(common.Item(
            key=f"{i:08d}_{vid}", clip_id=vid, path=_resolve(e["wav"], base), labels=labels,
            kind="reference", error=error,
            frame_paths=tuple(os.path.join(frame_dir, f"frame_{k}", f"{vid}.jpg")
                              for k in range(schema.CAV_MAE_NUM_FRAMES))))
      splits[split] = items
    return splits


def _media_index(root: str) -> dict[str, str]:
  return {_stem(p): p for p in common.find_media(root)}


def _candidate_stems(ytid: str, start: float) -> list[str]:
  s = int(round(start))
  return [f"{ytid}_{start:.3f}", f"{ytid}_{s:06d}", f"{ytid}_{s}", f"{ytid}_{s * 1000}",
          f"Y{ytid}_{start:.3f}", f"Y{ytid}", ytid]


def _segment_item(index: dict, key: str, ytid: str, start: float, labels, where: str):
  for stem in _candidate_stems(ytid, start):
    if stem in index:
      return common.Item(key=key, clip_id=stem, path=index[stem], labels=labels)
  return common.Item(key=key, clip_id=f"{ytid}_{start:.3f}", path=os.path.join(where, ytid),
                     labels=labels,
                     error=f"missing file: no video for {ytid} (start {start:g} s) in {where}")


class AvmaeAudioset(common.ClipBuilder):
  """AudioSet (527 classes) from videos you downloaded yourself."""

  name = "avmae_audioset"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual folder (`--manual_dir`):
    * the official segment lists from https://research.google.com/audioset/download.html:
      balanced_train_segments.csv, eval_segments.csv and, for AudioSet-2M,
      unbalanced_train_segments.csv (any of them may be left out);
    * class_labels_indices.csv (index,mid,display_name; the CAV-MAE repository ships it);
    * the 10 s video clips, anywhere below the folder, named `{YTID}_{start:.3f}.{ext}`
      (e.g. 00W1lcxW-WU_40.000.mp4), `{YTID}_{start:06d}.{ext}` or `{YTID}.{ext}`.
  Splits: balanced_train (AS-20K), unbalanced_train (with balanced_train: AS-2M), eval.
  Clips whose video is missing are listed in failures.jsonl.
  """
  _SEGMENT_FILES = {"balanced_train": "balanced_train_segments.csv",
                    "unbalanced_train": "unbalanced_train_segments.csv",
                    "eval": "eval_segments.csv"}

  def __init__(self, **kwargs):
    self._labels = None
    super().__init__(**kwargs)

  def _labels_from(self, manual_dir):
    if self._labels is None:
      path = os.path.join(manual_dir, "class_labels_indices.csv")
      if not tf.io.gfile.exists(path):
        raise ValueError(f"{path}: missing.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      self._labels = common.LabelMap(common.read_label_csv(path))
    return self._labels

  def _class_names(self):
    # 527 classes; the names are only known from the label file at preparation time.
    if self._labels is not None:
      return self._labels.names
    return [str(i) for i in range(527)]

  def _split_items(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    labels = self._labels_from(manual)
    if len(labels) != 527:
      raise ValueError(f"class_labels_indices.csv has {len(labels)} classes, expected 527.")
    index = _media_index(manual)
    splits = {}
    for split, fname in self._SEGMENT_FILES.items():
      path = os.path.join(manual, fname)
      if not tf.io.gfile.exists(path):
        continue
      items = []
      with tf.io.gfile.GFile(path) as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
      for i, row in enumerate(csv.reader(io.StringIO("".join(lines)), skipinitialspace=True)):
        ytid, start, labs = row[0], float(row[1]), row[3]
        try:
          parsed, error = labels.parse(labs), ""
        except KeyError as e:
          parsed, error = (), f"{fname} line {i}: {e.args[0]}"
        item = _segment_item(index, f"{i:08d}_{ytid}", ytid, start, parsed, manual)
        if error:
          item = common.Item(**{**item.__dict__, "error": error})
        items.append(item)
      splits[split] = items
    if not splits:
      raise ValueError(f"No segment list in {manual}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return splits


class AvmaeVggsound(common.ClipBuilder):
  """VGGSound (309 classes) from videos you downloaded yourself."""

  name = "avmae_vggsound"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put in the manual folder (`--manual_dir`):
    * vggsound.csv from https://www.robots.ox.ac.uk/~vgg/data/vggsound/ (rows
      `YTID,start_seconds,label,split`, split in train/test);
    * optionally class_labels_indices_vgg.csv (index,mid,display_name) to fix the class order;
      otherwise classes are the sorted distinct labels of vggsound.csv (the usual order);
    * the 10 s clips, anywhere below the folder, named `{YTID}_{start:06d}.{ext}`
      (e.g. KlsG1EnBEjc_000361.mp4), `{YTID}_{start:.3f}.{ext}` or `{YTID}.{ext}`.
  Splits: train, test. Clips whose video is missing are listed in failures.jsonl.
  """

  def __init__(self, **kwargs):
    self._labels = None
    super().__init__(**kwargs)

  def _class_names(self):
    if self._labels is not None:
      return self._labels.names
    return [str(i) for i in range(309)]

  def _split_items(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    path = os.path.join(manual, "vggsound.csv")
    if not tf.io.gfile.exists(path):
      raise ValueError(f"{path}: missing.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    with tf.io.gfile.GFile(path) as f:
      rows = [r for r in csv.reader(f) if len(r) >= 4]
    label_csv = os.path.join(manual, "class_labels_indices_vgg.csv")
    if tf.io.gfile.exists(label_csv):
      self._labels = common.LabelMap(common.read_label_csv(label_csv))
    else:
      names = sorted({r[2] for r in rows})
      self._labels = common.LabelMap([(n, n) for n in names])
    index = _media_index(manual)
    splits = {}
    for i, (ytid, start, label, split) in enumerate(r[:4] for r in rows):
      try:
        parsed, error = self._labels.parse(label, sep="\x00"), ""
      except KeyError as e:
        parsed, error = (), f"vggsound.csv row {i}: {e.args[0]}"
      item = _segment_item(index, f"{i:08d}_{ytid}", ytid, float(start), parsed, manual)
      if error:
        item = common.Item(**{**item.__dict__, "error": error})
      splits.setdefault(split.strip(), []).append(item)
    return splits
