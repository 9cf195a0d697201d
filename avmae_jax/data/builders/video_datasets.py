"""TFDS builders over real clips: a manifest or folder of videos, CAV-MAE datafiles, AudioSet,
VGGSound. All produce schema.py examples through `common.ClipBuilder` (per-item cache,
failure records, optional Apache Beam).
"""

import csv
import json
import os

from absl import logging
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
  # find_media is sorted, so with two files of one stem the choice is at least stable.
  index = {}
  for p in common.find_media(root):
    index.setdefault(_stem(p), p)
  return index


def _candidate_stems(ytid: str, start: float) -> list[str]:
  """File stems accepted for the segment of `ytid` starting at `start` seconds, in order.

  Integer forms only for whole-second starts: rounding 12.5 would pick another segment's file.
  The bare-YTID forms come last and are only used when the YTID names one segment (see
  `_segment_items`).
  """
  stems = [f"{ytid}_{start:.3f}"]
  if float(start).is_integer():
    s = int(start)
    stems += [f"{ytid}_{s:06d}", f"{ytid}_{s}", f"{ytid}_{s * 1000}"]
  stems += [f"Y{ytid}_{start:.3f}"]
  return stems


def _segment_items(rows, index: dict, where: str, clip_id_format: str) -> list[common.Item]:
  """Items of segments [(key, ytid, start, labels, error)] found in the media index.

  A file named by its YTID alone (`{YTID}.ext`, `Y{YTID}.ext`) is accepted only when that YTID
  has one segment in `rows`: with several (VGGSound cuts many clips from one video) it cannot
  tell which segment it is, and guessing would silently give clips the wrong labels.
  """
  counts = {}
  for _, ytid, _, _, _ in rows:
    counts[ytid] = counts.get(ytid, 0) + 1
  items = []
  for key, ytid, start, labels, error in rows:
    clip_id = clip_id_format.format(ytid=ytid, start=start)
    stems = _candidate_stems(ytid, start)
    bare = [s for s in (f"Y{ytid}", ytid) if s in index]
    path = next((index[s] for s in stems if s in index), None)
    if path is None and bare and counts[ytid] == 1:
      path = index[bare[0]]
    if path is None:
      path = os.path.join(where, clip_id)
      if not error and bare:
        error = (f"ambiguous file: {index[bare[0]]} is named by the YTID alone but {ytid} has "
                 f"{counts[ytid]} segments; name it {stems[0]}.<ext>")
      elif not error:
        error = (f"missing file: no video for {ytid} (start {start:g} s) in {where}; "
                 f"expected e.g. {stems[0]}.mp4")
    items.append(common.Item(key=key, clip_id=clip_id, path=path, labels=labels, error=error))
  return items


def _require_manual_dir(builder, dl_manager) -> str:
  # The constructor's folder wins; TFDS's own property raises with the instructions if unset.
  manual = builder.manual_folder or os.fspath(dl_manager.manual_dir)
  if not tf.io.gfile.isdir(manual):
    raise ValueError(f"{builder.name}: manual folder {manual!r} not found.\n"
                     f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return manual


def _drop_unavailable_splits(builder, splits: dict[str, list[common.Item]]):
  """Removes the splits none of whose clips can be read (e.g. not downloaded), recording why.

  TFDS refuses to write a split without examples, and users often fetch only some splits.
  """
  for split in [s for s, items in splits.items() if all(item.error for item in items)]:
    for item in splits.pop(split):
      # The same record a failing clip gets during generation.
      common.process_item(
          item, config=builder.builder_config,
          num_classes=len(builder._class_names()),  # pylint: disable=protected-access
          cache_dir=os.path.join(builder.prepare_dir, "cache"),
          failures_dir=os.path.join(builder.prepare_dir, "failures"), split=split)
    logging.warning("%s: no clip of split %s is available; leaving the split out.",
                    builder.name, split)
  if not splits:
    raise ValueError(f"{builder.name}: no listed clip is available; reasons are in "
                     f"{os.path.join(builder.prepare_dir, 'failures')}.\n"
                     f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return splits


class AvmaeAudioset(common.ClipBuilder):
  """AudioSet (527 classes) from videos you downloaded yourself.

  Args (besides ClipBuilder's):
    manual_dir: the manual folder (see MANUAL_DOWNLOAD_INSTRUCTIONS); defaults to the
      download config's manual_dir.
  """

  name = "avmae_audioset"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  The manual folder (`--manual_dir`) holds, at its top level:
    * the official segment lists, unchanged, from
      https://research.google.com/audioset/download.html: balanced_train_segments.csv,
      unbalanced_train_segments.csv, eval_segments.csv. Each present list becomes one split
      (balanced_train: AS-20K; unbalanced_train, with balanced_train: AS-2M; eval); leave out
      the ones you do not want. Format: three `#` comment lines, then rows
      `YTID, start_seconds, end_seconds, "mid,mid,..."`;
    * class_labels_indices.csv (`index,mid,display_name`, 527 rows; the CAV-MAE repository
      ships it as egs/audioset/data/class_labels_indices.csv);
  and, anywhere below it (any sub-folders), one video per segment (audio and video tracks;
  any container ffmpeg reads: .mp4, .mkv, .webm, ...), named after the segment:
    * `{YTID}_{start:.3f}.{ext}`, e.g. `--PJHxphWEs_30.000.mp4` (preferred), or
    * for whole-second starts, `{YTID}_{start:06d}`, `{YTID}_{start}` or
      `{YTID}_{start * 1000}` (milliseconds), e.g. `--PJHxphWEs_000030.mp4`, or
    * `Y{YTID}_{start:.3f}.{ext}`, or `Y{YTID}.{ext}` / `{YTID}.{ext}` (only when that YTID
      has a single segment in the lists).
  The file should hold just the 10 s segment (decoding starts at the file's beginning).
  Each example's clip_id is `{YTID}_{start:.3f}`. Segments without a video, with an
  unreadable one, or with unknown labels are skipped and listed in failures.jsonl.
  """
  _SEGMENT_FILES = {"balanced_train": "balanced_train_segments.csv",
                    "unbalanced_train": "unbalanced_train_segments.csv",
                    "eval": "eval_segments.csv"}
  NUM_CLASSES = 527

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    self.manual_folder = os.fspath(manual_dir) if manual_dir else None
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
    # The names are only known from the label file; their number is fixed.
    if self._labels is None and self.manual_folder:
      self._labels_from(self.manual_folder)
    if self._labels is not None:
      return self._labels.names
    return [str(i) for i in range(self.NUM_CLASSES)]

  def _read_segments(self, path: str, fname: str):
    """Rows (key, ytid, start, labels, error) of one official segments file."""
    out = []
    with tf.io.gfile.GFile(path) as f:
      lines = f.read().splitlines()
    labels = self._labels
    for lineno, line in enumerate(lines, 1):
      if not line.strip() or line.startswith("#"):
        continue
      # The official rows have a space after each comma and a quoted label list.
      row = next(csv.reader([line], skipinitialspace=True))
      try:
        if len(row) != 4:
          raise ValueError(f"{len(row)} fields")
        ytid, start = row[0].strip(), float(row[1])
      except ValueError as e:
        raise ValueError(f"{path} line {lineno}: expected `YTID, start_seconds, end_seconds, "
                         f"\"labels\"`, got {line!r} ({e})") from e
      try:
        parsed, error = labels.parse(row[3]), ""
      except KeyError as e:
        parsed, error = (), f"{fname} line {lineno} ({ytid}): {e.args[0]}"
      out.append((f"{len(out):08d}_{ytid}", ytid, start, parsed, error))
    return out

  def _split_items(self, dl_manager):
    manual = _require_manual_dir(self, dl_manager)
    labels = self._labels_from(manual)
    if len(labels) != self.NUM_CLASSES:
      raise ValueError(f"class_labels_indices.csv has {len(labels)} classes, expected "
                       f"{self.NUM_CLASSES}.")
    rows = {}
    for split, fname in self._SEGMENT_FILES.items():
      path = os.path.join(manual, fname)
      if tf.io.gfile.exists(path):
        rows[split] = self._read_segments(path, fname)
    if not rows:
      raise ValueError(f"No segment list in {manual}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    index = _media_index(manual)
    # A YTID named alone is ambiguous across lists too, so count segments over all of them.
    items = _segment_items([r for split_rows in rows.values() for r in split_rows], index,
                           manual, "{ytid}_{start:.3f}")
    splits, k = {}, 0
    for split, split_rows in rows.items():
      splits[split] = items[k:k + len(split_rows)]
      k += len(split_rows)
    return _drop_unavailable_splits(self, splits)


class AvmaeVggsound(common.ClipBuilder):
  """VGGSound (309 classes) from videos you downloaded yourself.

  Args (besides ClipBuilder's):
    manual_dir: the manual folder (see MANUAL_DOWNLOAD_INSTRUCTIONS). Needed at construction
      when the class list is not the full 309 classes, since the label shape is fixed then;
      defaults to the download config's manual_dir.
  """

  name = "avmae_vggsound"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  The manual folder (`--manual_dir`) holds, at its top level:
    * vggsound.csv, unchanged, from https://www.robots.ox.ac.uk/~vgg/data/vggsound/: no
      header, rows `YTID,start_seconds,label,split` with start_seconds an integer and split
      `train` or `test` (e.g. `---g-f_I2yQ,1,people marching,test`; labels holding a comma
      are quoted). The splits are the distinct split values (train, test);
    * optionally class_labels_indices_vgg.csv (`index,mid,display_name`, display_name being
      the label text) to fix the class order; otherwise the classes are the sorted distinct
      labels of vggsound.csv (309 for the full list; the usual order);
  and, anywhere below it (any sub-folders), one video per row (audio and video tracks; any
  container ffmpeg reads: .mp4, .mkv, .webm, ...), named after the segment:
    * `{YTID}_{start:06d}.{ext}`, e.g. `---g-f_I2yQ_000001.mp4` (preferred), or
    * `{YTID}_{start}`, `{YTID}_{start * 1000}` (milliseconds) or `{YTID}_{start:.3f}`, or
    * `Y{YTID}_{start:.3f}.{ext}`, or `Y{YTID}.{ext}` / `{YTID}.{ext}` (only when that YTID
      has a single row: many videos have several).
  The file should hold just the 10 s segment (decoding starts at the file's beginning).
  Each example's clip_id is `{YTID}_{start:06d}`. Rows without a video, with an unreadable
  one, or with an unknown label are skipped and listed in failures.jsonl.
  """
  NUM_CLASSES = 309

  def __init__(self, *, manual_dir: str | None = None, **kwargs):
    self.manual_folder = os.fspath(manual_dir) if manual_dir else None
    self._rows = None
    self._labels = None
    super().__init__(**kwargs)

  def _load(self, manual: str):
    if self._rows is not None:
      return
    path = os.path.join(manual, "vggsound.csv")
    if not tf.io.gfile.exists(path):
      raise ValueError(f"{path}: missing.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    rows = []
    with tf.io.gfile.GFile(path) as f:
      for lineno, r in enumerate(csv.reader(f), 1):
        if not r or not "".join(r).strip():
          continue
        try:
          ytid, start, label, split = (x.strip() for x in r)
          start = int(start)
        except ValueError as e:
          raise ValueError(f"{path} line {lineno}: expected `YTID,start_seconds,label,split` "
                           f"with an integer start, got {r!r} ({e})") from e
        rows.append((ytid, start, label, split, lineno))
    label_csv = os.path.join(manual, "class_labels_indices_vgg.csv")
    if tf.io.gfile.exists(label_csv):
      self._labels = common.LabelMap(common.read_label_csv(label_csv))
    else:
      names = sorted({r[2] for r in rows})
      if len(names) != self.NUM_CLASSES:
        logging.warning("%s has %d distinct labels, not %d: class indices will not match "
                        "the standard VGGSound order.", path, len(names), self.NUM_CLASSES)
      self._labels = common.LabelMap([(n, n) for n in names])
    self._rows = rows

  def _class_names(self):
    if self._labels is None and self.manual_folder:
      self._load(self.manual_folder)
    if self._labels is not None:
      return self._labels.names
    return [str(i) for i in range(self.NUM_CLASSES)]

  def _split_items(self, dl_manager):
    manual = _require_manual_dir(self, dl_manager)
    self._load(manual)
    # The label feature's shape was fixed when the dataset info was made.
    if len(self._labels) != self.info.features[schema.LABELS].shape[0]:
      raise ValueError(f"{manual} defines {len(self._labels)} classes, not "
                       f"{self.NUM_CLASSES}: construct the builder with manual_dir= so the "
                       "label shape follows it.")
    segments = []
    for ytid, start, label, _, lineno in self._rows:
      try:
        parsed, error = self._labels.parse(label, sep="\x00"), ""
      except KeyError as e:
        parsed, error = (), f"vggsound.csv line {lineno} ({ytid}): {e.args[0]}"
      segments.append((f"{len(segments):08d}_{ytid}", ytid, start, parsed, error))
    items = _segment_items(segments, _media_index(manual), manual, "{ytid}_{start:06d}")
    splits = {}
    for (_, _, _, split, _), item in zip(self._rows, items):
      splits.setdefault(split, []).append(item)
    return _drop_unavailable_splits(self, splits)
