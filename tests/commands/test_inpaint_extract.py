"""Inpainting (reconstructions against the PyTorch port, the rendered panels) and feature
extraction (values against the port, shards, padding), plus one run of each command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avmae_jax import cli  # pylint: disable=g-import-not-at-top
from avmae_jax import extract
from avmae_jax import inpaint
from avmae_jax import models
from avmae_jax import torch_port
from tests import _helpers

ROOT = _helpers.ROOT
T, IMG, P = 256, 64, 16  # tiny inputs: audio grid 8 x 16 patches, frames 4 x 4


def _save(ref, path):
  torch.save(ref.state_dict(), path)
  return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(**models.size_fields("tiny"), audio_length=T, img_size=IMG,
                          norm_pix_loss=False).eval()
  path = _save(ref, str(tmp_path_factory.mktemp("pth") / "pretrained.pth"))
  model, _ = cli.load_model(path)
  # a .pth does not record norm_pix_loss; this one was made without it
  model.module = model.module.clone(norm_pix_loss=False)
  return model, ref


def _inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, T, 128)).astype(np.float32),
          rng.standard_normal((n, IMG, IMG, 3)).astype(np.float32))


def test_reconstruction_matches_the_pytorch_port(pretrained):
  model, ref = pretrained
  audio, frames = _inputs(2)
  rng = np.random.default_rng(1)
  noise_a = rng.random((2, 8 * 16)).astype(np.float32)
  noise_v = rng.random((2, 16)).astype(np.float32)
  got = inpaint.reconstruct(model, audio, frames, 0.75, noise_a=noise_a, noise_v=noise_v)

  # the reference: the port's forward with the same noise, its own patchify/unpatchify,
  # removed patches from the decoder, visible ones from the input
  a_img = torch.from_numpy(audio).unsqueeze(1).transpose(2, 3)  # [B, 1, F, T]
  v_img = torch.from_numpy(frames.transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = ref(torch.from_numpy(audio), v_img, 0.75, 0.75, noise_a=torch.from_numpy(noise_a),
              noise_v=torch.from_numpy(noise_v))
  for name, img, c, grid, pred, mask in (
      ("audio", a_img, 1, (8, 16), out["pred_a"], out["mask_a"]),
      ("frames", v_img, 3, (4, 4), out["pred_v"], out["mask_v"])):
    target = torch_port.patchify(img, c, *grid, P)
    recon = torch_port.unpatchify(torch.where(mask[..., None] > 0.5, pred, target), c,
                                  *grid, P).numpy()
    recon = recon[:, 0] if name == "audio" else recon.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got[f"{name}_recon"], recon, rtol=1e-4, atol=1e-4,
                               err_msg=name)
    np.testing.assert_array_equal(got["mask_a" if name == "audio" else "mask_v"],
                                  mask.numpy())
  # 3/4 of the patches removed; the visible ones are the input, bit for bit
  assert got["mask_a"].mean() == 0.75 and got["mask_v"].mean() == 0.75
  np.testing.assert_array_equal(got["audio"], audio.transpose(0, 2, 1))
  pixels = np.kron(got["mask_v"][0].reshape(4, 4), np.ones((P, P))) > 0.5
  np.testing.assert_array_equal(got["frames_recon"][0][~pixels], frames[0][~pixels])
  assert not np.allclose(got["frames_recon"][0][pixels], frames[0][pixels])
  assert np.all(got["frames_masked"][0][pixels] == 0)


def test_pictures_hold_the_three_panels(pretrained, tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import transforms  # pylint: disable=import-outside-toplevel
  model, _ = pretrained
  audio, frames = _inputs(3, seed=2)
  batch = {"audio": audio, "frames": frames, "mask": np.array([1, 0, 1], np.float32),
           "clip_id": np.array([b"yt/abc def", b"padding", b"second"], object)}
  records = inpaint.write_pictures(model, [batch], str(tmp_path), num=5, seed=3)
  assert [r["frame"] for r in records] == ["clip000_yt_abc_def_frame.png",
                                           "clip001_second_frame.png"]  # padding skipped
  with open(tmp_path / "inpaint.json") as f:
    assert len(json.load(f)["clips"]) == 2

  gap, label = inpaint.GAP, inpaint.LABEL_HEIGHT
  picture = np.asarray(Image.open(tmp_path / records[0]["frame"]).convert("RGB"))
  assert picture.shape == (label + IMG, 3 * IMG + 2 * gap, 3)
  panels = [picture[label:, i * (IMG + gap):i * (IMG + gap) + IMG] for i in range(3)]
  # panel 1: the input frame with the ImageNet normalisation undone
  mean, std = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
  want = (np.clip(frames[0] * std + mean, 0, 1) * 255 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(panels[0], want)
  # panel 2: exactly 3/4 of the 16x16 patches painted the mask colour, the rest the input
  painted = np.all(panels[1] == inpaint.FRAME_MASK_COLOUR, axis=-1)
  per_patch = painted.reshape(4, P, 4, P).mean(axis=(1, 3))
  assert set(np.unique(per_patch)) <= {0.0, 1.0} and per_patch.mean() == 0.75
  np.testing.assert_array_equal(panels[1][~painted], want[~painted])
  # panel 3: visible patches from the input, removed ones predicted (differ from it)
  np.testing.assert_array_equal(panels[2][~painted], want[~painted])
  assert np.abs(panels[2][painted].astype(int) - want[painted]).mean() > 5

  # the spectrogram: a figure with axes (its orientation is the next test's)
  spec = np.asarray(Image.open(tmp_path / records[0]["spectrogram"]).convert("RGB"))
  assert spec.shape == (600, 600, 3)  # 6 x 6 in at 100 dpi for 2.56 s
  blue = np.all(spec == inpaint.SPECTROGRAM_MASK_COLOUR, axis=-1)
  assert 0.1 < blue.mean() < 0.3  # 3/4 of one of three panels


def test_spectrogram_picture_has_time_across_and_low_frequencies_at_the_bottom():
  from avmae_jax import plots  # pylint: disable=import-outside-toplevel
  num_bins, num_frames = 128, 256
  # [F, T] as `reconstruct` gives it: energy only in the lowest 32 bins (1/4) of the first
  # 128 frames (1/2): a transposed drawing puts it elsewhere
  original = np.full((num_bins, num_frames), -1.0, np.float32)
  original[:32, :128] = 1.0
  # removed: the patches of the lowest 16 bins over the first 4 x 16 frames
  mask = np.zeros((8, 16), np.float32)
  mask[0, :4] = 1.0
  fig = inpaint.render_spectrogram(original, np.where(np.kron(mask, np.ones((P, P))) > 0.5, 0,
                                                      original), original, mask.ravel(),
                                   (8, 16), P, 0.75)
  axes = fig.axes
  assert [ax.get_title() for ax in axes] == ["original", "masked 75%", "reconstruction"]
  np.testing.assert_allclose(axes[0].get_xlim(), (0.0, 2.56))  # seconds, 10 ms frames
  assert axes[2].get_xlabel() == "time (s)" and axes[0].get_ylabel() == "mel bin"

  def inside(image, rows, cols, margin=3):
    """image's pixels in the fractions `rows` (from the top) x `cols`, `margin` px inside."""
    h, w = image.shape[:2]
    return image[int(rows[0] * h) + margin:int(rows[1] * h) - margin,
                 int(cols[0] * w) + margin:int(cols[1] * w) - margin]

  bright = plots.axes_pixels(fig, axes[0]).mean(-1) > 128  # top row of the image first
  # white in the bottom quarter of the rows and the left half of the columns, else black
  assert inside(bright, (3 / 4, 1), (0, 1 / 2)).all()
  assert not inside(bright, (0, 3 / 4), (0, 1)).any()
  assert not inside(bright, (0, 1), (1 / 2, 1)).any()

  blue = np.all(plots.axes_pixels(fig, axes[1]) == inpaint.SPECTROGRAM_MASK_COLOUR, -1)
  assert inside(blue, (7 / 8, 1), (0, 1 / 4)).all()  # the lowest bins at the bottom, early
  assert not inside(blue, (0, 7 / 8), (0, 1)).any()
  assert not inside(blue, (0, 1), (1 / 4, 1)).any()
  assert blue.mean() == pytest.approx(1 / 32, abs=0.005)


def test_inpaint_refuses_a_finetuned_model_and_warns_on_norm_pix_loss(pretrained, tmp_path):
  model, _ = pretrained
  ft = torch_port.CAVMAEFT(num_classes=3, **models.size_fields("tiny", kind="cav_mae_ft"),
                           audio_length=T, img_size=IMG)
  path = _save(ft, str(tmp_path / "ft.pth"))
  with pytest.raises(inpaint.InpaintError, match="needs a pretraining model"):
    inpaint.run(None, path, str(tmp_path / "out"), batches=[])
  normpix = type(model)(model.module.clone(norm_pix_loss=True), model.params)
  with pytest.warns(UserWarning, match="norm_pix_loss"):
    inpaint.check_model(normpix)
  contrastive_only = type(model)(model.module.clone(mae_loss_weight=0.0), model.params)
  with pytest.raises(inpaint.InpaintError, match="mae_loss_weight=0"):
    inpaint.check_model(contrastive_only)


def _batches(n, batch_size, num_classes=4, seed=5):
  audio, frames = _inputs(n, seed)
  labels = np.eye(num_classes, dtype=np.float32)[np.arange(n) % num_classes]
  ids = np.array([f"clip{i:02d}".encode() for i in range(n)], object)
  out = []
  for start in range(0, n, batch_size):
    b = {"audio": audio[start:start + batch_size], "frames": frames[start:start + batch_size],
         "labels": labels[start:start + batch_size], "clip_id": ids[start:start + batch_size]}
    pad = batch_size - len(b["audio"])
    b["mask"] = np.r_[np.ones(len(b["audio"])), np.zeros(pad)].astype(np.float32)
    if pad:
      b = {k: (np.concatenate([v, v[:1].repeat(pad, 0)]) if k != "mask" else v)
           for k, v in b.items()}
    out.append(b)
  return out, audio, frames, labels


def test_extracted_shards_hold_every_clip_once_with_the_ports_features(pretrained, tmp_path):
  model, ref = pretrained
  batches, audio, frames, labels = _batches(10, 4)
  index = extract.extract(model, batches, str(tmp_path), pooled=True, shard_size=3,
                          meta={"model": "tiny"})
  assert [s["num_clips"] for s in index["shards"]] == [3, 3, 3, 1]
  with open(tmp_path / "index.json") as f:
    assert json.load(f) == index
  shards = [np.load(tmp_path / s["file"], allow_pickle=False) for s in index["shards"]]
  got = {k: np.concatenate([s[k] for s in shards]) for k in ("audio", "video", "clip_id",
                                                                "labels")}
  assert list(got["clip_id"]) == [f"clip{i:02d}" for i in range(10)]
  np.testing.assert_array_equal(got["labels"], labels)
  with torch.no_grad():
    a, v = ref.forward_feat(torch.from_numpy(audio), torch.from_numpy(
        frames.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(got["audio"], a.mean(1).numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["video"], v.mean(1).numpy(), rtol=1e-4, atol=1e-5)

  tokens = extract.extract(model, batches, str(tmp_path / "tokens"), pooled=False,
                           shard_size=100, dtype="float16")
  assert tokens["shapes"]["audio"] == [8 * 16, 128] and tokens["shapes"]["video"] == [16, 128]
  shard = np.load(tmp_path / "tokens" / tokens["shards"][0]["file"])
  assert shard["audio"].dtype == np.float16 and shard["audio"].shape == (10, 128, 128)
  np.testing.assert_allclose(shard["video"].astype(np.float32), v.numpy(), rtol=1e-2,
                             atol=1e-2)
  with pytest.raises(extract.ExtractError, match="shard_size"):
    extract.extract(model, batches, str(tmp_path / "bad"), shard_size=0)


# -- The commands, end to end on a tiny synthetic dataset --------------------------------------


@pytest.fixture(scope="module")
def demo_size_pth(tmp_path_factory):
  """A .pth with the demo config's input geometry (2.56 s of log-mel, 112 px frames)."""
  torch.manual_seed(3)
  ref = torch_port.CAVMAE(**models.size_fields("tiny"), audio_length=256, img_size=112,
                          norm_pix_loss=False).eval()
  return _save(ref, str(tmp_path_factory.mktemp("pth") / "demo_size.pth")), ref


def _cli(module, data_dir, *args):
  cmd = [sys.executable, "-m", module, "--config", f"configs/demo.py:data_dir={data_dir}",
         *_helpers.DEMO_DATA_FLAGS, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_extract_and_inpaint_commands(demo_size_pth, synthetic_data_dir, tmp_path):
  path, _ = demo_size_pth
  data_dir = synthetic_data_dir
  out = _cli("avmae_jax.extract", data_dir, "--checkpoint", path, "--out",
             str(tmp_path / "features"), "--shard_size", "3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "8 clips of split 'test'" in out.stdout
  with open(tmp_path / "features" / "index.json") as f:
    index = json.load(f)
  assert [s["num_clips"] for s in index["shards"]] == [3, 3, 2]  # 8 clips, padding dropped
  ids = np.concatenate([np.load(tmp_path / "features" / s["file"])["clip_id"]
                        for s in index["shards"]])
  assert sorted(ids) == [f"test_{i:06d}" for i in range(8)]

  out = _cli("avmae_jax.inpaint", data_dir, "--checkpoint", path, "--out",
             str(tmp_path / "pictures"), "--num", "2")
  assert out.returncode == 0, out.stderr[-3000:]
  pngs = sorted(f for f in os.listdir(tmp_path / "pictures") if f.endswith(".png"))
  assert len(pngs) == 4 and pngs[0].startswith("clip000_test_")
  assert "warning: the model's config has norm_pix_loss=True" in out.stderr  # .pth default

  out = _cli("avmae_jax.extract", data_dir, "--checkpoint", str(tmp_path / "missing.pth"),
             "--out", str(tmp_path / "x"))
  assert out.returncode == 1 and "missing.pth does not exist" in out.stderr
