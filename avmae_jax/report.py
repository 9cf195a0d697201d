r"""A training run at a glance: its curves, its config and what it reconstructs, as one page.

  python -m avmae_jax.report WORKDIR [--config configs/demo.py[:args]] [--no_inpaint] \
      [--num 2] [--mask_ratio 0.75] [--seed 0]

Reads what `python -m avmae_jax.train` leaves in WORKDIR (metrics.jsonl, model.json,
config.json, checkpoints/) and writes, with nothing to serve and nothing fetched:
  WORKDIR/report.png    every scalar series of metrics.jsonl over steps, one panel per
                        quantity: each loss term, accuracies, retrieval R@1/5/10 per direction
                        and median ranks (chance dotted), fine-tuning mAP/accuracy/mAUC/d',
                        learning rate, gradient norm, throughput. A training term and its
                        held-out counterpart (`eval_<name>`, "kind": "eval") share a panel,
                        final-evaluation figures ("kind": "final_eval") are stars.
  WORKDIR/report.html   that plot (embedded), the latest value of every series, the model
                        (model.json), the run's config (config.json, or --config), and for a
                        pretraining model trained without norm_pix_loss an inpainting panel:
                        `inpaint`'s pictures of --num held-out clips by the latest checkpoint
                        (the config's eval_data section; the page says why when there is none).
The page is self-contained (images as data: URIs): it can be mailed or opened from a bucket.

The config (shown, and the source of the clips to inpaint) is the one the run recorded
(WORKDIR/config.json); --config replaces it, e.g. for a workdir from before train wrote it.
"""

import base64
import dataclasses
import html
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Iterable, Mapping, Optional

from absl import app
from absl import flags
import ml_collections
import numpy as np

from avmae_jax import plots
from avmae_jax.checkpoints import model_dir
from avmae_jax.models import common as models_common
from avmae_jax.training import summary

METRICS_FILE = summary.METRICS_FILE
PNG_FILE = "report.png"
HTML_FILE = "report.html"
# Record kinds of metrics.jsonl (training/summary.py) and how the page names them.
KIND_LABELS = {None: "train", "eval": "held-out", "final_eval": "final"}
# Bookkeeping, not quantities to follow: the number of held-out clips (it gives the chance
# lines instead), frames per clip, and the epoch (a rescaled step).
SKIPPED = ("num_clips", "frames", "epoch")
DIRECTIONS = {"a2v": "audio→video", "v2a": "video→audio"}
# What the series of the two pretraining families and fine-tuning are (models' metric_names).
DESCRIPTIONS = {
    "loss": "total loss",
    "loss_mae": "reconstruction, audio + frame",
    "loss_mae_a": "audio reconstruction",
    "loss_mae_v": "frame reconstruction",
    "loss_c": "contrastive, weighted",
    "nce": "InfoNCE",
    "c_acc": "contrastive accuracy",
    "loss_rec_a": "audio reconstruction",
    "loss_rec_v": "frame reconstruction",
    "loss_inter": "inter-modal contrastive",
    "loss_intra_a": "intra-audio contrastive",
    "loss_intra_v": "intra-frame contrastive",
    "acc_inter": "inter-modal accuracy",
    "acc_intra_a": "intra-audio accuracy",
    "acc_intra_v": "intra-frame accuracy",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "samples_per_s": "throughput, samples/s",
    "mAP": "mean average precision",
    "mAUC": "mean ROC AUC",
    "d_prime": "d'",
    "accuracy": "classification accuracy",
}
_RANK = {name: i for i, name in enumerate(DESCRIPTIONS)}
_FINETUNING = ("mAP", "accuracy", "mAUC", "d_prime")  # classification figures, in this order
NCOLS = 3
PANEL_WIDTH_IN, PANEL_HEIGHT_IN = 4.2, 2.5


class ReportError(Exception):
  """A workdir that cannot be reported on (missing, no or unreadable metrics)."""


# -- metrics.jsonl -> series -> panels ---------------------------------------------------------


def read_records(workdir: str) -> list[dict]:
  """Every record of WORKDIR/metrics.jsonl, training and evaluation alike."""
  if not os.path.isdir(workdir):
    raise ReportError(f"workdir {workdir} does not exist (or is not a directory)")
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise ReportError(f"{path} does not exist: not a training workdir, or the run has not "
                      "logged a step yet (train writes it every config.log_every steps)")
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ReportError(f"{path} line {number} is not JSON ({e.msg})") from e
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ReportError(f"{path} line {number} is not a metrics record (an object with an "
                          "integer 'step')")
      records.append(record)
  if not records:
    raise ReportError(f"{path} holds no records")
  return records


def _number(value) -> Optional[float]:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # non-finite, as written
    return float(value)
  return None


@dataclasses.dataclass
class Series:
  label: str  # in the panel's legend
  key: str  # as metrics.jsonl names it
  kind: Optional[str]  # the records' kind: None (training), "eval", "final_eval"
  steps: list = dataclasses.field(default_factory=list)
  values: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Panel:
  title: str
  order: tuple  # where the panel goes: losses, accuracies, retrieval, ..., other
  series: list = dataclasses.field(default_factory=list)
  # chance level per series label ("": every series), drawn dotted in its colour
  chance: dict = dataclasses.field(default_factory=dict)
  chance_clips: int = 0
  log_scale: bool = False


def _place(kind: Optional[str], key: str) -> Optional[tuple[str, tuple, str]]:
  """(panel title, panel order, series label) of one series, or None to leave it out."""
  name = key[len("eval_"):] if kind is not None and key.startswith("eval_") else key
  if name in SKIPPED:
    return None
  who = KIND_LABELS.get(kind, str(kind))
  mode, _, rest = name.partition("_")
  if mode in models_common.MODES and rest:  # fine-tuning figures of an extra eval mode
    name, who = rest, f"{who}, {mode}"
  retrieval = re.fullmatch(r"(a2v|v2a)_r(\d+)", name)
  if retrieval:
    direction, k = retrieval.groups()
    return (f"retrieval {DIRECTIONS[direction]}, R@K (%)", (3, direction),
            f"R@{k}" + ("" if kind == "eval" else f" ({who})"))
  ranks = re.fullmatch(r"(a2v|v2a)_median_rank", name)
  if ranks:
    return ("retrieval median rank", (3, "z"),
            DIRECTIONS[ranks.group(1)] + ("" if kind == "eval" else f" ({who})"))
  title = f"{name}: {DESCRIPTIONS[name]}" if name in DESCRIPTIONS else name
  if name == "loss":
    order = (0,)
  elif name.startswith("loss") or name == "nce":
    order = (1, _RANK.get(name, len(_RANK)))  # a model's terms together, as it names them
  elif name in _FINETUNING:
    order = (4, _FINETUNING.index(name))
  elif "acc" in name:
    order = (2, _RANK.get(name, len(_RANK)))
  elif name in ("lr", "grad_norm", "samples_per_s"):
    order = (5, ("lr", "grad_norm", "samples_per_s").index(name))
  else:
    order = (6,)
  return title, order, who


def panels(records: Iterable[Mapping[str, Any]]) -> list[Panel]:
  """The report's panels: every numeric series of `records`, grouped by quantity."""
  records = list(records)
  by_title: dict[str, Panel] = {}
  series: dict[tuple, Series] = {}
  for record in records:
    kind = record.get("kind")
    for key, value in record.items():
      value = _number(value)
      if key in ("step", "kind") or value is None:
        continue
      place = _place(kind, key)
      if place is None:
        continue
      title, order, label = place
      panel = by_title.setdefault(title, Panel(title, order))
      if (kind, key) not in series:
        series[kind, key] = Series(label, key, kind)
        panel.series.append(series[kind, key])
      series[kind, key].steps.append(record["step"])
      series[kind, key].values.append(value)
  clips = [r["num_clips"] for r in records if r.get("kind") == "eval" and r.get("num_clips")]
  for panel in by_title.values():
    if panel.order[0] == 3 and clips:  # chance for the latest evaluation's clip count
      n = panel.chance_clips = int(clips[-1])
      if panel.order[1] == "z":
        panel.chance[""] = (n + 1) / 2  # median rank of a random ranking, both directions
      else:
        for s in panel.series:
          k = int(re.search(r"_r(\d+)$", s.key).group(1))
          panel.chance[s.label] = 100.0 * min(k, n) / n
    values = np.array([v for s in panel.series for v in s.values], np.float64)
    values = values[np.isfinite(values)]
    # losses spanning more than a decade read better on a log scale
    panel.log_scale = bool(panel.order[0] <= 1 and len(values) and values.min() > 0
                           and values.max() / values.min() > 10)
  # stable: panels of one group keep the order their series first appear in
  return sorted(by_title.values(), key=lambda p: p.order)


def draw(panel_list: list[Panel]) -> bytes:
  """The panels on a grid, NCOLS across, as PNG bytes."""
  if not panel_list:
    raise ReportError("metrics.jsonl holds no numeric series to plot")
  nrows = math.ceil(len(panel_list) / NCOLS)
  ncols = min(NCOLS, len(panel_list))
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  fig, axes = plots.new_figure(PANEL_WIDTH_IN * ncols, PANEL_HEIGHT_IN * nrows, nrows=nrows,
                               ncols=ncols, squeeze=False)
  axes = axes.ravel()
  # one step axis for every panel, so that an evaluation lines up with the training curves
  last = max(max(s.steps) for p in panel_list for s in p.series)
  for index, (ax, panel) in enumerate(zip(axes, panel_list)):
    ax.set_xlim(0, max(last, 1) * 1.03)
    for s in panel.series:
      many = len(s.steps) > 25
      if s.kind == "final_eval":
        ax.plot(s.steps, s.values, "*", color="black", markersize=9, label=s.label)
      else:
        ax.plot(s.steps, s.values, "-" if s.kind is None else "-o", linewidth=1.2,
                markersize=0 if many or s.kind is None else 3.5, label=s.label)
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for label, value in panel.chance.items():
      ax.axhline(value, color=colours.get(label, "0.5"), linestyle=":", linewidth=1)
    if panel.log_scale:
      ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=plots.FONT_SIZE + 2)
    ax.tick_params(labelsize=plots.FONT_SIZE + 1)
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    if index + NCOLS >= len(panel_list):  # nothing below it
      ax.set_xlabel("step", fontsize=plots.FONT_SIZE + 1)
    if len(panel.series) > 1 or panel.chance or panel.series[0].kind is not None:
      handles, labels = ax.get_legend_handles_labels()
      if panel.chance:
        handles.append(Line2D([], [], color="0.5", linestyle=":", linewidth=1))
        labels.append(f"chance ({panel.chance_clips} clips)")
      ax.legend(handles, labels, fontsize=plots.FONT_SIZE, loc="best", framealpha=0.7)
  for ax in axes[len(panel_list):]:
    ax.set_visible(False)
  return plots.figure_png(fig)


def _latest(panel_list: list[Panel]) -> list[tuple[str, str, int, float]]:
  """(panel, series, step, value) of each series' last record."""
  return [(p.title, s.label, s.steps[-1], s.values[-1]) for p in panel_list for s in p.series]


# -- The inpainting panel ------------------------------------------------------------------------


def _inpainting(workdir: str, config: Optional[ml_collections.ConfigDict], num: int,
                mask_ratio: float, seed: int, batches=None) -> tuple[list[dict], str]:
  """(clips with their PNG bytes, "") or ([], why there are none)."""
  # pylint: disable=import-outside-toplevel
  from avmae_jax import cli
  from avmae_jax import inpaint
  from avmae_jax import models
  from avmae_jax.evaluators.common import EvaluationError
  # pylint: enable=import-outside-toplevel
  try:
    module = models.build(model_dir.read_model_config(workdir))
  except (FileNotFoundError, ValueError) as e:
    return [], f"the workdir's model cannot be read: {e}"
  try:
    module.check_inpainting()  # fine-tuning models (no decoder), contrastive-only ones
  except ValueError as e:
    return [], f"{e}."
  if module.norm_pix_loss:
    return [], ("the model was trained with norm_pix_loss=True: its decoder predicts each "
                "patch standardised by that patch's own mean and variance, which cannot be "
                "put back on the input's scale without the statistics of the hidden patch "
                "(`python -m avmae_jax.inpaint` draws them as they are, with a warning).")
  if not model_dir.train_steps(workdir):
    return [], "the workdir holds no finished checkpoint yet."
  if batches is None and config is None:
    return [], ("the workdir does not record the run's config (no config.json): pass "
                "--config (the run's config; its eval_data section gives the clips).")
  with tempfile.TemporaryDirectory() as out:
    try:
      model, where = cli.load_model(workdir)
      if batches is None:  # as inpaint.run reads them: one ordered pass, frame 5
        config = ml_collections.ConfigDict(config.to_dict())
        config.eval_data.eval_all_frames = False
        batches = cli.input_iterator(config, "eval_data")
      records = inpaint.write_pictures(model, batches, out, num, mask_ratio, seed)
    except (inpaint.InpaintError, EvaluationError, FileNotFoundError, ValueError) as e:
      print(f"warning: no inpainting panel: {e}", file=sys.stderr)
      return [], f"inpainting failed: {e}"
    for r in records:
      r["model"] = where
      for name in ("frame", "spectrogram"):
        with open(os.path.join(out, r[name]), "rb") as f:
          r[name + "_png"] = f.read()
  return records, ""


# -- The page ----------------------------------------------------------------------------------


_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
td.num { text-align: right; font-family: monospace; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.note { background: #fff6dd; padding: 0.6em; border-left: 4px solid #e0b000; }
.clip { margin-bottom: 1.2em; } .clip img { vertical-align: top; margin-right: 8px; }
"""


def _data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _format(value: float) -> str:
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def render_html(workdir: str, plot_png: bytes, panel_list: list[Panel],
                records: list[dict], model_config: Optional[dict], config_text: Optional[str],
                clips: list[dict], no_clips_reason: str, mask_ratio: float,
                config_source: str = "as --config gives it") -> str:
  """The report page (module docstring)."""
  e = html.escape
  kinds = {}
  for r in records:
    kinds[KIND_LABELS.get(r.get("kind"), str(r.get("kind")))] = r["step"]
  summary = ", ".join(f"{kind} records up to step {step}" for kind, step in kinds.items())
  model = (f"{e(str(model_config.get('kind', '?')))} model" if model_config is not None
           else "no model.json")
  parts = [
      "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>report: {e(workdir)}</title><style>{_STYLE}</style></head><body>",
      f"<h1>Training report: {e(workdir)}</h1>",
      f"<p>{model}; {len(records)} records in {METRICS_FILE} ({e(summary)}).</p>",
      "<h2>Curves</h2>",
      f'<img class="plot" alt="metrics over steps" src="{_data_uri(plot_png)}">',
      "<h2>Latest values</h2>",
      "<table><tr><th>panel</th><th>series</th><th>step</th><th>value</th></tr>"]
  parts += [f"<tr><td>{e(t)}</td><td>{e(s)}</td><td class='num'>{step}</td>"
            f"<td class='num'>{_format(v)}</td></tr>" for t, s, step, v in _latest(panel_list)]
  parts += ["</table>", "<h2>Inpainting</h2>"]
  if clips:
    parts.append(f"<p>{len(clips)} held-out clips, {mask_ratio:.0%} of the patches removed, "
                 f"reconstructed by {e(clips[0]['model'])} (the visible patches pasted back; "
                 "removed patches grey on the frame, blue on the spectrogram).</p>")
    for clip in clips:
      parts.append(
          f'<div class="clip"><p>{e(clip["frame"].rsplit("_frame.png", 1)[0])}: masked-patch '
          f'MSE audio {clip["mse_masked_audio"]:.4f}, frame {clip["mse_masked_frame"]:.4f}'
          f'</p><img alt="frame" src="{_data_uri(clip["frame_png"])}">'
          f'<img alt="spectrogram" width="600" src="{_data_uri(clip["spectrogram_png"])}">'
          "</div>")
  else:
    parts.append(f'<p class="note">No inpainting panel: {e(no_clips_reason)}</p>')
  parts.append("<h2>Config</h2>")
  if config_text is not None:
    parts.append(f"<p>{e(config_source[:1].upper() + config_source[1:])}.</p>")
    parts.append(f"<pre>{e(config_text, quote=False)}</pre>")
  else:
    parts.append('<p class="note">The workdir does not record the run\'s config (written '
                 "before train kept config.json); pass --config to show it.</p>")
  parts.append(f"<h2>Model ({e(os.path.join(workdir, 'model.json'))})</h2>")
  parts.append(f"<pre>{e(json.dumps(model_config, indent=2), quote=False)}</pre>"
               if model_config is not None
               else '<p class="note">no model.json in the workdir</p>')
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"


def _read_model_json(workdir: str) -> Optional[dict]:
  try:
    return model_dir.read_model_config(workdir)
  except FileNotFoundError:
    return None
  except ValueError as e:  # not JSON, or not avmae_jax's model.json format
    raise ReportError(f"{os.path.join(workdir, model_dir.MODEL_JSON)} is not a model config "
                      f"({e})") from e


def run(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
        inpaint: bool = True, num: int = 2, mask_ratio: float = 0.75, seed: int = 0,
        batches: Optional[Iterable[Mapping[str, Any]]] = None) -> dict[str, Any]:
  """Writes WORKDIR/report.png and WORKDIR/report.html; returns what they hold: the paths,
  the panels (title -> series labels), the inpainted clips' records (without the images)
  and, when there are none, why.

  batches: in-memory batches to inpaint instead of the config's eval_data (tests).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  records = read_records(workdir)
  config_source = "as --config gives it"
  if config is None:  # the run's own, where the workdir records it (train writes it)
    recorded = model_dir.read_run_config(workdir)
    if recorded is not None:
      config = ml_collections.ConfigDict(recorded)
      config_source = f"as the run recorded it ({model_dir.RUN_CONFIG_JSON})"
  panel_list = panels(records)
  plot_png = draw(panel_list)
  model_config = _read_model_json(workdir)
  if inpaint:
    clips, reason = _inpainting(workdir, config, num, mask_ratio, seed, batches)
  else:
    clips, reason = [], "skipped (--no_inpaint)."
  config_text = None
  if config is not None:
    config_text = config.to_json_best_effort(indent=2, sort_keys=True)
  page = render_html(workdir, plot_png, panel_list, records, model_config, config_text,
                     clips, reason, mask_ratio, config_source)
  png_path, html_path = os.path.join(workdir, PNG_FILE), os.path.join(workdir, HTML_FILE)
  with open(png_path, "wb") as f:
    f.write(plot_png)
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(page)
  return {"png": png_path, "html": html_path,
          "panels": {p.title: [s.label for s in p.series] for p in panel_list},
          "inpainting": [{k: v for k, v in c.items() if not k.endswith("_png")} for c in clips],
          "no_inpainting_reason": reason}


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "configs/FILE.py[:args], the run's config: shown on the page, and its "
      "eval_data section gives the clips to inpaint.", lock_config=False)
  flags.DEFINE_bool("no_inpaint", False, "Leave out the inpainting panel (no model or data "
                    "is read).")
  flags.DEFINE_integer("num", 2, "How many clips to inpaint.")
  flags.DEFINE_float("mask_ratio", 0.75, "Fraction of patches removed, audio and video.")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")


def main(argv):
  # pylint: disable=import-outside-toplevel
  from avmae_jax import cli
  from avmae_jax import inpaint as inpaint_lib
  from avmae_jax.evaluators.common import EvaluationError
  # pylint: enable=import-outside-toplevel
  if len(argv) != 2:
    raise app.UsageError("usage: python -m avmae_jax.report WORKDIR [--config ...] "
                         f"[--no_inpaint]; got arguments {argv[1:]}")
  with cli.command(argv[:1], ReportError, inpaint_lib.InpaintError, EvaluationError) as f:
    result = run(argv[1], f.config, not f.no_inpaint, f.num, f.mask_ratio, f.seed)
  print(f"wrote {result['png']} ({len(result['panels'])} panels) and {result['html']}")
  if result["no_inpainting_reason"]:
    print(f"no inpainting panel: {result['no_inpainting_reason']}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
