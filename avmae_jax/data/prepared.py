"""Datasets that `python -m avmae_jax.prepare` wrote: finding one under a data dir and reading
its splits and classes from the JSON files TFDS writes beside it.

TensorFlow-free, so that configs can call it (`configs/*.py:data=videos,data_dir=D`): the
config then points the pipeline at the dataset's directory (`builder_dir`), takes its class
count from the prepared labels and its evaluation split from the manifest's splits, or holds
out a fixed share of the training split when the manifest has none.

Layout found: `D/<name>/<config>/<version>/dataset_info.json` (TFDS), with `metadata.json`
holding the class names and `features.json` the label vector's size. `D` may also be that
version directory itself.
"""

import dataclasses
import json
import os
from typing import Optional

from avmae_jax.data import schema

# The frames setting each model family trains on (`prepare --frames`): CAV-MAE's 10 frames at
# the reference positions, MAViL's 2 frames per second.
FRAMES_FOR_MODE = {"cav_mae": "cavmae", "mavil": "fps2"}
# Splits taken as held out, in this order of preference.
EVAL_SPLITS = ("test", "eval", "validation")
# Without a held-out split in the manifest, the last HELD_OUT_PERCENT % of the training split
# (in prepared order, which is the manifest's or the folder's sorted order) is held out.
HELD_OUT_PERCENT = 10


class PreparedDatasetError(ValueError):
  """No usable prepared dataset where the config says."""


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  builder_dir: str
  name: str
  config: str
  version: str
  splits: dict  # split name -> number of examples
  class_names: tuple
  num_classes: int

  def count(self, split: str) -> int:
    """Examples of `split`: a split name or a percent slice of one ("train[:90%]")."""
    name, _, rest = split.partition("[")
    n = self.splits[name]
    if not rest:
      return n
    start, _, stop = rest.rstrip("]").partition(":")
    # TFDS rounds percent boundaries to the closest example.
    def at(bound, default):
      return default if not bound else round(n * int(bound.rstrip("%")) / 100)
    return at(stop, n) - at(start, 0)

  def train_and_eval_splits(self) -> tuple[str, str, str]:
    """(training split, held-out split, a sentence saying where they came from)."""
    if "train" not in self.splits:
      raise PreparedDatasetError(
          f"{self.builder_dir}: the prepared dataset has no 'train' split (it has "
          f"{sorted(self.splits)}); give manifest rows split=train")
    held_out = next((s for s in EVAL_SPLITS if self.splits.get(s)), None)
    if held_out:
      return "train", held_out, (f"training on split train ({self.splits['train']} clips), "
                                 f"evaluating on split {held_out} ({self.splits[held_out]} "
                                 "clips) of the prepared dataset")
    n = self.splits["train"]
    if n < 2:
      raise PreparedDatasetError(
          f"{self.builder_dir}: {n} training clip(s) and no test split: nothing to hold out")
    keep = 100 - HELD_OUT_PERCENT
    return (f"train[:{keep}%]", f"train[{keep}%:]",
            f"no test/eval split in the manifest: holding out the last {HELD_OUT_PERCENT}% of "
            f"split train (train[{keep}%:], of {n} clips) for evaluation, training on the rest")


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read(builder_dir: str) -> PreparedDataset:
  """The prepared dataset in `builder_dir` (a `<name>/<config>/<version>` directory)."""
  info = _read_json(os.path.join(builder_dir, "dataset_info.json"))
  splits = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}
  metadata_path = os.path.join(builder_dir, "metadata.json")
  metadata = _read_json(metadata_path) if os.path.exists(metadata_path) else {}
  features = _read_json(os.path.join(builder_dir, "features.json"))
  labels = features["featuresDict"]["features"]["labels"]["tensor"]["shape"]["dimensions"]
  return PreparedDataset(
      builder_dir=builder_dir, name=info["name"], config=info.get("configName", ""),
      version=info["version"], splits=splits,
      class_names=tuple(metadata.get("class_names", ())), num_classes=int(labels[-1]))


def _version_key(path: str):
  return tuple(int(p) if p.isdigit() else 0 for p in os.path.basename(path).split("."))


def _prepared_dirs(root: str) -> list[str]:
  """Every `<name>/<config>/<version>` directory with a dataset_info.json under root."""
  out = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for config in sorted(os.listdir(os.path.join(root, name))) if os.path.isdir(
        os.path.join(root, name)) else []:
      config_dir = os.path.join(root, name, config)
      if not os.path.isdir(config_dir):
        continue
      for version in sorted(os.listdir(config_dir)):
        if os.path.isfile(os.path.join(config_dir, version, "dataset_info.json")):
          out.append(os.path.join(config_dir, version))
  return out


def _candidates(root: str, name: str, config_ok, preferred: str) -> list[str]:
  """Prepared directories of dataset `name` under root whose config passes `config_ok`:
  config `preferred` first (cavmae before cavmae_downmix), then the newest version."""
  found = [p for p in _prepared_dirs(root) if os.path.relpath(p, root).split(os.sep)[0] == name
           and config_ok(os.path.basename(os.path.dirname(p)))]
  return sorted(found, key=lambda p: (os.path.basename(os.path.dirname(p)) != preferred,
                                      tuple(-v for v in _version_key(p))))


def _what_is_there(root: str) -> str:
  if not os.path.exists(root):
    return "the directory does not exist"
  if not os.path.isdir(root):
    return "it is a file, not a directory"
  prepared = [os.path.relpath(p, root) for p in _prepared_dirs(root)]
  if prepared:
    return "prepared datasets " + ", ".join(prepared)
  unfinished = [os.path.relpath(dirpath, root)
                for dirpath, dirs, _ in os.walk(root) if schema.PREPARE_DIR in dirs]
  if unfinished:
    return ("an unfinished preparation (per-clip cache under "
            + ", ".join(os.path.join(u, schema.PREPARE_DIR) for u in unfinished)
            + "; run the prepare command again to finish it)")
  videos = sum(1 for _, _, files in os.walk(root) for f in files
               if f.lower().endswith(schema.VIDEO_EXTENSIONS))
  if videos:
    return f"{videos} video file(s) but no prepared dataset"
  return "no prepared dataset and no video files"


def find(data_dir: str, name: str = "avmae_videos", frames: str = "cavmae",
         field: str = "data_dir") -> PreparedDataset:
  """The newest version of dataset `name` prepared with `--frames frames` under data_dir.

  Raises PreparedDatasetError naming `field`, saying what data_dir holds and the command
  that prepares the dataset.
  """
  root = os.path.expanduser(data_dir)
  if os.path.isfile(os.path.join(root, "dataset_info.json")):
    found = read(root)
    if found.config.split("_")[0] != frames:
      raise PreparedDatasetError(
          f"{field}={data_dir}: prepared with --frames {found.config}, this model trains on "
          f"--frames {frames} (prepare the clips again with --frames {frames})")
    return found
  matching = _candidates(root, name, lambda config: config.split("_")[0] == frames, frames)
  if matching:
    return read(matching[0])
  fps = " --frames fps2" if frames == "fps2" else ""
  raise PreparedDatasetError(
      f"{field}={data_dir}: no {name} dataset prepared with --frames {frames} there "
      f"(found: {_what_is_there(root)}). Prepare your clips first:\n"
      f"  python -m avmae_jax.prepare videos --folder CLIPS/ --data_dir {data_dir}{fps}\n"
      f"  (or --manifest clips.csv with columns path[,labels,clip_id,split])")


def find_builder_dir(data_dir: str, name: str) -> Optional[str]:
  """`name` ("avmae_videos" or "avmae_audioset/fps2") prepared under data_dir, or None."""
  root = os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))
  base, _, config = name.partition("/")
  # Without a config in the name, TFDS's default config (the first: cavmae) as tfds.builder.
  candidates = _candidates(root, base, lambda c: not config or c == config, "cavmae")
  return candidates[0] if candidates else None
