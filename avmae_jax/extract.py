r"""Feature extraction: forward_feat representations of a dataset split, in .npz shards.

  python -m avmae_jax.extract --checkpoint DIR_OR_PTH --config configs/demo.py --out DIR \
      [--pooled | --tokens] [--shard_size 1024] [--split train] [--dtype float16]

Reads the config's eval_data section (one ordered pass, frame 5 (MAViL: the centred clip
of num_frames frames), no augmentation; --split picks another split of the same dataset)
and writes, per shard of up to --shard_size clips:
  DIR/features-NNNNN.npz  (features-hHHH-NNNNN.npz per host on several hosts)
    audio    [n, D] (--pooled, the default: mean over tokens, the retrieval vector)
             or [n, La, D] (--tokens: the whole forward_feat sequence; MAViL: each
             modality's ViT outputs, patch tokens without cls)
    video    [n, D] or [n, Lv, D]
    clip_id  [n] str
    labels   [n, C] float32 multi-hot
and DIR/index.json (index-hHHH.json per host): model, split, shapes and the shards with
their clip counts. Clips keep the dataset's order; the padding of the last batch (mask 0)
is dropped, so every clip appears exactly once. The arrays load with plain `np.load`
(no pickles).
"""

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from avmae_jax import api
from avmae_jax import cli
from avmae_jax.evaluators import common as eval_common

DTYPES = ("float32", "float16")


class ExtractError(Exception):
  """A request that cannot be served (bad shard size, no data)."""


def _as_str(ids) -> np.ndarray:
  return np.array([i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i)
                   for i in ids], dtype=str)


class ShardWriter:
  """Buffers clips and writes a shard each time `shard_size` of them are there."""

  def __init__(self, out: str, shard_size: int, host: Optional[int]):
    self.out, self.shard_size, self.host = out, shard_size, host
    self.buffer: dict[str, list[np.ndarray]] = {}
    self.buffered = 0
    self.shards: list[dict[str, Any]] = []

  def add(self, arrays: Mapping[str, np.ndarray]) -> None:
    for key, value in arrays.items():
      self.buffer.setdefault(key, []).append(value)
    self.buffered += len(next(iter(arrays.values())))
    while self.buffered >= self.shard_size:
      self._write(self.shard_size)

  def _write(self, n: int) -> None:
    joined = {k: np.concatenate(v) for k, v in self.buffer.items()}
    prefix = "features" if self.host is None else f"features-h{self.host:03d}"
    name = f"{prefix}-{len(self.shards):05d}.npz"
    np.savez(os.path.join(self.out, name), **{k: v[:n] for k, v in joined.items()})
    self.shards.append({"file": name, "num_clips": int(n)})
    self.buffer = {k: [v[n:]] for k, v in joined.items()}
    self.buffered -= n

  def close(self) -> None:
    if self.buffered:
      self._write(self.buffered)


def index_meta(where: str, checkpoint_path: str, step: Optional[int],
               eval_data: ml_collections.ConfigDict, **more) -> dict[str, Any]:
  """What an index.json records of its model and inputs, so that `retrieve` can embed new
  queries the same way and find the clips' pictures: the description, the checkpoint's
  absolute path and step, and the input section used (eval_data)."""
  return {"model": where, "checkpoint": os.path.abspath(os.path.expanduser(checkpoint_path)),
          "step": step, "eval_data": eval_data.to_dict(), **more}


def read_index(directory: str) -> dict[str, Any]:
  """The shards of an `extract` or `embed` output directory, concatenated in order.

  Returns {"meta": the index.json (of host 0 where several hosts wrote), "audio", "video",
  "clip_id" and whatever else the shards hold (labels, path, windows, has_video)}. Raises
  ExtractError naming the directory when it holds no index.
  """
  names = sorted(f for f in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if re.fullmatch(r"index(-h\d{3})?\.json", f))
  if not names:
    raise ExtractError(f"{directory}: no index.json (not an extract or embed output "
                       "directory)")
  metas, parts = [], []
  for name in names:
    with open(os.path.join(directory, name)) as f:
      metas.append(json.load(f))
    for shard in metas[-1]["shards"]:
      path = os.path.join(directory, shard["file"])
      if not os.path.isfile(path):
        raise ExtractError(f"{directory}: shard {shard['file']} listed in {name} is missing")
      with np.load(path) as z:
        parts.append({k: z[k] for k in z.files})
  if not parts:
    raise ExtractError(f"{directory}: the index lists no shards")
  keys = set(parts[0])
  out = {k: np.concatenate([p[k] for p in parts]) for k in keys if all(k in p for p in parts)}
  out["meta"] = metas[0]
  return out


def extract(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]], out: str,
            pooled: bool = True, shard_size: int = 1024, dtype: str = "float32",
            host: Optional[int] = None, section: str = "eval_data",
            meta: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """Writes the shards of `batches` into `out`; returns the index (also written), which
  holds `meta` (e.g. the model and split) besides the shards."""
  if not isinstance(shard_size, int) or shard_size < 1:
    raise ExtractError(f"--shard_size must be a positive number of clips, got {shard_size!r}")
  if dtype not in DTYPES:
    raise ExtractError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
  os.makedirs(out, exist_ok=True)
  writer = ShardWriter(out, shard_size, host)
  shapes = {}
  for index, batch in enumerate(batches):
    if index == 0:
      eval_common.check_batch(model.module, batch, section)
    if np.ndim(batch["frames"]) != eval_common.frames_ndim(model.module):
      raise ExtractError(f"features use one frame per clip; got frames of shape "
                         f"{np.shape(batch['frames'])} (set config.{section}."
                         "eval_all_frames=False)")
    keep = eval_common.valid_rows(batch)
    feats = model.features(batch["audio"], batch["frames"], pooled=pooled)
    arrays = {"audio": feats["audio"][keep].astype(dtype),
              "video": feats["video"][keep].astype(dtype)}
    n = int(keep.sum())
    ids = batch.get("clip_id")
    arrays["clip_id"] = (_as_str(np.asarray(ids)[keep]) if ids is not None
                         else np.array([""] * n, dtype=str))
    if "labels" in batch:
      arrays["labels"] = np.asarray(batch["labels"], np.float32)[keep]
    if not shapes:
      shapes = {k: list(v.shape[1:]) for k, v in arrays.items()}
    elif set(arrays) != set(shapes):
      raise ExtractError(f"batch {index} has entries {sorted(arrays)}, the first "
                         f"{sorted(shapes)}")
    if n:
      writer.add(arrays)
  writer.close()
  if not writer.shards:
    raise ExtractError("the data held no clips")
  index = {**(meta or {}), "pooled": bool(pooled), "dtype": dtype, "shapes": shapes,
           "num_clips": sum(s["num_clips"] for s in writer.shards), "shards": writer.shards}
  name = "index.json" if host is None else f"index-h{host:03d}.json"
  with open(os.path.join(out, name), "w") as f:
    json.dump(index, f, indent=2)
  return index


def run(config: ml_collections.ConfigDict, checkpoint_path: str, out: str,
        pooled: bool = True, shard_size: int = 1024, split: str = "",
        dtype: str = "float32", step: Optional[int] = None) -> dict[str, Any]:
  """The command: model and data from flags, then `extract`."""
  if not isinstance(shard_size, int) or shard_size < 1:  # before loading anything
    raise ExtractError(f"--shard_size must be a positive number of clips, got {shard_size!r}")
  model, where = cli.load_model(checkpoint_path, step)
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_data.eval_all_frames = False
  if split:
    config.eval_data.split = split
  iterator = cli.input_iterator(config, "eval_data")
  host = jax.process_index() if jax.process_count() > 1 else None
  index = extract(model, iterator, out, pooled, shard_size, dtype, host,
                  meta=index_meta(where, checkpoint_path, step, config.eval_data,
                                  split=config.eval_data.split))
  if index["num_clips"] != iterator.num_examples:  # every clip of this host's shard once
    raise ExtractError(f"wrote {index['num_clips']} clips, the split holds "
                       f"{iterator.num_examples} on this host")
  return index


def _define_flags() -> None:
  cli.define_model_flags("configs/FILE.py[:args]; clips come from its eval_data section.",
                         "Model directory, training workdir or reference .pth.")
  flags.DEFINE_string("out", None, "Directory for the .npz shards and index.json.")
  flags.DEFINE_bool("pooled", None, "Mean-pooled [D] vectors per clip (the default).")
  flags.DEFINE_bool("tokens", None, "Whole token sequences [L, D] per clip instead.")
  flags.DEFINE_integer("shard_size", 1024, "Clips per .npz shard.")
  flags.DEFINE_string("split", "", "Dataset split (default config.eval_data.split).")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Stored feature dtype.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv):
  with cli.command(argv, ExtractError, eval_common.EvaluationError) as f:
    if f.pooled and f.tokens:
      raise app.UsageError("--pooled and --tokens exclude each other")
    pooled = not (f.tokens or f.pooled is False)
    index = run(f.config, f.checkpoint, f.out, pooled, f.shard_size, f.split, f.dtype,
                f.step)
  print(f"{index['num_clips']} clips of split {index['split']!r} by {index['model']}: "
        f"{len(index['shards'])} shard(s) in {f.out}; audio {index['shapes']['audio']}, "
        f"video {index['shapes']['video']} ({'pooled' if pooled else 'tokens'})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
