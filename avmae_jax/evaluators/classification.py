"""Clip classification, the evaluator of fine-tuning runs and `evaluate --task classify`.

The logits of a fine-tuned model in each asked mode go to the host, where the activation
(sigmoid: multi-label, mAP; softmax: single-label, accuracy) is taken in float64 (float32
sigmoids saturate to ties at 1.0) and, when the batches hold several frames per clip
([b, F, H, W, 3] for a model of single frames: the reference's final evaluation over 10
frames), averaged over the frames; then `metrics.classification_metrics` (cav-mae spec
section 6). Frames go through the model one at a time (`lax.map`), so memory stays that of
a single-frame batch. Single-frame passes also give the mean per-clip loss (BCE for
sigmoid, cross-entropy against the labels for softmax, `losses.classification_loss`).
"""

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax.evaluators import common
from avmae_jax.evaluators import metrics
from avmae_jax.models import common as models_common
from avmae_jax.models import losses
from avmae_jax.models.common import AVModel

ACTIVATIONS = ("sigmoid", "softmax")
_LOSS = {"sigmoid": "bce", "softmax": "ce"}  # the loss that goes with each activation


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
  """Sigmoid or softmax (over classes) in float64."""
  logits = np.asarray(logits, np.float64)
  if activation == "sigmoid":
    return 1.0 / (1.0 + np.exp(-logits))
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


class Classification:
  """Classification figures of a fine-tuned model's parameters over one evaluation pass.

  modes: the modes to score (each must be one of the model's). activation: sigmoid or
  softmax. mesh, param_shardings: as in `retrieval.Retrieval`.
  """

  def __init__(self, module: AVModel, mesh: jax.sharding.Mesh, modes: Sequence[str],
               activation: str, param_shardings: Any = None, section: str = "eval_data"):
    if not module.is_classifier:
      raise common.EvaluationError(f"classification needs a fine-tuned model; this is a "
                                   f"{module.kind} model")
    for mode in modes:
      if mode not in module.modes():
        raise common.EvaluationError(f"mode must be one of {module.modes()} for this "
                                     f"{module.kind} model, got {mode!r}")
    if activation not in ACTIVATIONS:
      raise common.EvaluationError(f"activation must be sigmoid or softmax, got "
                                   f"{activation!r}")
    self.module, self.modes, self.activation = module, tuple(modes), activation
    self.section = section
    clip_ndim = common.frames_ndim(module)

    def predict(params, batch, key, aux):
      del key, aux
      out = {"labels": batch["labels"]}
      several = "frames" in batch and batch["frames"].ndim == clip_ndim + 1  # per clip
      for mode in self.modes:
        audio = batch["audio"] if models_common.uses_audio(mode) else None
        frames = batch["frames"] if models_common.uses_video(mode) else None
        logits = lambda f, a=audio, m=mode: module.apply({"params": params}, a, f, m)
        if frames is not None and several:
          out[f"logits/{mode}"] = jnp.moveaxis(jax.lax.map(logits, jnp.moveaxis(frames, 1, 0)),
                                               0, 1)
          continue
        out[f"logits/{mode}"] = logits(frames)
        if not several:
          out[f"loss/{mode}"] = losses.classification_loss(out[f"logits/{mode}"],
                                                           batch["labels"], _LOSS[activation])
      return out

    if param_shardings is None:
      self.fn = common.MeshFunction.for_module(predict, module, mesh)
    else:
      self.fn = common.MeshFunction(predict, mesh, param_shardings)
    self.keys = tuple(k for k, used in (
        ("audio", any(models_common.uses_audio(m) for m in self.modes)),
        ("frames", any(models_common.uses_video(m) for m in self.modes))) if used)
    self.keys += ("labels",)

  def _check(self, batch: Mapping[str, Any]) -> None:
    common.check_batch(self.module, batch, self.section)
    if "labels" in batch and np.shape(batch["labels"])[1] != self.module.num_classes:
      raise common.EvaluationError(
          f"the data has {np.shape(batch['labels'])[1]} classes, the model's head "
          f"{self.module.num_classes}")

  def batch_scores(self, out: Mapping[str, np.ndarray]) -> dict:
    """Per mode: scores [B, C] (averaged over frames), frames averaged, and the per-clip
    losses [B] (None when the batch held several frames per clip)."""
    result = {}
    for mode in self.modes:
      logits = out[f"logits/{mode}"]
      per_frame = logits.ndim == 3
      scores = activate(logits, self.activation)
      result[mode] = {"scores": scores.mean(axis=1) if per_frame else scores,
                      "frames": logits.shape[1] if per_frame else 1,
                      "loss": out.get(f"loss/{mode}")}
    return result

  def run(self, params: Any, batches: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    """Per mode: `metrics.classification_metrics` figures, "frames" (frames per clip the
    scores average over) and "loss" (mean per-clip loss; None when frames were averaged)."""
    scores = {m: [] for m in self.modes}
    per_clip_losses = {m: [] for m in self.modes}
    frames, labels = {m: 1 for m in self.modes}, []
    for out, keep in common.passes((self.fn,), params, batches, self.keys, self._check):
      labels.append(np.asarray(out.pop("labels"), np.float32)[keep])
      for mode, got in self.batch_scores(out).items():
        scores[mode].append(got["scores"][keep])
        frames[mode] = got["frames"]
        if got["loss"] is not None:
          per_clip_losses[mode].append(got["loss"][keep])
    labels = np.concatenate(labels)
    results = {}
    for mode in self.modes:
      figures = metrics.classification_metrics(np.concatenate(scores[mode]), labels,
                                               multilabel=self.activation == "sigmoid")
      figures["frames"] = frames[mode]
      figures["loss"] = (float(np.concatenate(per_clip_losses[mode]).mean())
                         if per_clip_losses[mode] else None)
      results[mode] = figures
    return results
