r"""Downstream evaluation of a model: audio<->video retrieval or clip classification.

  python -m avmae_jax.evaluate --config configs/demo.py --workdir DIR --task retrieval
  python -m avmae_jax.evaluate --config configs/cav_mae_finetune.py:... --workdir DIR \
      --task classify [--mode audioonly] [--average_frames] [--activation softmax]
  python -m avmae_jax.evaluate --config ... --workdir DIR --task retrieval \
      --checkpoint cav-mae-scale++.pth          # a reference .pth or a model directory

The model is the latest checkpoint of the workdir (a training workdir, see checkpoint.py)
or --checkpoint (anything `avmae_jax.load` opens). Inputs come from the config's
`eval_data` section (one ordered pass, frame 5, no augmentation; the padding of the last
batch, mask 0, is left out). Results go to DIR/eval_retrieval.json or
DIR/eval_classify_<mode>.json, and a short table to stdout.

Retrieval (spec section 7): forward_feat, mean over tokens, then
`metrics.retrieval_metrics` (the function the training-time evaluation uses): R@1/5/10
and median rank, audio->video and video->audio. Classification (spec section 6): logits
of a fine-tuned model in the chosen mode, sigmoid (multi-label, mAP) or softmax
(single-label, accuracy), optionally averaged over the 10 frames of each clip, then
`metrics.classification_metrics` with per-class AP.

MAViL models take a clip of frames ([b, 8, H, W, 3], the config's eval_data in mavil
mode: the centred window at 2 frames/s): retrieval pools each modality's ViT outputs
(`forward_feat`, no fusion); classify takes mavil_ft models in the modes their heads
have; --average_frames is CAV-MAE's and does not apply.

The command's work is `run`, over the evaluators the training loop uses too
(avmae_jax/evaluators), on the config's mesh; tests pass in-memory batches to it. Flags are
defined only when this file runs as a script, so that importing it defines none.
"""

import json
import os
from typing import Any, Iterable, Mapping, Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from avmae_jax import api
from avmae_jax import cli
from avmae_jax import models
from avmae_jax.checkpoints import model_dir
from avmae_jax.evaluators import classification as classification_lib
from avmae_jax.evaluators import metrics as metrics_lib
from avmae_jax.evaluators import retrieval as retrieval_lib
from avmae_jax.evaluators.common import EvaluationError
from avmae_jax.models import common as models_common

TASKS = ("retrieval", "classify")
ACTIVATIONS = ("auto",) + classification_lib.ACTIVATIONS
# config.loss values of fine-tuning configs that mean single-label softmax cross-entropy.
SOFTMAX_LOSSES = ("ce", "cross_entropy", "softmax", "softmax_cross_entropy")


def pooled_features(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
                    mesh: Optional[jax.sharding.Mesh] = None) -> tuple[np.ndarray, np.ndarray]:
  """Mean-pooled forward_feat vectors [N, D] of every real clip, audio and video."""
  evaluator = retrieval_lib.Retrieval(model.module, mesh or cli.evaluation_mesh(None))
  audio, video, _ = evaluator.features(model.params, batches)
  return audio, video


def retrieval(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
              mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """R@1/5/10 (percent) and median rank both ways, plus chance R@K."""
  evaluator = retrieval_lib.Retrieval(model.module, mesh or cli.evaluation_mesh(None))
  results = evaluator.run(model.params, batches)
  for k in (1, 5, 10):
    results[f"chance_r{k}"] = metrics_lib.chance_recall(results["num_clips"], k)
  return results


def resolve_activation(activation: str, config: Optional[ml_collections.ConfigDict]) -> str:
  """auto: softmax if the config trains with softmax cross-entropy (config.loss), else
  sigmoid (the multi-label AudioSet setting)."""
  if activation not in ACTIVATIONS:
    raise EvaluationError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if activation != "auto":
    return activation
  loss = str((config or {}).get("loss", "") or "").lower()
  return "softmax" if loss in SOFTMAX_LOSSES else "sigmoid"


def require_finetuned(model: api.LoadedModel, source: str = "the model") -> None:
  if not model.module.is_classifier:
    raise EvaluationError(
        f"--task classify needs a fine-tuned model ({' or '.join(models.classifier_kinds())}) "
        f"with a classification head; {source} is a {model.kind} (pretraining) model. "
        "Fine-tune it first, or use --task retrieval")


def classification(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
                   mode: str = "multimodal", activation: str = "sigmoid",
                   mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """Scores of a fine-tuned model: sigmoid or softmax outputs, averaged over the frames
  when the batches hold all 10 ([b, 10, H, W, 3]), then classification_metrics."""
  require_finetuned(model)
  evaluator = classification_lib.Classification(model.module, mesh or cli.evaluation_mesh(None),
                                                (mode,), activation)
  results = evaluator.run(model.params, batches)[mode]
  frames_averaged = results.pop("frames")
  results.pop("loss")
  results.update(mode=mode, activation=activation, frames_averaged=frames_averaged)
  return results


# -- The command -----------------------------------------------------------------------------


def results_path(workdir: str, task: str, mode: str = "multimodal") -> str:
  name = "eval_retrieval.json" if task == "retrieval" else f"eval_classify_{mode}.json"
  return os.path.join(workdir, name)


def run(config: Optional[ml_collections.ConfigDict], workdir: str, task: str,
        checkpoint_path: str = "", step: Optional[int] = None, mode: str = "",
        activation: str = "auto", average_frames: bool = False,
        batches: Optional[Iterable[Mapping[str, Any]]] = None) -> dict[str, Any]:
  """Evaluates and writes the results JSON into `workdir`; returns the results.

  batches: in-memory batches to use instead of the config's eval_data (tests).
  """
  if task not in TASKS:
    raise EvaluationError(f"task must be one of {TASKS}, got {task!r}")
  if config is not None:
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  source = checkpoint_path or workdir
  if not checkpoint_path and not model_dir.is_model_dir(workdir):
    raise EvaluationError(f"{workdir} holds no model checkpoint; train there first or pass "
                          "--checkpoint (a model directory or a reference .pth)")
  model, where = cli.load_model(source, step)
  if task == "classify":  # before reading any data
    require_finetuned(model, source)
  mode = (mode or (config.get("mode", "") if config is not None else "")
          or (model.module.modes()[0] if task == "classify" else "multimodal"))
  if task == "classify" and average_frames and model.module.frames_per_input > 1:
    raise EvaluationError("--average_frames averages CAV-MAE's outputs over 10 single "
                          f"frames; a {model.kind} model takes a clip of "
                          f"{model.module.frames_per_input} frames at once")
  activation = resolve_activation(activation, config)
  if batches is None:
    if config is None:
      raise EvaluationError("need a config (its eval_data section) or batches")
    # Retrieval uses frame 5 (spec 7); classification optionally all 10 frames.
    config.eval_data.eval_all_frames = task == "classify" and bool(average_frames)
    batches = cli.input_iterator(config, "eval_data")
  mesh = cli.evaluation_mesh(config)
  if task == "retrieval":
    results = retrieval(model, batches, mesh)
  else:
    results = classification(model, batches, mode, activation, mesh)
  results = {"task": task, "model": where, **results}
  if config is not None and "eval_data" in config:
    results["split"] = config.eval_data.get("split", "")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = results_path(workdir, task, mode)
    with open(path, "w") as f:
      json.dump(results, f, indent=2, allow_nan=True)
    results["results_file"] = path
  return results


def format_table(results: Mapping[str, Any]) -> str:
  """A short human-readable summary of `run`'s results."""
  lines = [f"{results['task']} on {results['num_clips']} clips; model: {results['model']}"]
  if results["task"] == "retrieval":
    lines.append(f"{'':14s}{'R@1':>7s}{'R@5':>7s}{'R@10':>7s}{'median rank':>13s}")
    for name, key in (("audio->video", "a2v"), ("video->audio", "v2a")):
      lines.append(f"{name:14s}" + "".join(f"{results[f'{key}_r{k}']:7.1f}" for k in (1, 5, 10))
                   + f"{results[f'{key}_median_rank']:13.1f}")
    lines.append(f"{'chance':14s}" + "".join(f"{results[f'chance_r{k}']:7.1f}"
                                            for k in (1, 5, 10)))
  else:
    frames = (f", outputs averaged over {results['frames_averaged']} frames"
              if results["frames_averaged"] > 1 else "")
    lines.append(f"mode {results['mode']}, {results['activation']}{frames}; primary metric "
                 f"{results['primary']}")
    lines.append(f"{'mAP':>8s}{'mAUC':>8s}{'d_prime':>9s}{'accuracy':>10s}{'classes':>9s}")
    lines.append(f"{results['mAP']:8.4f}{results['mAUC']:8.4f}{results['d_prime']:9.3f}"
                 f"{results['accuracy']:10.4f}"
                 f"{results['num_classes_scored']:>5d}/{results['num_classes']}")
  if "results_file" in results:
    lines.append(f"written to {results['results_file']}")
  return "\n".join(lines)


def _define_flags() -> None:
  # --config, --checkpoint and --step, as inpaint.py and extract.py define them (cli.py)
  cli.define_model_flags(
      "configs/FILE.py[:args]; its eval_data section is the evaluation data.",
      "A model directory, training workdir or reference .pth to evaluate instead of the "
      "workdir's latest checkpoint.", checkpoint_default="")
  flags.DEFINE_string("workdir", None, "Results go here; also the model, when --checkpoint "
                      "is not given (the latest training checkpoint).")
  flags.DEFINE_enum("task", None, list(TASKS), "What to evaluate.")
  flags.DEFINE_enum("mode", None, list(models_common.MODES), "classify: which inputs the "
                    "fine-tuned model sees (default config.mode, else multimodal).")
  flags.DEFINE_enum("activation", "auto", list(ACTIVATIONS), "classify: sigmoid (multi-"
                    "label, mAP) or softmax (single-label, accuracy); auto follows "
                    "config.loss.")
  flags.DEFINE_bool("average_frames", False, "classify: average the outputs over all 10 "
                    "frames of each clip (the reference's final evaluation).")
  flags.mark_flags_as_required(["config", "workdir", "task"])


def main(argv):
  with cli.command(argv, EvaluationError) as f:
    results = run(f.config, f.workdir, f.task, f.checkpoint, f.step, f.mode or "",
                  f.activation, f.average_frames)
  print(format_table(results))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
