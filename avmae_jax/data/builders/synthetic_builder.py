"""TFDS builder of the synthetic audio-visual dataset (scenes from `avmae_jax.data.synthetic`).

Size, seed, class count and frames per clip are config fields; `num_workers` > 1 renders in
local worker processes, `beam=True` in an Apache Beam pipeline. Examples follow schema.py like
every other builder.
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from avmae_jax.data import schema
from avmae_jax.data import synthetic
from avmae_jax.data.builders import common


@dataclasses.dataclass
class SyntheticConfig(common.ClipConfig):
  num_train: int = 512
  num_test: int = 128
  seed: int = 0
  num_classes: int = synthetic.MAX_CLASSES
  seconds: float = 10.0


def synthetic_config(num_train: int = 512, num_test: int = 128, seed: int = 0,
                     num_classes: int = synthetic.MAX_CLASSES,
                     num_frames: int = schema.CAV_MAE_NUM_FRAMES,
                     seconds: float = 10.0) -> SyntheticConfig:
  """A config whose name spells its settings (so different settings never share a folder)."""
  return SyntheticConfig(
      name=f"n{num_train}_{num_test}_c{num_classes}_s{seed}_f{num_frames}_t{seconds:g}",
      description="Custom synthetic scenes.", num_train=num_train, num_test=num_test,
      seed=seed, num_classes=num_classes, num_frames=num_frames, seconds=seconds)


def _keyed_example(job: tuple) -> tuple[str, dict]:
  # Module-level so that Beam workers can unpickle it; the key matches the local path's.
  index, example = synthetic.make_indexed_example(job)
  return f"{index:06d}", example


class AvmaeSynthetic(tfds.core.GeneratorBasedBuilder):
  """Synthetic scenes: each class is a shape/colour/motion with a matching, synchronised sound."""

  name = "avmae_synthetic"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Pitch follows object size; bigger objects; near-grey backgrounds."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="cavmae", description="512 + 128 clips, 8 classes, 10 frames."),
      SyntheticConfig(name="fps2", description="512 + 128 clips, 8 classes, 20 frames (2/s).",
                      num_frames=20),
  ]

  def __init__(self, *, beam: bool = False, num_workers: int = 1, progress: bool = True,
               **kwargs):
    self._beam = beam
    self._num_workers = max(1, int(num_workers))
    self._progress = progress
    super().__init__(**kwargs)

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=schema.tfds_features(cfg.num_classes, cfg.num_frames),
        metadata=tfds.core.MetadataDict(class_names=synthetic.class_names(cfg.num_classes)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test)}

  def _generate_examples(self, split, num):
    cfg = self.builder_config
    jobs = [(cfg.seed, split, i, cfg.num_classes, cfg.num_frames, cfg.seconds)
            for i in range(num)]
    if self._beam:
      beam = tfds.core.lazy_imports.apache_beam
      return (f"Create{split}" >> beam.Create(jobs)
              | f"Render{split}" >> beam.Map(_keyed_example))
    return self._generate_locally(jobs, split, num)

  def _generate_locally(self, jobs, split, num):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    workers = self._num_workers if num > 16 else 1
    results = common.parallel_map(synthetic.make_indexed_example, jobs, workers)
    for index, example in tqdm(results, total=num, desc=f"{self.name}/{split}", unit="clip",
                               disable=not self._progress):
      yield f"{index:06d}", example


def prepare_for_config(config) -> None:
  """Makes the synthetic dataset a run config's `synthetic` section asks for, if missing.

  Points every data section of `config` (data, eval_data where present) at the prepared
  builder directory. A no-op for configs without a `synthetic` section. Its optional
  `num_frames` is the frames stored per clip (10, CAV-MAE's; 20 = 2 frames/s for MAViL).
  The train, evaluate, inpaint and extract commands call it.
  """
  import jax  # pylint: disable=import-outside-toplevel
  settings = config.get("synthetic")
  if not settings:
    return
  builder = AvmaeSynthetic(
      config=synthetic_config(settings.num_train, settings.num_test, settings.seed,
                              settings.num_classes,
                              settings.get("num_frames", schema.CAV_MAE_NUM_FRAMES)),
      data_dir=os.path.expanduser(settings.data_dir), num_workers=settings.num_workers)
  if jax.process_index() == 0:
    builder.download_and_prepare()
  for section in ("data", "eval_data"):
    if section in config:
      config[section].name = ""
      config[section].builder_dir = builder.data_dir
