"""Your own videos end to end: a folder of generated clips, prepared, then the README's
"Your own videos" commands (pretrain, fine-tune, evaluate, export) on it; the configs'
`data=videos,data_dir=D` and its errors.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from avmae_jax import config_args
from avmae_jax.data import prepared
from avmae_jax.data import synthetic
from tests import _helpers

pytestmark = pytest.mark.slow  # prepares clips and runs commands in subprocesses

ROOT = _helpers.ROOT
CLASSES = ("dog", "rain")
CLIPS_PER_CLASS = 5
CONFIGS = ("cav_mae_pretrain.py", "cav_mae_finetune.py", "demo.py", "demo_finetune.py",
           "mavil_pretrain.py", "mavil_finetune.py")


def _write_clips(folder, seconds=3.0):
  for c, name in enumerate(CLASSES):
    os.makedirs(folder / name, exist_ok=True)
    for i in range(CLIPS_PER_CLASS):
      # Each class's scenes come from one synthetic class: its sound matches what is seen.
      scene = synthetic.draw_scene(3, "train", c * 100 + i, seconds=seconds)
      synthetic.write_video(folder / name / f"{name}_{i}.mp4", scene, width=160, height=120,
                            fps=10, audio_codec="aac")


@pytest.fixture(scope="module")
def own_videos(tmp_path_factory):
  """(clips folder, data_dir) after `prepare videos --folder` on 2 x 5 generated clips, with
  CAV-MAE's 10 frames and MAViL's 2 per second."""
  root = tmp_path_factory.mktemp("own")
  _write_clips(root / "clips")
  data_dir = root / "data"
  for frames in ("cavmae", "fps2"):
    out = subprocess.run([sys.executable, "-m", "avmae_jax.prepare", "videos", "--folder",
                          str(root / "clips"), "--data_dir", str(data_dir), "--frames", frames,
                          "--no_progress"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
  return root / "clips", data_dir


def test_configs_read_the_prepared_dataset(own_videos, capsys):
  _, data_dir = own_videos
  for name in CONFIGS:
    config = config_args.load_config(_helpers.config_path(f"{name}:data=videos,data_dir={data_dir}"))
    builder_dir = config.data.builder_dir
    frames = "fps2" if name.startswith("mavil") else "cavmae"
    assert builder_dir.endswith(os.path.join("avmae_videos", frames, "1.0.0")), name
    assert config.eval_data.builder_dir == builder_dir and not config.data.name
    # No test split in the folder: the last 10% of train are held out.
    assert (config.data.split, config.eval_data.split) == ("train[:90%]", "train[90%:]"), name
    assert "synthetic" not in config, name
    if "finetune" in name:
      assert config.model.num_classes == len(CLASSES), name
  assert "holding out the last 10%" in capsys.readouterr().err
  dataset = prepared.find(str(data_dir))
  assert dataset.class_names == CLASSES and dataset.splits == {"train": 10}
  assert (dataset.count("train[:90%]"), dataset.count("train[90%:]")) == (9, 1)


def test_missing_or_wrong_dataset_says_what_is_there_and_what_to_run(own_videos, tmp_path):
  clips, data_dir = own_videos
  cases = {
      tmp_path / "nothing": "the directory does not exist",
      clips: f"{len(CLASSES) * CLIPS_PER_CLASS} video file(s) but no prepared dataset",
  }
  for where, found in cases.items():
    with pytest.raises(prepared.PreparedDatasetError) as e:
      config_args.load_config(
          _helpers.config_path(f"cav_mae_pretrain.py:data=videos,data_dir={where}"))
    message = str(e.value)
    assert f"data_dir={where}" in message and found in message, message
    assert "python -m avmae_jax.prepare videos --folder CLIPS/" in message, message
  # A dataset directory prepared with 10 frames (CAV-MAE); MAViL trains on 2 per second.
  cavmae_only = data_dir / "avmae_videos" / "cavmae" / "1.0.0"
  with pytest.raises(prepared.PreparedDatasetError, match="--frames fps2"):
    config_args.load_config(
        _helpers.config_path(f"mavil_pretrain.py:data=videos,data_dir={cavmae_only}"))


def test_a_prepared_videos_dataset_loads_by_name(own_videos):
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import config as data_config  # pylint: disable=import-outside-toplevel
  _, data_dir = own_videos
  c = data_config.default_data_config("eval")
  c.name, c.data_dir, c.split, c.batch_size = "avmae_videos", str(data_dir), "train", 4
  with pipeline.create_iterator(c) as it:
    assert it.num_examples == len(CLASSES) * CLIPS_PER_CLASS
    batch = next(it)
  assert batch["audio"].shape == (4, 1024, 128) and batch["labels"].shape == (4, len(CLASSES))
  c.data_dir = str(data_dir.parent / "elsewhere")
  with pytest.raises(prepared.PreparedDatasetError, match="does not exist"):
    pipeline.create_iterator(c)


def _readme_commands() -> list[str]:
  """The shell commands of the README's "Your own videos" section, in order."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("## Your own videos", 1)[1].split("\n## ", 1)[0]
  block = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
  return [line for line in block.replace("\\\n", " ").splitlines()
          if line.strip() and not line.startswith("#")]


def test_readme_own_videos_commands_run_verbatim(own_videos, tmp_path):
  """Videos -> prepared dataset -> pretrained -> fine-tuned -> evaluated -> exported, by the
  README's commands (only the step counts and batch sizes are shortened by flags)."""
  os.symlink(own_videos[0], tmp_path / "clips")
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")  # as in the repository
  commands = _readme_commands()
  assert [c.split()[2] for c in commands] == [
      "avmae_jax.prepare", "avmae_jax.train", "avmae_jax.train", "avmae_jax.evaluate",
      "avmae_jax.embed", "avmae_jax.export"], commands
  # The demo tests' batch sizes, so that the pretraining programs come from the session's cache.
  short = ["--config.total_steps=2", "--config.batch_size=8", "--config.eval_data.batch_size=8",
           "--config.log_every=1"]
  outputs = []
  for command in commands:
    args = command.split()
    assert args[:2] == ["python", "-m"], command
    extra = short if args[2] == "avmae_jax.train" else []
    if "demo_finetune.py" in command and args[2] == "avmae_jax.train":
      extra = extra + ["--config.wa_start=0", "--config.wa_end=0"]  # 2 steps: no averaging
    out = subprocess.run([sys.executable, *args[1:], *extra],
                         cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{command}\n{out.stderr[-4000:]}"
    outputs.append(out.stdout + out.stderr)
  assert "holding out the last 10%" in outputs[1]
  evaluation = json.loads((tmp_path / "finetuned" / "eval_classify_multimodal.json").read_text())
  assert evaluation["num_clips"] == 1 and 0.0 <= evaluation["accuracy"] <= 1.0, evaluation
  index = json.loads((tmp_path / "embeddings" / "index.json").read_text())
  assert index["num_clips"] == len(CLASSES) * CLIPS_PER_CLASS and not index["failed"]
  assert (tmp_path / "finetuned.pth").stat().st_size > 1e6


def test_embed_gives_extract_features_windows_long_clips_and_skips_bad_files(
    own_videos, demo_pretrain_workdir, tmp_path):
  from avmae_jax import cli, embed, extract  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import audio  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import soundfile as sf  # pylint: disable=import-outside-toplevel
  clips, data_dir = own_videos
  config = config_args.load_config(_helpers.config_path(f"demo.py:data=videos,data_dir={data_dir}"))
  model, _ = cli.load_model(str(demo_pretrain_workdir))
  # The same clips through prepare + extract and through embed (the start of each clip).
  extracted = extract.run(config, str(demo_pretrain_workdir), str(tmp_path / "x"), split="train")
  embedded = embed.embed(model, config, [str(clips)], str(tmp_path / "e"), progress=False,
                         windows=False)
  assert embedded["num_clips"] == len(CLASSES) * CLIPS_PER_CLASS and not embedded["failed"]
  x = np.load(tmp_path / "x" / extracted["shards"][0]["file"])
  e = np.load(tmp_path / "e" / embedded["shards"][0]["file"])
  order = {c: i for i, c in enumerate(e["clip_id"])}
  assert extracted["num_clips"] == 10 and set(x["clip_id"]) == set(order)
  for name in ("audio", "video"):
    got = e[name][[order[c] for c in x["clip_id"]]]
    assert np.max(np.abs(got - x[name])) / np.max(np.abs(x[name])) <= 1e-5, name
  assert all(p.startswith(str(clips)) for p in e["path"])

  # Any length, audio-only, and bad files in one call.
  other = tmp_path / "other"
  other.mkdir()
  for name, seconds in (("short4s", 4.0), ("long20s", 20.0)):
    synthetic.write_video(other / f"{name}.mp4", synthetic.draw_scene(3, "train", 7,
                          seconds=seconds), width=160, height=120, fps=10, audio_codec="aac")
  wave = audio.load_audio(other / "short4s.mp4")
  sf.write(other / "speech.wav", wave, 16000)
  synthetic.write_video(other / "silent.mp4", synthetic.draw_scene(3, "train", 8, seconds=2.0),
                        width=160, height=120, fps=10, audio_codec=None)
  (other / "notes.mp4").write_text("not a video")
  index = embed.embed(model, config, [str(other)], str(tmp_path / "o"), progress=False)
  failed = {os.path.basename(f["path"]): f["reason"] for f in index["failed"]}
  assert set(failed) == {"silent.mp4", "notes.mp4"}, failed
  assert "no audio stream" in failed["silent.mp4"] and "notes.mp4" in failed["notes.mp4"]
  o = np.load(tmp_path / "o" / index["shards"][0]["file"])
  got = dict(zip(o["clip_id"], range(len(o["clip_id"]))))
  assert set(got) == {"long20s", "short4s", "speech"}
  # 256-frame windows (the demo's audio length): 20 s -> 8 windows, 4 s -> 2.
  assert o["windows"][got["long20s"]] == 8 and o["windows"][got["short4s"]] == 2
  assert not o["has_video"][got["speech"]] and np.isnan(o["video"][got["speech"]]).all()
  # The wav holds the mp4's audio (16-bit, 16 kHz): the same audio embedding.
  np.testing.assert_allclose(o["audio"][got["speech"]], o["audio"][got["short4s"]], atol=1e-5)
  # The long clip's audio embedding is the mean of its windows' embeddings.
  decoded = embed.decode(str(other / "long20s.mp4"), 10, 256)
  windows = decoded["windows"].astype(np.float32)
  norm = (windows - config.eval_data.norm_mean) / (config.eval_data.norm_std
                                                   * config.eval_data.norm_std_factor)
  frames = np.zeros((len(windows), 112, 112, 3), np.float32)
  want = model.features(norm, frames, pooled=True)["audio"].mean(0)
  np.testing.assert_allclose(o["audio"][got["long20s"]], want, rtol=1e-4, atol=1e-5)

  # The API gives the command's arrays, with the model's own defaults (no config: the
  # demo's normalisation is the family default, its audio length and frame size the model's).
  api_out = model.embed([str(other)])
  assert [os.path.basename(f["path"]) for f in api_out["failed"]] == [
      os.path.basename(f["path"]) for f in index["failed"]]
  assert list(api_out["clip_id"]) == list(o["clip_id"])
  np.testing.assert_allclose(api_out["audio"], o["audio"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.isnan(api_out["video"]), np.isnan(o["video"]))
  np.testing.assert_allclose(api_out["video"], o["video"], rtol=1e-6, atol=1e-6)
  # A waveform, without a file or TensorFlow: the wav's embedding.
  np.testing.assert_allclose(model.embed_waveform(wave, 16000), o["audio"][got["speech"]],
                             atol=1e-5)
  with pytest.raises(ValueError, match="must be mono"):
    model.embed_waveform(np.stack([wave, wave], 1), 16000)

