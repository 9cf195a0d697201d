"""Classification: fine-tuning and linear probing of a model with classification heads.

The loss is `config.loss` on the logits of `config.mode` (multimodal, audioonly,
videoonly): "bce" (BCE with logits, mean over clips and classes: AudioSet, multi-label) or
"ce" (cross-entropy against the soft targets of mixup and label smoothing: VGGSound), with
the model's stochastic depth on (a "dropout" rng). Linear probing is the same task with
everything but the head frozen (`optimizer.frozen`).

Evaluation is `evaluators.classification.Classification` in every mode of
`config.eval_modes` (config.mode first): eval_mAP, eval_mAUC, eval_d_prime, eval_accuracy,
eval_loss for config.mode and eval_<mode>_<figure> for the others, plus num_clips and
frames. At the end of a run, with weight averaging (config.wa_start..wa_end) the averaged
model is written to DIR/averaged (a model directory); the final model (the averaged one,
else the last) is evaluated once more, averaging its sigmoid (bce) or softmax (ce) outputs
over the 10 frames of each clip when config.final_eval_all_frames and the model takes single
frames (the reference's final evaluation; a mode that sees no frames is scored once), and
the figures with the per-class AP go to DIR/final_eval.json (and a "final_eval" record in
metrics.jsonl).
"""

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections

from avmae_jax import models
from avmae_jax.checkpoints import model_dir
from avmae_jax.evaluators import classification
from avmae_jax.models import common as models_common
from avmae_jax.models import losses
from avmae_jax.models.common import AVModel
from avmae_jax.tasks import base

LOSSES = losses.CLASSIFICATION_LOSSES
ACTIVATION = {"bce": "sigmoid", "ce": "softmax"}
AVERAGED_DIR = "averaged"  # the weight-averaged model of a fine-tuning run
FINAL_EVAL_JSON = "final_eval.json"
_FIGURES = ("mAP", "mAUC", "d_prime", "accuracy")


class Classification(base.Task):
  """Reads and checks config.mode, config.loss and config.eval_modes against the model."""

  def __init__(self, config: ml_collections.ConfigDict, module: AVModel):
    super().__init__(config, module)
    modes = module.modes()
    self.mode = config.get("mode", "multimodal")
    if self.mode not in models_common.TRAIN_MODES:
      raise ValueError(f"config.mode must be one of {models_common.TRAIN_MODES} for "
                       f"training, got {self.mode!r}")
    if self.mode not in modes:
      raise ValueError(f"config.mode={self.mode!r} needs a head this model does not have "
                       f"(config.model.heads={config.model.get('heads')!r} gives {modes})")
    self.loss_name = config.get("loss", "bce")
    if self.loss_name not in LOSSES:
      raise ValueError(f"config.loss must be one of {LOSSES}, got {self.loss_name!r}")
    extra = config.get("eval_modes", ()) or ()
    if isinstance(extra, str):
      raise ValueError(f"config.eval_modes must be a list of modes, got {extra!r}")
    for m in extra:
      if m not in modes:
        raise ValueError(f"config.eval_modes: {m!r} is not one of this model's modes {modes}")
    self.eval_modes = tuple(dict.fromkeys([self.mode, *extra]))

  @property
  def train_keys(self) -> tuple[str, ...]:
    keys = ("audio",) if models_common.uses_audio(self.mode) else ()
    keys += ("frames",) if models_common.uses_video(self.mode) else ()
    return keys + ("labels",)

  def loss(self, params, batch, rng, aux):
    del aux
    audio = batch["audio"] if models_common.uses_audio(self.mode) else None
    frames = batch["frames"] if models_common.uses_video(self.mode) else None
    logits = self.module.apply({"params": params}, audio, frames, self.mode,
                               rngs={"dropout": rng})
    loss = losses.classification_loss(logits, batch["labels"], self.loss_name).mean()
    return loss, {"loss": loss}

  def evaluator(self, mesh, param_shardings, aux_shardings) -> base.Evaluator:
    del aux_shardings
    scores = classification.Classification(self.module, mesh, self.eval_modes,
                                           ACTIVATION[self.loss_name], param_shardings)

    def evaluate(params, batches, aux=None):
      del aux
      by_mode = scores.run(params, batches)
      results = {"num_clips": by_mode[self.mode]["num_clips"],
                 "frames": max(f["frames"] for f in by_mode.values())}
      per_class_ap = {}
      for m, figures in by_mode.items():
        prefix = "eval_" if m == self.mode else f"eval_{m}_"
        for name in _FIGURES:
          results[prefix + name] = figures[name]
        if figures["loss"] is not None:
          results[prefix + "loss"] = figures["loss"]
        per_class_ap[m] = [None if math.isnan(ap) else ap for ap in figures["per_class_ap"]]
      return results, {"per_class_ap": per_class_ap}

    return evaluate

  @property
  def final_eval_all_frames(self) -> bool:
    return (bool(self.config.get("final_eval_all_frames", False))
            and self.module.frames_per_input == 1
            and any(models_common.uses_video(m) for m in self.eval_modes))

  def finish(self, trainer, state, workdir, final_batches, writer) -> dict:
    params, which = state.params, "last"
    if trainer.wa_range is not None:
      count = int(jax.device_get(state.wa_count))
      if count:
        params, which = trainer.wa_average(state), "averaged"
        path = model_dir.save_model(os.path.join(workdir, AVERAGED_DIR),
                                    models.model_config(self.module),
                                    trainer.native_params(params), overwrite=True)
        print(f"weight averaging: the mean of the parameters at the end of epochs "
              f"{trainer.wa_range[0]}..{trainer.wa_range[1]} ({count} checkpoints) is in "
              f"{path}", flush=True)
    if final_batches is None:
      return {}
    results, extras = trainer.evaluate(params, final_batches)
    step = int(jax.device_get(state.step))
    results["model"] = which
    writer.write(step, results, kind="final_eval")
    if jax.process_index() == 0:
      record = dict(results, step=step, mode=self.mode, loss=self.loss_name, **extras)
      with open(os.path.join(workdir, FINAL_EVAL_JSON), "w") as f:
        json.dump(_finite_or_none(record), f, indent=1, allow_nan=False)
    return results

  def summary(self, results: Mapping[str, Any]) -> Optional[str]:
    if "eval_accuracy" not in results:
      return None
    n = self.module.frames_per_input
    if n > 1:  # one clip of n frames is one input
      inputs = f"clips of {n} frames"
    else:
      inputs = f"{results['frames']} frame{'s' if results['frames'] > 1 else ''} per clip"
    return (f"held-out classification on {results['num_clips']} clips ({self.mode}, "
            f"{results.get('model', 'last')} model, {inputs}): accuracy "
            f"{100 * results['eval_accuracy']:.1f}% (chance "
            f"{100 / self.module.num_classes:.1f}%), mAP {100 * results['eval_mAP']:.1f}, "
            f"mAUC {results['eval_mAUC']:.3f}")


def _finite_or_none(value):
  """JSON has no NaN: undefined figures (e.g. mAUC without negatives) become null."""
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
