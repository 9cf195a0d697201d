r"""Inpainting pictures: what a pretrained CAV-MAE reconstructs of masked frames and audio.

  python -m avmae_jax.inpaint --checkpoint DIR_OR_PTH --config configs/demo.py --out DIR \
      [--num 4] [--mask_ratio 0.75] [--seed 0]

For the first --num clips of the config's eval_data split (frame 5, no augmentation) it
writes two PNGs per clip, each with three panels, original | masked | reconstruction:
  DIR/clipNNN_<id>_frame.png         the video frame, panels side by side
  DIR/clipNNN_<id>_spectrogram.png   the log-mel, panels stacked, drawn as spectrograms are
                                     read: time across in seconds (10 ms frames), mel bin 0
                                     (low frequencies) at the bottom (avmae_jax/plots.py)
and DIR/inpaint.json with the masked-patch MSE of each clip.

Procedure (cav-mae spec section 7): the pretraining forward pass with both masks at
--mask_ratio (0.75), the decoder's patch predictions unpatchified with the model's own
layout (frames 3 x 14 x 14 patches of 16x16, audio 1 x 8 x 64: frequency x time), and the
visible patches pasted back from the input, so only the removed ones are predicted.
Frames are shown after undoing the ImageNet normalisation, removed patches grey in the
masked panel; spectrograms on one grey scale per clip (the original's range, black low),
removed patches blue. `render_frame` gives a PIL image with the frame's pixels as they are;
`render_spectrogram` a matplotlib figure with axes.

Meant for models trained WITHOUT norm_pix_loss: with it, the decoder predicts each patch
standardised by its own mean and variance, which cannot be shown on the input's scale
without the (hidden) patch's statistics; the command warns and shows them as they are.
"""

import functools
import json
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avmae_jax import api
from avmae_jax import cli
from avmae_jax import plots
from avmae_jax.evaluators import common as eval_common

# Removed patches in the masked panels: grey on frames (the MAE papers' convention),
# blue on the grey-scale spectrograms, where grey would read as signal.
FRAME_MASK_COLOUR = np.array([128, 128, 128], np.uint8)
SPECTROGRAM_MASK_COLOUR = np.array([40, 80, 160], np.uint8)
GAP = 4  # pixels between panels
LABEL_HEIGHT = 14


class InpaintError(Exception):
  """A request that cannot be drawn (wrong model kind, no data)."""


def check_model(model: api.LoadedModel) -> None:
  try:
    model.module.check_inpainting()
  except ValueError as e:
    raise InpaintError(str(e)) from e
  if model.module.norm_pix_loss:
    warnings.warn("the model's config has norm_pix_loss=True (a .pth does not record it; "
                  "True is then assumed, as the released models used it): its predictions "
                  "are per-patch standardised, so the reconstructed patches are not on the "
                  "input's scale. Spec section 7 uses a model trained without it.")


def reconstruct(model: api.LoadedModel, audio, frames, mask_ratio: float = 0.75,
                key: Optional[jax.Array] = None, noise_a=None, noise_v=None
                ) -> dict[str, np.ndarray]:
  """Masks, predicts and pastes the visible patches back.

  Masks come from `key` (the model's `masking` rng stream) or from explicit noise
  (lowest noise kept, as in the reference). Returns numpy arrays:
    audio, audio_masked, audio_recon     [B, F, T] (frequency first, as the patches lie)
    frames, frames_masked, frames_recon  [B, H, W, C]
    mask_a [B, La], mask_v [B, Lv]       1 where a patch was removed
    mse_a, mse_v [B]                     mean squared error of the predictions over the
                                         removed patches, against the input
  The *_masked arrays hold 0 in the removed patches (mask_a / mask_v say which).
  """
  module = model.module.clone(mask_ratio_a=float(mask_ratio), mask_ratio_v=float(mask_ratio))
  audio = jnp.asarray(audio, jnp.float32)
  frames = jnp.asarray(frames, jnp.float32)
  if key is None:
    key = jax.random.key(0)
  out = _forward_fn(module)(model.params, audio, frames, key, noise_a, noise_v)
  targets = module.reconstruction_targets(audio, frames)
  panels, results = {}, {}
  for name, target, pred, mask in (("audio", targets[0], out["pred_a"], out["mask_a"]),
                                   ("frames", targets[1], out["pred_v"], out["mask_v"])):
    removed = mask[:, :, None] > 0.5
    recon = jnp.where(removed, pred.astype(jnp.float32), target)
    masked = jnp.where(removed, 0.0, target)
    panels[name] = (target, masked, recon)
    results["mask_a" if name == "audio" else "mask_v"] = mask
    results["mse_a" if name == "audio" else "mse_v"] = (
        jnp.sum(jnp.mean((pred - target) ** 2, -1) * mask, 1) / jnp.sum(mask, 1))
  for suffix, audio_patches, frame_patches in zip(("", "_masked", "_recon"), panels["audio"],
                                                  panels["frames"]):
    results["audio" + suffix], results["frames" + suffix] = module.patches_to_images(
        audio_patches, frame_patches)
  return {k: np.asarray(v) for k, v in results.items()}


@functools.lru_cache(maxsize=4)
def _forward_fn(module):
  # Cached per module (modules with equal fields are equal), so batches reuse one compile.
  return jax.jit(lambda prm, a, v, k, na, nv: module.apply(
      {"params": prm}, a, v, na, nv, rngs={"masking": k}))


# -- Rendering -------------------------------------------------------------------------------


def _imagenet_stats():
  from avmae_jax.data import transforms  # pylint: disable=import-outside-toplevel
  return np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _patch_mask_image(mask: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
  """[L] patch mask -> [grid_h * patch, grid_w * patch] bool pixels."""
  return np.kron(mask.reshape(grid), np.ones((patch, patch))) > 0.5


def _labelled_strip(panels: list[np.ndarray], labels: list[str]):
  """Panels side by side, each under its label -> a PIL image."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  h, w = panels[0].shape[:2]
  n = len(panels)
  canvas = Image.new("RGB", (n * w + (n - 1) * GAP, h + LABEL_HEIGHT), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (panel, label) in enumerate(zip(panels, labels)):
    x = i * (w + GAP)
    draw.text((x + 2, 1), label, fill=(0, 0, 0))
    canvas.paste(Image.fromarray(panel), (x, LABEL_HEIGHT))
  return canvas


def render_frame(original, masked, recon, mask_v, grid, patch, mask_ratio):
  """One clip's frame panels ([H, W, 3] ImageNet-normalised) -> a PIL image."""
  mean, std = _imagenet_stats()
  pixels = _patch_mask_image(mask_v, grid, patch)
  panels = [_to_uint8(x * std + mean) for x in (original, masked, recon)]
  panels[1][pixels] = FRAME_MASK_COLOUR
  return _labelled_strip(panels, ["original", f"masked {mask_ratio:.0%}", "reconstruction"])


def render_spectrogram(original, masked, recon, mask_a, grid, patch, mask_ratio,
                       frame_shift_s: float = plots.FRAME_SHIFT_S):
  """One clip's spectrogram panels ([F, T], frequency first, as `reconstruct` returns them)
  -> a matplotlib Figure of three stacked spectrograms, original | masked | reconstruction,
  time across in seconds and low frequencies at the bottom, on the original's grey scale
  with the removed patches blue in the masked one. Save it with `plots.figure_png`."""
  low, high = float(original.min()), float(original.max())
  num_frames = original.shape[1]
  removed = _patch_mask_image(mask_a, grid, patch).T  # [T, F], as drawn
  # wider for longer clips (1024 frames: 12 in), so a patch stays a few pixels wide
  width = min(12.0, max(6.0, 2.0 + num_frames / 100))
  fig, axes = plots.new_figure(width, 6.0, nrows=3, ncols=1, sharex=True)
  titles = ["original", f"masked {mask_ratio:.0%}", "reconstruction"]
  for ax, x, title, mask in zip(axes, (original, masked, recon), titles,
                                (None, removed, None)):
    plots.draw_spectrogram(ax, np.asarray(x).T, frame_shift_s, title=title, vmin=low,
                           vmax=max(high, low + 1e-6), cmap="gray", mask=mask,
                           mask_colour=SPECTROGRAM_MASK_COLOUR)
  for ax in axes[:-1]:
    ax.set_xlabel("")
  return fig


def _safe_name(clip_id: Any) -> str:
  if isinstance(clip_id, bytes):
    clip_id = clip_id.decode("utf-8", "replace")
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(clip_id))[:60].strip("_.") or "clip"


def write_pictures(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]], out: str,
                   num: int = 4, mask_ratio: float = 0.75, seed: int = 0) -> list[dict]:
  """Draws the first `num` real clips of `batches` into `out`; returns one record per clip
  (file names and masked-patch MSEs), also written to out/inpaint.json."""
  check_model(model)
  if num < 1:
    raise InpaintError(f"--num must be >= 1, got {num}")
  if not 0.0 < mask_ratio < 1.0:
    raise InpaintError(f"--mask_ratio must be in (0, 1), got {mask_ratio}")
  module = model.module
  os.makedirs(out, exist_ok=True)
  records = []
  key = jax.random.key(seed)
  for index, batch in enumerate(batches):
    if index == 0:
      eval_common.check_batch(model.module, batch, "eval_data")
    keep = np.flatnonzero(eval_common.valid_rows(batch))
    if not len(keep):
      continue
    keep = keep[:num - len(records)]
    r = reconstruct(model, np.asarray(batch["audio"])[keep], np.asarray(batch["frames"])[keep],
                    mask_ratio, jax.random.fold_in(key, index))
    ids = batch.get("clip_id")
    for j, row in enumerate(keep):
      n = len(records)
      stem = f"clip{n:03d}_{_safe_name(ids[row]) if ids is not None else 'clip'}"
      frame_png, spec_png = f"{stem}_frame.png", f"{stem}_spectrogram.png"
      render_frame(r["frames"][j], r["frames_masked"][j], r["frames_recon"][j],
                   r["mask_v"][j], module.video_grid, module.patch_size, mask_ratio
                   ).save(os.path.join(out, frame_png))
      figure = render_spectrogram(r["audio"][j], r["audio_masked"][j], r["audio_recon"][j],
                                  r["mask_a"][j], module.audio_grid, module.patch_size,
                                  mask_ratio)
      with open(os.path.join(out, spec_png), "wb") as f:
        f.write(plots.figure_png(figure))
      records.append({"frame": frame_png, "spectrogram": spec_png,
                      "mse_masked_audio": float(r["mse_a"][j]),
                      "mse_masked_frame": float(r["mse_v"][j])})
    if len(records) >= num:
      break
  if not records:
    raise InpaintError("the data held no clips")
  with open(os.path.join(out, "inpaint.json"), "w") as f:
    json.dump({"mask_ratio": mask_ratio, "seed": seed,
               "norm_pix_loss": bool(module.norm_pix_loss), "clips": records}, f, indent=2)
  return records


def run(config: ml_collections.ConfigDict, checkpoint_path: str, out: str, num: int = 4,
        mask_ratio: float = 0.75, seed: int = 0, step: Optional[int] = None,
        batches: Optional[Iterable[Mapping[str, Any]]] = None) -> list[dict]:
  model, where = cli.load_model(checkpoint_path, step)
  check_model(model)  # before reading any data
  if batches is None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval_data.eval_all_frames = False
    batches = cli.input_iterator(config, "eval_data")
  records = write_pictures(model, batches, out, num, mask_ratio, seed)
  print(f"inpainting by {where}: {len(records)} clips in {out}")
  return records


def _define_flags() -> None:
  cli.define_model_flags("configs/FILE.py[:args]; clips come from its eval_data section.",
                         "A pretraining model: model directory, training workdir or "
                         "reference .pth.")
  flags.DEFINE_string("out", None, "Directory for the PNGs and inpaint.json.")
  flags.DEFINE_integer("num", 4, "How many clips to draw.")
  flags.DEFINE_float("mask_ratio", 0.75, "Fraction of patches removed, audio and video.")
  flags.DEFINE_integer("seed", 0, "Seed of the masks.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


def main(argv):
  with cli.command(argv, InpaintError, eval_common.EvaluationError) as f:
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    records = run(f.config, f.checkpoint, f.out, f.num, f.mask_ratio, f.seed, f.step)
  for r in records:
    print(f"  {r['frame']}  {r['spectrogram']}  masked-patch MSE audio "
          f"{r['mse_masked_audio']:.4f}, frame {r['mse_masked_frame']:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
