"""The report command (curves, page, inpainting panel) and the pictures module under it.

Most tests write a small metrics.jsonl and model.json by hand; one trains a tiny model
(without norm_pix_loss) and reports on it, inpainting panel included, in-process and by
the command.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax import plots
from avmae_jax import report
from avmae_jax.checkpoints import model_dir
from tests import _helpers


def _png(data: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _inside(image, rows, cols, margin=3):
  """image's pixels in the fractions `rows` (from the top) x `cols`, `margin` px inside."""
  h, w = image.shape[:2]
  return image[int(rows[0] * h) + margin:int(rows[1] * h) - margin,
               int(cols[0] * w) + margin:int(cols[1] * w) - margin]


# -- plots --------------------------------------------------------------------------------------


def test_draw_spectrogram_puts_time_across_and_low_bins_at_the_bottom():
  # [T, F] as the models take it: energy in the first half of the frames, lowest quarter
  # of the bins (unequal fractions, so a transposed drawing puts it elsewhere)
  fbank = np.zeros((300, 128), np.float32)
  fbank[:150, :32] = 10.0
  fig, ax = plots.new_figure(4, 2)
  plots.draw_spectrogram(ax, fbank, title="clip")
  np.testing.assert_allclose(ax.get_xlim(), (0.0, 3.0))  # 300 frames of 10 ms
  np.testing.assert_allclose(ax.get_ylim(), (-0.5, 127.5))
  assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("time (s)", "mel bin", "clip")
  bright = plots.axes_pixels(fig, ax).mean(-1) > 128  # magma: high values light
  assert _inside(bright, (3 / 4, 1), (0, 1 / 2)).all()
  assert not _inside(bright, (0, 3 / 4), (0, 1)).any()
  assert not _inside(bright, (0, 1), (1 / 2, 1)).any()


def test_spectrogram_and_image_pngs():
  fbank = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
  assert _png(plots.spectrogram_png(fbank)).shape == (160, 400, 3)  # 4 x 1.6 in at 100 dpi
  assert _png(plots.spectrogram_png(fbank, width_in=3, height_in=1, dpi=50,
                                    title="x")).shape == (50, 150, 3)
  with pytest.raises(ValueError, match=r"\[time frames, mel bins\].*\(128,\)"):
    plots.spectrogram_png(fbank[0])

  rgb = np.zeros((50, 100, 3), np.uint8)
  rgb[:, :50, 0] = 255
  np.testing.assert_array_equal(_png(plots.image_png(rgb)), rgb)
  small = _png(plots.image_png(rgb, max_side=40))
  assert small.shape == (20, 40, 3) and small[10, 5, 0] > 200 and small[10, 35, 0] < 50
  with pytest.raises(ValueError, match="uint8"):
    plots.image_png(rgb.astype(np.float32))


# -- report, on hand-written workdirs -------------------------------------------------------


def _records():
  train = [{"step": s, "loss": 100.0 / s, "loss_mae_a": 1.0 / s, "nce": 3.0, "c_acc": 0.1,
            "lr": 1e-4, "grad_norm": 1.0, "samples_per_s": 50.0, "epoch": s / 10}
           for s in (1, 10, 20, 30)]
  train[2]["nce"] = "nan"  # how summary.py writes a non-finite value
  evals = [{"step": s, "kind": "eval", "eval_loss": 5.0, "eval_nce": 3.5, "eval_c_acc": 0.05,
            "num_clips": 20.0, "a2v_r1": 5.0 + s, "a2v_r5": 25.0, "a2v_r10": 50.0,
            "v2a_r1": 10.0, "v2a_r5": 30.0, "v2a_r10": 55.0, "a2v_median_rank": 8.0,
            "v2a_median_rank": 9.0} for s in (20, 30)]
  final = {"step": 30, "kind": "final_eval", "eval_mAP": 0.5, "eval_accuracy": 0.6,
           "eval_audioonly_mAP": 0.4, "frames": 10, "num_clips": 20, "model": "last"}
  return train + evals + [final]


def _workdir(path, records=None, **model_fields):
  os.makedirs(path, exist_ok=True)
  if records is not None:
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  model = models.build({"kind": "cav_mae", **model_fields})
  model_dir.write_model_config(str(path), models.model_config(model))
  return str(path)


def test_panels_group_the_series_by_quantity():
  panels = {p.title: p for p in report.panels(_records())}
  labels = {title: [s.label for s in p.series] for title, p in panels.items()}
  assert list(labels)[:3] == ["loss: total loss", "loss_mae_a: audio reconstruction",
                              "nce: InfoNCE"]  # the total first, then the terms
  assert labels["loss: total loss"] == ["train", "held-out"]
  assert labels["c_acc: contrastive accuracy"] == ["train", "held-out"]
  assert labels["retrieval audio→video, R@K (%)"] == ["R@1", "R@5", "R@10"]
  assert labels["retrieval median rank"] == ["audio→video", "video→audio"]
  assert labels["mAP: mean average precision"] == ["final", "final, audioonly"]
  assert labels["accuracy: classification accuracy"] == ["final"]
  assert "lr: learning rate" in labels and "samples_per_s: throughput, samples/s" in labels
  # bookkeeping left out, the string "model" too
  assert not [t for t in labels if re.match(r"(epoch|num_clips|frames|model)\b", t)]

  r_at_k = panels["retrieval audio→video, R@K (%)"]
  assert r_at_k.series[0].steps == [20, 30] and r_at_k.series[0].values == [25.0, 35.0]
  assert r_at_k.chance == {"R@1": 5.0, "R@5": 25.0, "R@10": 50.0}  # 20 clips
  assert panels["retrieval median rank"].chance == {"": 10.5}
  nce = panels["nce: InfoNCE"].series[0].values
  assert np.isnan(nce[2]) and nce[3] == 3.0
  assert panels["loss: total loss"].log_scale  # 100 .. 3.3: over a decade
  assert not panels["nce: InfoNCE"].log_scale


def test_report_writes_the_plot_and_a_self_contained_page(tmp_path):
  workdir = _workdir(tmp_path / "run", _records())
  result = report.run(workdir, inpaint=False)
  assert result["png"] == os.path.join(workdir, "report.png")
  with open(result["png"], "rb") as f:
    png = f.read()
  n = len(result["panels"])
  rows = -(-n // report.NCOLS)
  assert _png(png).shape == (rows * 250, report.NCOLS * 420, 3)  # 4.2 x 2.5 in per panel

  with open(result["html"], encoding="utf-8") as f:
    page = f.read()
  images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  assert len(images) == 1 and base64.b64decode(images[0]) == png  # embedded, no files
  assert "http" not in page  # nothing fetched
  for title in ("loss: total loss", "retrieval audio→video, R@K (%)", "retrieval median rank",
                "mAP: mean average precision", "lr: learning rate"):
    assert f"<td>{title}</td>" in page, title
  assert "<td>final, audioonly</td>" in page
  assert "No inpainting panel: skipped (--no_inpaint)." in page
  assert "does not record the run's config (written before train kept config.json)" in page
  assert "&quot;norm_pix_loss&quot;" not in page and '"norm_pix_loss": true' in page  # model.json

  config = _helpers.use_demo_data(config_args.load_config(_helpers.config_path("demo.py")))
  report.run(workdir, config=config, inpaint=False)
  with open(result["html"], encoding="utf-8") as f:
    page = f.read()
  assert '"num_test": 8' in page and "pass --config to show it" not in page
  # The config the run recorded (train writes config.json) is used without --config.
  config.synthetic.num_test = 9
  model_dir.write_run_config(workdir, config)
  report.run(workdir, inpaint=False)
  with open(result["html"], encoding="utf-8") as f:
    page = f.read()
  assert '"num_test": 9' in page and "As the run recorded it (config.json)" in page


@pytest.mark.parametrize("fields,why", [
    ({"norm_pix_loss": True}, "trained with norm_pix_loss=True"),
    ({"norm_pix_loss": False, "mae_loss_weight": 0.0}, "mae_loss_weight=0"),
    ({"norm_pix_loss": False}, "no finished checkpoint yet"),
])
def test_the_page_says_why_there_is_no_inpainting_panel(tmp_path, fields, why):
  workdir = _workdir(tmp_path / "run", _records(), **fields)
  result = report.run(workdir)
  assert not result["inpainting"] and why in result["no_inpainting_reason"]
  with open(result["html"], encoding="utf-8") as f:
    assert why in f.read()


def test_a_finetuning_model_gets_no_inpainting_panel(tmp_path):
  workdir = str(tmp_path / "ft")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  model = models.build({"kind": "cav_mae_ft", "num_classes": 3})
  model_dir.write_model_config(workdir, models.model_config(model))
  result = report.run(workdir)
  assert "needs a pretraining model" in result["no_inpainting_reason"]
  assert list(result["panels"]) == ["loss: total loss"]


def test_bad_workdirs_are_named(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(report.ReportError, match=f"workdir {re.escape(missing)} does not exist"):
    report.run(missing)
  empty_dir = _workdir(tmp_path / "no_metrics")
  with pytest.raises(report.ReportError, match=r"no_metrics/metrics.jsonl does not exist"):
    report.run(empty_dir)
  for name, text, message in (
      ("empty", "\n\n", r"empty/metrics.jsonl holds no records"),
      ("garbled", '{"step": 1, "loss": 1}\n{"step": 2, "lo', r"garbled/metrics.jsonl line 2 "
       "is not JSON"),
      ("no_step", '{"loss": 1}\n', r"no_step/metrics.jsonl line 1 is not a metrics record"),
      ("no_numbers", '{"step": 1, "model": "last"}\n', r"no numeric series")):
    workdir = _workdir(tmp_path / name)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(text)
    with pytest.raises(report.ReportError, match=message):
      report.run(workdir, inpaint=False)
    assert not os.path.exists(os.path.join(workdir, "report.html"))


# -- On a real tiny run -------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_a_tiny_training_run_with_its_inpainting_panel(tmp_path):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  config = _helpers.tiny_pretrain_config(total_steps=2)
  config.model.norm_pix_loss = False  # reconstructions on the input's scale
  workdir = str(tmp_path / "workdir")
  train.train(config, workdir, train_iter=_helpers.StandInBatches(_helpers.random_pretrain_batch))
  batch = _helpers.random_pretrain_batch(7)
  batch.update(mask=np.ones(2, np.float32), clip_id=np.array([b"one", b"two"], object))
  result = report.run(workdir, config, num=2, batches=[batch])

  assert [c["spectrogram"] for c in result["inpainting"]] == [
      "clip000_one_spectrogram.png", "clip001_two_spectrogram.png"]
  assert "step 2" in result["inpainting"][0]["model"]
  assert {"loss: total loss", "loss_mae_a: audio reconstruction", "c_acc: contrastive accuracy",
          "lr: learning rate"} <= set(result["panels"])
  with open(result["html"], encoding="utf-8") as f:
    page = f.read()
  images = re.findall(r'alt="(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
  assert [alt for alt, _ in images] == ["frame", "spectrogram"] * 2
  assert _png(base64.b64decode(images[1][1])).shape == (600, 600, 3)
  assert "No inpainting panel" not in page and '"total_steps": 2' in page

  # the command, with the config the run recorded; a missing workdir is an error
  os.remove(result["html"])
  cmd = [sys.executable, "-m", "avmae_jax.report", "--no_inpaint", workdir]
  out = subprocess.run(cmd, cwd=_helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "report.png (" in out.stdout and "skipped (--no_inpaint)" in out.stdout
  with open(result["html"], encoding="utf-8") as f:
    page = f.read()
  assert "As the run recorded it" in page and '"total_steps": 2' in page
  out = subprocess.run(cmd[:-1] + [str(tmp_path / "missing")], cwd=_helpers.ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and "missing does not exist" in out.stderr
