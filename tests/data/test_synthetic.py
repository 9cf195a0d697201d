"""Tests of the synthetic audio-visual dataset: schema, determinism, learnability, builder."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from avmae_jax import prepare
from avmae_jax.data import schema
from avmae_jax.data import synthetic


def _features(ex):
  frames = [np.asarray(Image.open(io.BytesIO(j)), np.float32) for j in ex["frames"]]
  colour = np.stack(frames).reshape(-1, 3)
  bright = colour[colour.max(axis=1) - colour.min(axis=1) > 60]  # saturated object pixels
  hue = bright.mean(axis=0) if len(bright) else np.zeros(3)
  return np.concatenate([ex["fbank"].astype(np.float32)[:998].mean(axis=0), hue / 10.0])


def test_examples_deterministic_and_distinct():
  a = synthetic.make_example(5, "train", 3)
  b = synthetic.make_example(5, "train", 3)
  c = synthetic.make_example(6, "train", 3)
  np.testing.assert_array_equal(a["fbank"], b["fbank"])
  assert a["frames"] == b["frames"]
  assert np.abs(a["fbank"].astype(np.float32) - c["fbank"].astype(np.float32)).max() > 0.1
  assert a["fbank"].shape == (schema.TARGET_FRAMES, schema.NUM_MEL_BINS)
  assert Image.open(io.BytesIO(a["frames"][0])).size == (schema.FRAME_SIZE, schema.FRAME_SIZE)
  assert a["labels"].tolist() == np.eye(8, dtype=np.uint8)[3].tolist()


def test_learnable_but_varied():
  train = [synthetic.make_example(0, "train", i, num_frames=4) for i in range(48)]
  test = [synthetic.make_example(0, "test", i, num_frames=4) for i in range(24)]
  xtr = np.stack([_features(e) for e in train])
  ytr = np.array([e["labels"].argmax() for e in train])
  centroids = np.stack([xtr[ytr == k].mean(axis=0) for k in range(8)])
  xte = np.stack([_features(e) for e in test])
  yte = np.array([e["labels"].argmax() for e in test])
  pred = np.argmin(((xte[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (pred == yte).mean() >= 0.5  # chance is 1/8
  # Within-class variation: two clips of one class are not the same clip.
  same = [e for e in train if e["labels"].argmax() == 0]
  assert np.abs(same[0]["fbank"].astype(np.float32) - same[1]["fbank"].astype(np.float32)).mean() > 0.5


def test_prepare_synthetic(tmp_path, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")
  assert prepare.main(["synthetic", "--data_dir", str(tmp_path), "--num_train", "12",
                       "--num_test", "4", "--num_classes", "4", "--frames", "fps2",
                       "--no_progress"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["examples"] == {"train": 12, "test": 4}
  builder = tfds.builder_from_directory(summary["dataset_dir"])
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test"))))
  assert ex["frames"].shape == (20, 224, 224, 3) and ex["labels"].shape == (4,)
  assert ex["fbank"].dtype == np.float16 and ex["frame_times"].shape == (20,)
  ref = synthetic.make_example(0, "test", int(ex["clip_id"].decode().split("_")[1]), 4, 20)
  np.testing.assert_array_equal(ex["fbank"], ref["fbank"])


@pytest.mark.slow
def test_prepare_synthetic_beam(tmp_path, monkeypatch, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("apache_beam")
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel

  # Beam must do the work: the in-process loop is not allowed to run.
  def no_local(*a, **k):
    raise AssertionError("the local loop ran instead of Beam")
  monkeypatch.setattr(builders.AvmaeSynthetic, "_generate_locally", no_local)
  assert prepare.main(["synthetic", "--data_dir", str(tmp_path), "--num_train", "3",
                       "--num_test", "2", "--num_classes", "4", "--no_progress", "--beam",
                       "--beam_options=--runner=DirectRunner"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["examples"] == {"train": 3, "test": 2}
  builder = tfds.builder_from_directory(summary["dataset_dir"])
  for split, num in summary["examples"].items():
    examples = {ex["clip_id"].decode(): ex
                for ex in tfds.as_numpy(builder.as_dataset(split=split))}
    assert len(examples) == num
    for cid, ex in examples.items():
      ref = synthetic.make_example(0, split, int(cid.split("_")[1]), 4, 10)
      assert cid == ref["clip_id"]
      np.testing.assert_array_equal(ex["fbank"], ref["fbank"])
      np.testing.assert_array_equal(ex["labels"], ref["labels"])
      np.testing.assert_array_equal(ex["frame_times"], ref["frame_times"])
      assert ex["frames"].shape == (10, 224, 224, 3)
