"""End-to-end tests of the AudioSet and VGGSound builders on tiny manual folders.

The segment and label lists are written in the official formats (AudioSet: `#` comment lines,
spaces after the commas, quoted label lists; VGGSound: no header, `YTID,start,label,split`),
the clips are short synthetic videos named the ways the builders' instructions accept, and
each list also names one clip whose video is missing and one whose file is corrupt.
"""

import csv
import json
import os
from pathlib import Path
import re

import numpy as np
import pytest

from avmae_jax import prepare
from avmae_jax.data import builders
from avmae_jax.data import schema
from avmae_jax.data import synthetic
from avmae_jax.data.builders import video_datasets
from tests import _helpers

tfds = pytest.importorskip("tensorflow_datasets")

SAMPLES = _helpers.SAMPLES
AS_LABELS = SAMPLES / "class_labels_indices_as.csv"
# Short, small clips keep the whole file well under a minute on two shared cores.
SMALL = dict(width=96, height=72, fps=8, sample_rate=16000, channels=1)
SECONDS = 2.0

# AudioSet: split -> segments file rows (ytid, start, end, quoted label list) and the file name
# each clip gets (None: no video; "corrupt": a truncated file). Ids start with "-" as many real
# ones do; the start times exercise the ".3f" formatting (12.5 must not round to 12 or 13).
AS_SEGMENTS = {
    "balanced_train": [
        ("--PJHxphWEs", 30.0, 40.0, "/m/09x0r,/t/dd00088", "{ytid}_{start:.3f}.mp4"),
        ("-0RWZT-miFs", 420.0, 430.0, "/m/03qc9zr", None),
        ("-1nilez17Dg", 30.0, 40.0, "/m/04rlf,/m/0l14md,/m/0bm02", "Y{ytid}.mp4"),
    ],
    "unbalanced_train": [
        ("--aE2O5G5WE", 0.0, 10.0, "/m/03fwl,/m/04rlf,/m/09x0r", "sub/dir/{ytid}_{start:.3f}.mkv"),
        ("--cB2ZVjpnA", 30.0, 40.0, "/m/01y3hg", "corrupt"),
    ],
    "eval": [
        ("--4gqARaEJE", 0.0, 10.0, "/m/068hy,/m/07q6cd_,/m/0bt9lr,/m/0jbk", "{ytid}.mp4"),
        ("--BfvyPmVMo", 12.5, 22.5, "/m/03l9g", "{ytid}_{start:.3f}.mp4"),
        ("--ZhevVpy1s", 50.0, 60.0, "/m/09x0r,/m/notamid", "{ytid}_{start:.3f}.mp4"),
    ],
}
# clip_id -> (split, words its failure reason must hold).
AS_FAILURES = {
    "-0RWZT-miFs_420.000": ("balanced_train", ("missing", "-0RWZT-miFs")),
    "--cB2ZVjpnA_30.000": ("unbalanced_train", ("--cB2ZVjpnA_30.000.mp4",)),
    "--ZhevVpy1s_50.000": ("eval", ("unknown label", "/m/notamid")),
}
AS_FILES = {"balanced_train": "balanced_train_segments.csv",
            "unbalanced_train": "unbalanced_train_segments.csv",
            "eval": "eval_segments.csv"}

# VGGSound: (ytid, start, label, split, file name) as in vggsound.csv. Videos appear several
# times with different start times, as in the real list; a file named by the YTID alone cannot
# tell such segments apart.
VGG_ROWS = [
    ("---g-f_I2yQ", 1, "people marching", "test", "{ytid}_{start:06d}.mp4"),
    ("--0PQM4-hqg", 30, "waterfall burbling", "train", "{ytid}_{start:06d}.mp4"),
    ("--0PQM4-hqg", 200, "male speech, man speaking", "train", "{ytid}_{start:06d}.mp4"),
    ("--56QUhyDQM", 185, "playing tennis", "train", None),
    ("--5OkAjCI7g", 40, "people marching", "test", "corrupt"),
    ("--8puiAGLhs", 30, "car engine starting", "test", "clips/{ytid}_{start:06d}.mp4"),
    ("--9O4XZOge4", 0, "playing tennis", "train", "{ytid}.mp4"),
    ("--9O4XZOge4", 10, "playing tennis", "train", "{ytid}.mp4"),
    ("--AfvRLkGrY", 20, "waterfall burbling", "test", "Y{ytid}.mkv"),
]
VGG_FAILURES = {
    "--56QUhyDQM_000185": ("train", ("missing", "--56QUhyDQM")),
    "--5OkAjCI7g_000040": ("test", ("--5OkAjCI7g_000040.mp4",)),
    "--9O4XZOge4_000000": ("train", ("ambiguous", "--9O4XZOge4.mp4")),
    "--9O4XZOge4_000010": ("train", ("ambiguous", "--9O4XZOge4.mp4")),
}


def _check_failures(dataset_dir, expected):
  failures = {f["clip_id"]: f for f in _read_failures(dataset_dir)}
  assert set(failures) == set(expected)
  for clip_id, (split, words) in expected.items():
    assert failures[clip_id]["split"] == split, failures[clip_id]
    for word in words:
      assert word in failures[clip_id]["reason"], failures[clip_id]
    # Known causes are reported plainly; a traceback would mean an unexpected exception.
    assert "traceback" not in failures[clip_id], failures[clip_id]


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
  """Bytes of a few distinct short clips, plus a corrupt one (truncated: no moov atom)."""
  root = tmp_path_factory.mktemp("src")
  out = []
  for i in range(4):
    path = root / f"c{i}.mp4"
    synthetic.write_video(path, synthetic.draw_scene(3, "train", i, seconds=SECONDS), **SMALL)
    out.append(path.read_bytes())
  return out, out[0][:2000]


def _place(manual, name, data):
  path = manual / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _run(dataset, manual, data_dir, capsys, *extra):
  status = prepare.main([dataset, "--manual_dir", str(manual), "--data_dir", str(data_dir),
                         "--no_progress", *extra])
  captured = capsys.readouterr()
  return status, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _read_splits(dataset_dir):
  builder = tfds.builder_from_directory(dataset_dir)
  out = {}
  for split in builder.info.splits:
    out[split] = {ex["clip_id"].decode(): ex
                  for ex in tfds.as_numpy(builder.as_dataset(split=split))}
  return builder, out


def _check_shapes(ex, num_classes):
  assert ex["labels"].shape == (num_classes,) and ex["labels"].dtype == np.uint8
  assert ex["fbank"].shape == (schema.TARGET_FRAMES, schema.NUM_MEL_BINS)
  assert ex["fbank"].dtype == np.float16 and np.all(np.isfinite(ex["fbank"]))
  assert ex["frames"].shape == (schema.CAV_MAE_NUM_FRAMES, schema.FRAME_SIZE,
                                schema.FRAME_SIZE, 3)
  assert ex["frame_times"].shape == (schema.CAV_MAE_NUM_FRAMES,)
  # A 2 s clip: its audio fills ~200 of the 1024 fbank frames, the rest is zero padding.
  assert np.any(ex["fbank"][:150] != 0) and np.all(ex["fbank"][300:] == 0)
  assert ex["frame_times"][-1] < SECONDS


def _read_failures(dataset_dir):
  with open(Path(dataset_dir) / "failures.jsonl") as f:
    return [json.loads(line) for line in f]


def _write_audioset(manual, clip_bytes):
  clips, corrupt = clip_bytes
  manual.mkdir()
  # The real label file, linked rather than copied (tests must not duplicate it).
  os.symlink(AS_LABELS, manual / "class_labels_indices.csv")
  k = 0
  for split, rows in AS_SEGMENTS.items():
    ytids = {r[0] for r in rows}
    lines = [
        "# Segments csv created Sun Mar  5 10:54:31 2017\n",
        f"# num_ytids={len(ytids)}, num_segs={len(rows)}, num_unique_labels=527, "
        f"num_positive_labels={sum(len(r[3].split(',')) for r in rows)}\n",
        "# YTID, start_seconds, end_seconds, positive_labels\n",
    ]
    for ytid, start, end, labels, name in rows:
      lines.append(f'{ytid}, {start:.3f}, {end:.3f}, "{labels}"\n')
      if name == "corrupt":
        _place(manual, f"{ytid}_{start:.3f}.mp4", corrupt)
      elif name:
        _place(manual, name.format(ytid=ytid, start=start), clips[k % len(clips)])
        k += 1
    (manual / AS_FILES[split]).write_text("".join(lines))


def _parse_segments(path):
  """{ytid: [label mids]} from an official segments file, parsed without the csv module."""
  out = {}
  for line in Path(path).read_text().splitlines():
    if line.startswith("#"):
      continue
    m = re.fullmatch(r'([\w-]+), (\d+\.\d{3}), (\d+\.\d{3}), "([^"]*)"', line)
    assert m, line
    out[m.group(1)] = m.group(4).split(",")
  return out


def test_audioset(clip_bytes, tmp_path, capsys):
  if not AS_LABELS.exists():
    pytest.skip(f"no AudioSet label file at {AS_LABELS}")
  manual = tmp_path / "manual"
  _write_audioset(manual, clip_bytes)
  status, summary, err = _run("audioset", manual, tmp_path / "out", capsys)
  assert status == 1, err
  builder, splits = _read_splits(summary["dataset_dir"])
  assert set(splits) == set(AS_FILES)

  with open(AS_LABELS, newline="") as f:
    mid_index = {r["mid"]: int(r["index"]) for r in csv.DictReader(f)}
  assert len(mid_index) == 527
  with open(AS_LABELS, newline="") as f:
    names = [r["display_name"] for r in sorted(csv.DictReader(f), key=lambda r: int(r["index"]))]
  assert builder.info.metadata["class_names"] == names
  for split, fname in AS_FILES.items():
    segments = _parse_segments(manual / fname)
    good = {r[0]: r for r in AS_SEGMENTS[split] if f"{r[0]}_{r[1]:.3f}" not in AS_FAILURES}
    # The clip id is the segment's `{YTID}_{start:.3f}`, whatever the file is called.
    assert set(splits[split]) == {f"{y}_{r[1]:.3f}" for y, r in good.items()}, split
    for ytid, row in good.items():
      ex = splits[split][f"{ytid}_{row[1]:.3f}"]
      _check_shapes(ex, 527)
      expected = np.zeros(527, np.uint8)
      expected[[mid_index[m] for m in segments[ytid]]] = 1
      assert len(segments[ytid]) >= 1 and ex["labels"].sum() == len(segments[ytid])
      np.testing.assert_array_equal(ex["labels"], expected)
      assert ex["path"].decode() == str(manual / row[4].format(ytid=ytid, start=row[1]))
  assert summary["examples"] == {s: len(v) for s, v in splits.items()}

  _check_failures(summary["dataset_dir"], AS_FAILURES)
  assert "FAILED [balanced_train]" in err and f"{len(AS_FAILURES)} clip(s) skipped" in err

  status, summary2, _ = _run("audioset", manual, tmp_path / "out", capsys, "--allow_failures")
  assert status == 0 and summary2["failed"] == len(AS_FAILURES)


def _write_vggsound(manual, clip_bytes):
  clips, corrupt = clip_bytes
  manual.mkdir()
  with open(manual / "vggsound.csv", "w", newline="") as f:
    # The official file quotes only the labels that hold a comma.
    w = csv.writer(f, lineterminator="\n")
    for k, (ytid, start, label, split, name) in enumerate(VGG_ROWS):
      w.writerow([ytid, start, label, split])
      if name == "corrupt":
        _place(manual, f"{ytid}_{start:06d}.mp4", corrupt)
      elif name:
        _place(manual, name.format(ytid=ytid, start=start), clips[k % len(clips)])


def test_vggsound(clip_bytes, tmp_path, capsys):
  manual = tmp_path / "manual"
  _write_vggsound(manual, clip_bytes)
  assert '"male speech, man speaking"' in (manual / "vggsound.csv").read_text()
  status, summary, err = _run("vggsound", manual, tmp_path / "out", capsys)
  assert status == 1, err
  builder, splits = _read_splits(summary["dataset_dir"])
  assert set(splits) == {"train", "test"}

  with open(manual / "vggsound.csv", newline="") as f:
    rows = list(csv.reader(f))
  classes = sorted({r[2] for r in rows})
  assert builder.info.metadata["class_names"] == classes
  for split in ("train", "test"):
    good = [r for r in VGG_ROWS if r[3] == split and f"{r[0]}_{r[1]:06d}" not in VGG_FAILURES]
    assert set(splits[split]) == {f"{r[0]}_{r[1]:06d}" for r in good}, split
    for ytid, start, label, _, name in good:
      ex = splits[split][f"{ytid}_{start:06d}"]
      _check_shapes(ex, len(classes))
      expected = np.zeros(len(classes), np.uint8)
      expected[classes.index(label)] = 1
      np.testing.assert_array_equal(ex["labels"], expected)
      assert ex["path"].decode() == str(manual / name.format(ytid=ytid, start=start))
  # The two segments of one video are distinct examples with their own labels.
  train = splits["train"]
  assert not np.array_equal(train["--0PQM4-hqg_000030"]["labels"],
                            train["--0PQM4-hqg_000200"]["labels"])

  _check_failures(summary["dataset_dir"], VGG_FAILURES)

  status, summary2, _ = _run("vggsound", manual, tmp_path / "out", capsys, "--allow_failures")
  assert status == 0 and summary2["failed"] == len(VGG_FAILURES)


def test_fractional_start_is_not_rounded():
  # 12.5 s rounded to 12 or 13 would pick the file of another segment of the same video.
  stems = video_datasets._candidate_stems("abc", 12.5)  # pylint: disable=protected-access
  assert stems[0] == "abc_12.500"
  assert not {"abc_12", "abc_13", "abc_000012", "abc_000013", "abc_12000"} & set(stems)
  assert "abc_000012" in video_datasets._candidate_stems("abc", 12.0)  # pylint: disable=protected-access


def test_vggsound_subset_needs_manual_dir_at_construction(clip_bytes, tmp_path):
  # With fewer than 309 labels the label shape is only right if the builder saw the list
  # before making its dataset info; otherwise it must say so instead of failing to encode.
  # No clip of the test split was fetched: that split is left out (TFDS cannot write an empty
  # one) and its rows are still reported.
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "vggsound.csv").write_text("---g-f_I2yQ,1,people marching,train\n"
                                       "--0PQM4-hqg,30,waterfall burbling,test\n")
  _place(manual, "---g-f_I2yQ_000001.mp4", clip_bytes[0][0])
  config = tfds.download.DownloadConfig(manual_dir=str(manual))
  builder = builders.AvmaeVggsound(data_dir=str(tmp_path / "a"), progress=False)
  with pytest.raises(ValueError, match="construct the builder with manual_dir"):
    builder.download_and_prepare(download_config=config)
  builder = builders.AvmaeVggsound(data_dir=str(tmp_path / "b"), manual_dir=str(manual),
                                   progress=False)
  assert builder.info.features["labels"].shape == (2,)
  builder.download_and_prepare(download_config=config)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1}
  assert [(f["split"], f["clip_id"]) for f in builder.failures()] == [
      ("test", "--0PQM4-hqg_000030")]
