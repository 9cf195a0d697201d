"""End-to-end tests of `python -m avmae_jax.prepare`: real and generated clips in several
containers, codecs and rates, bad items, resuming, the CAV-MAE datafile route, frame positions.
"""

import csv
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avmae_jax import prepare
from avmae_jax.data import audio
from avmae_jax.data import clip
from avmae_jax.data import schema
from avmae_jax.data import synthetic
from avmae_jax.data import video
from tests import _helpers

tfds = pytest.importorskip("tensorflow_datasets")

SAMPLES = _helpers.SAMPLES
SMALL = dict(width=160, height=120, fps=10)
GOOD = {  # name -> (write_video kwargs, seconds)
    "h264_aac.mp4": (dict(audio_codec="aac", sample_rate=44100, channels=2), 10.0),
    "x264_opus48k.mkv": (dict(audio_codec="libopus", sample_rate=48000, channels=2), 10.0),
    "vp8_opus.webm": (dict(video_codec="libvpx", audio_codec="libopus", sample_rate=48000,
                           video_options={"deadline": "realtime", "cpu-used": "8"}), 10.0),
    "mono8k.mp4": (dict(audio_codec="aac", sample_rate=8000, channels=1), 10.0),
    "short3s.mp4": (dict(audio_codec="aac"), 3.0),
    "long30s.mkv": (dict(audio_codec="mp3", sample_rate=44100), 30.0),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  root = tmp_path_factory.mktemp("clips")
  paths = {}
  for i, (name, (kwargs, seconds)) in enumerate(GOOD.items()):
    scene = synthetic.draw_scene(7, "train", i, seconds=seconds)
    synthetic.write_video(root / name, scene, **{**SMALL, **kwargs})
    paths[name] = root / name
  synthetic.write_video(root / "no_audio.mp4", synthetic.draw_scene(7, "train", 9, seconds=2.0),
                        audio_codec=None, **SMALL)
  corrupt = root / "corrupt.mp4"
  corrupt.write_bytes((root / "h264_aac.mp4").read_bytes()[:3000])  # truncated: no moov atom
  return root, paths


def _read_all(dataset_dir):
  builder = tfds.builder_from_directory(dataset_dir)
  out = {}
  for split in builder.info.splits:
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      out[ex["clip_id"].decode()] = ex
  return builder, out


def _manifest(root, paths):
  rows = [(str(p), "dog,cat" if i % 2 else "cat", "train" if i < 5 else "test")
          for i, p in enumerate(paths.values())]
  rows += [(str(p), "dog", "train") for p in sorted(SAMPLES.glob("*.mp4"))]
  rows += [(str(root / "no_audio.mp4"), "cat", "train"), (str(root / "corrupt.mp4"), "cat", "test"),
           (str(root / "missing.mp4"), "dog", "train")]
  manifest = root / "manifest.csv"
  with open(manifest, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "labels", "split"])
    w.writerows(rows)
  return manifest


def test_prepare_videos_good_bad_and_resume(clips, tmp_path, monkeypatch, capsys):
  root, paths = clips
  manifest = _manifest(root, paths)
  args = ["videos", "--manifest", str(manifest), "--data_dir", str(tmp_path), "--no_progress"]
  assert prepare.main(args) == 1  # some items failed
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  builder, examples = _read_all(summary["dataset_dir"])
  expected = {Path(p).stem for p in paths.values()} | {p.stem for p in SAMPLES.glob("*.mp4")}
  assert set(examples) == expected
  names = builder.info.metadata["class_names"]
  assert names == ["cat", "dog"]
  for cid, ex in examples.items():
    assert ex["fbank"].shape == (schema.TARGET_FRAMES, schema.NUM_MEL_BINS), cid
    assert ex["fbank"].dtype == np.float16 and np.all(np.isfinite(ex["fbank"]))
    assert ex["frames"].shape == (10, schema.FRAME_SIZE, schema.FRAME_SIZE, 3), cid
    assert ex["frame_times"].shape == (10,) and np.all(np.diff(ex["frame_times"]) >= 0)
    assert ex["labels"].shape == (2,) and ex["labels"].dtype == np.uint8
  np.testing.assert_array_equal(examples["h264_aac"]["labels"], [1, 0])  # cat
  np.testing.assert_array_equal(examples["x264_opus48k"]["labels"], [1, 1])  # dog,cat
  if (SAMPLES / "KlsG1EnBEjc_000361.mp4").exists():  # the official clips, where ../shared is
    np.testing.assert_array_equal(examples["KlsG1EnBEjc_000361"]["labels"], [0, 1])  # dog
  # A 3 s clip: ~298 fbank frames (AAC adds a little), zero padding after; frames within 3 s.
  short = examples["short3s"]
  n = 1 + (len(audio.load_audio(paths["short3s.mp4"])) - 400) // 160
  assert 296 <= n <= 310
  assert np.all(short["fbank"][n:] == 0) and np.all(np.any(short["fbank"][:n] != 0, axis=1))
  assert short["frame_times"][-1] < 3.0
  assert examples["long30s"]["frame_times"][-1] < 10.0
  failures = {Path(f["path"]).name: f["reason"] for f in builder_failures(summary)}
  assert set(failures) == {"no_audio.mp4", "corrupt.mp4", "missing.mp4"}
  assert "no audio stream" in failures["no_audio.mp4"]
  assert "missing" in failures["missing.mp4"]
  assert "corrupt.mp4" in failures["corrupt.mp4"]

  # Re-running resumes from the per-clip cache: nothing good is decoded again.
  def no_decoding(*a, **k):
    raise AssertionError(f"decoded again: {a}")
  monkeypatch.setattr(clip, "extract_clip", no_decoding)
  assert prepare.main(args + ["--regenerate"]) == 1
  summary2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _, again = _read_all(summary2["dataset_dir"])
  assert set(again) == expected
  for cid in expected:
    np.testing.assert_array_equal(again[cid]["fbank"], examples[cid]["fbank"])
  assert len(builder_failures(summary2)) == 3
  assert prepare.main(args + ["--allow_failures"]) == 0


def builder_failures(summary):
  with open(Path(summary["dataset_dir"]) / "failures.jsonl") as f:
    return [json.loads(line) for line in f]


def test_datafile_matches_videos(clips, tmp_path, capsys):
  root, paths = clips
  chosen = {k: paths[k] for k in ("h264_aac.mp4", "x264_opus48k.mkv")}
  labels_csv = tmp_path / "labels.csv"
  labels_csv.write_text('index,mid,display_name\n0,/m/a,"Cat"\n1,/m/b,"Dog, barking"\n')
  # The reference layout, made the way the reference does (16-bit 16 kHz first-channel wav,
  # frames at the reference positions): {video_path}/frame_{i}/{video_id}.jpg.
  entries = []
  frame_root = tmp_path / "frames"
  for name, p in chosen.items():
    vid = p.stem
    wav = tmp_path / f"{vid}.wav"
    sf.write(wav, audio.load_audio(p), 16000, subtype="PCM_16")
    jpegs, _ = video.extract_frames(p)
    for i, data in enumerate(jpegs):
      (frame_root / f"frame_{i}").mkdir(parents=True, exist_ok=True)
      (frame_root / f"frame_{i}" / f"{vid}.jpg").write_bytes(data)
    entries.append({"video_id": vid, "wav": str(wav), "video_path": str(frame_root),
                    "labels": "/m/a,/m/b"})
  datafile = tmp_path / "train.json"
  datafile.write_text(json.dumps({"data": entries}))
  assert prepare.main(["datafile", "--json", f"train={datafile}", "--label_csv",
                       str(labels_csv), "--data_dir", str(tmp_path / "a"), "--no_progress"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _, from_json = _read_all(summary["dataset_dir"])
  manifest = tmp_path / "m.csv"
  manifest.write_text("path,labels\n" + "".join(f'{p},"/m/a,/m/b"\n' for p in chosen.values()))
  assert prepare.main(["videos", "--manifest", str(manifest), "--label_csv", str(labels_csv),
                       "--data_dir", str(tmp_path / "b"), "--no_progress"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _, from_videos = _read_all(summary["dataset_dir"])
  assert set(from_json) == set(from_videos) == {p.stem for p in chosen.values()}
  for cid, ex in from_json.items():
    ref = from_videos[cid]
    assert np.abs(ex["fbank"].astype(np.float32) - ref["fbank"].astype(np.float32)).max() <= 1e-3
    np.testing.assert_array_equal(ex["frames"], ref["frames"])
    np.testing.assert_array_equal(ex["labels"], [1, 1])
    np.testing.assert_allclose(ex["frame_times"], ref["frame_times"], atol=0.2)


def test_beam_matches_local(clips, tmp_path, monkeypatch, capsys):
  pytest.importorskip("apache_beam")
  from avmae_jax.data.builders import common  # pylint: disable=import-outside-toplevel
  root, paths = clips
  chosen = [paths["h264_aac.mp4"], paths["short3s.mp4"], root / "corrupt.mp4"]
  manifest = tmp_path / "m.csv"
  manifest.write_text("path,labels\n" + "".join(f"{p},{i % 2}\n" for i, p in enumerate(chosen)))

  def run(name, *extra):
    args = ["videos", "--manifest", str(manifest), "--data_dir", str(tmp_path / name),
            "--no_progress", *extra]
    status = prepare.main(args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, examples = _read_all(summary["dataset_dir"])
    return status, examples, builder_failures(summary)

  local_status, local, local_failures = run("local")
  # Beam must do the work: the in-process loop is not allowed to run.
  def no_local(*a, **k):
    raise AssertionError("the local loop ran instead of Beam")
  monkeypatch.setattr(common.ClipBuilder, "_generate_locally", no_local)
  beam_args = ("--beam", "--beam_options=--runner=DirectRunner")
  beam_status, beamed, beam_failures = run("beam", *beam_args)
  assert local_status == beam_status == 1
  assert set(beamed) == set(local) == {"h264_aac", "short3s"}
  for cid, ex in beamed.items():
    for name in ("fbank", "frames", "frame_times", "labels", "path"):
      np.testing.assert_array_equal(ex[name], local[cid][name], err_msg=f"{cid} {name}")
  for failures in (local_failures, beam_failures):
    assert [Path(f["path"]).name for f in failures] == ["corrupt.mp4"]
  assert beam_failures[0]["reason"] == local_failures[0]["reason"]

  # A Beam re-run resumes from the per-clip cache: the good clips are not decoded again.
  def no_decoding(*a, **k):
    raise AssertionError(f"decoded again: {a}")
  monkeypatch.setattr(clip, "extract_clip", no_decoding)
  status, again, failures = run("beam", *beam_args, "--regenerate")
  assert status == 1 and [Path(f["path"]).name for f in failures] == ["corrupt.mp4"]
  assert set(again) == set(local)
  for cid, ex in again.items():
    np.testing.assert_array_equal(ex["fbank"], local[cid]["fbank"])


def test_frame_positions_follow_reference_formula(tmp_path):
  # Frame k of a 6 fps, 10 s video has grey level 4k, so a stored frame tells its index.
  path = tmp_path / "ramp.mp4"
  with av.open(str(path), "w") as out:
    vs = out.add_stream("libx264", rate=6, options={"qp": "0", "preset": "ultrafast"})
    vs.width, vs.height, vs.pix_fmt = 96, 64, "yuv420p"
    for k in range(60):
      img = np.full((64, 96, 3), 4 * k, np.uint8)
      for packet in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in vs.encode(None):
      out.mux(packet)
  for n in (10, 20):
    jpegs, times = video.extract_frames(path, num_frames=n)
    got = [round(np.asarray(Image.open(io.BytesIO(j))).mean() / 4) for j in jpegs]
    total = min(60, int(6 * 10))
    expected = [max(int(i * total / n) - 1, 0) for i in range(n)]
    assert got == expected
    np.testing.assert_allclose(times, np.array(expected) / 6.0, atol=1e-3)
    assert Image.open(io.BytesIO(jpegs[0])).size == (224, 224)


def test_official_samples_extract():
  samples = sorted(SAMPLES.glob("*.mp4"))
  if not samples:
    pytest.skip(f"no official samples under {SAMPLES}")
  for p in samples:
    ex = clip.extract_clip(p, num_frames=20)
    assert ex["fbank"].shape == (1024, 128)
    assert len(ex["frames"]) == 20 and ex["frame_times"].shape == (20,)
    assert 8.5 < ex["frame_times"][-1] < 10.0
    # The 10 s sample fills ~998 frames of the 1024, the rest is zero padding.
    assert np.all(ex["fbank"][1001:] == 0) and np.all(ex["fbank"][:990, 3] == np.float16(audio.LOG_EPS))
