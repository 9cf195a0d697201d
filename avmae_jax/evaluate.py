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

The library functions (`load_model`, `input_iterator`, `retrieval`, `classification`,
`run`) are what the command calls; tests pass in-memory batches to them. inpaint.py and
extract.py share `load_model` and `input_iterator`. Flags are defined only when this
file runs as a script, so that importing it defines none.
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
from avmae_jax import checkpoint
from avmae_jax import cli
from avmae_jax import metrics as metrics_lib
from avmae_jax.models import cav_mae

TASKS = ("retrieval", "classify")
ACTIVATIONS = ("auto", "sigmoid", "softmax")
# config.loss values of fine-tuning configs that mean single-label softmax cross-entropy.
SOFTMAX_LOSSES = ("ce", "cross_entropy", "softmax", "softmax_cross_entropy")
AUDIO_MODES = ("audioonly", "missingaudioonly")
VIDEO_MODES = ("videoonly", "missingvideoonly")


class EvaluationError(Exception):
  """A request that cannot be evaluated (wrong model kind, missing checkpoint, bad inputs)."""


# -- Model and inputs ------------------------------------------------------------------------


def load_model(path: str, step: Optional[int] = None) -> tuple[api.LoadedModel, str]:
  """Opens a model directory, training workdir (latest or `step`) or reference `.pth`.

  Returns the model and a one-line description of where it came from.
  """
  if not path:
    raise EvaluationError("no checkpoint given")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise EvaluationError(f"checkpoint {path} does not exist")
  if os.path.isdir(path) and not checkpoint.is_model_dir(path):
    raise EvaluationError(
        f"{path} is not a model checkpoint: expected {checkpoint.MODEL_JSON} with "
        f"{checkpoint.PARAMS_DIR}/ (an exported model) or {checkpoint.TRAIN_CHECKPOINT_DIR}/ "
        "(a training workdir)")
  model = api.load(path, step=step)  # names a missing step or an unfinished workdir
  where = path
  if os.path.isdir(path) and not os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
    where += f" (step {checkpoint.train_steps(path)[-1] if step is None else step})"
  return model, f"{model.kind} from {where}"


def input_iterator(config: ml_collections.ConfigDict, section: str = "eval_data"):
  """The pipeline iterator of `config[section]`, preparing the synthetic dataset if the
  config asks for it (as training does). Imports TensorFlow."""
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if section not in config:
    raise EvaluationError(f"the config has no {section} section")
  builders.prepare_for_config(config)
  return pipeline.create_iterator(config[section])


def frames_ndim(model: api.LoadedModel) -> int:
  """Dimensions of one batch of the frames the model takes: 4 (CAV-MAE: [b, H, W, 3]) or
  5 (MAViL: [b, N, H, W, 3])."""
  return len(api.example_inputs(model.module)[1].shape)


def check_batch(model: api.LoadedModel, batch: Mapping[str, Any], section: str) -> None:
  """Raises naming the config field when the data's shapes do not fit the model."""
  module = model.module
  audio, frames = np.shape(batch["audio"]), np.shape(batch["frames"])
  if audio[1:] != (module.audio_length, module.num_mel_bins):
    raise EvaluationError(
        f"the model takes audio [batch, {module.audio_length}, {module.num_mel_bins}], the "
        f"data gives {audio}: set config.{section}.target_length={module.audio_length}")
  if frames[-3:] != (module.img_size, module.img_size, module.in_chans):
    raise EvaluationError(
        f"the model takes frames of {module.img_size}x{module.img_size}x{module.in_chans}, "
        f"the data gives {frames}: check config.{section}.frame_size and frame_resize")
  if frames_ndim(model) == 5 and (len(frames) != 5 or frames[1] != module.num_frames):
    raise EvaluationError(
        f"the model takes clips of {module.num_frames} frames [batch, {module.num_frames}, "
        f"H, W, 3], the data gives {frames}: set config.{section}.mode='mavil' and "
        f"num_frames={module.num_frames}")


def valid_rows(batch: Mapping[str, Any]) -> np.ndarray:
  """Which rows are real clips (the pipeline pads the last evaluation batch, mask 0)."""
  n = np.shape(batch["audio"])[0]
  if "mask" not in batch:
    return np.ones(n, bool)
  return np.asarray(batch["mask"]) > 0


def gather_hosts(x: np.ndarray) -> np.ndarray:
  """Rows of every host, in host order (the identity on one host). Every host yields the
  same number of padded batches, so the shapes agree."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# -- Tasks -----------------------------------------------------------------------------------


def pooled_features(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
                    section: str = "eval_data") -> tuple[np.ndarray, np.ndarray]:
  """Mean-pooled forward_feat vectors [N, D] of every real clip, audio and video."""
  audio, video, valid = [], [], []
  for index, batch in enumerate(batches):
    if index == 0:
      check_batch(model, batch, section)
    if np.ndim(batch["frames"]) != frames_ndim(model):
      raise EvaluationError(f"retrieval uses one frame per clip; got frames of shape "
                            f"{np.shape(batch['frames'])} (set config.{section}."
                            "eval_all_frames=False)")
    feats = model.features(batch["audio"], batch["frames"], pooled=True)
    audio.append(feats["audio"])
    video.append(feats["video"])
    valid.append(valid_rows(batch))
  if not audio:
    raise EvaluationError("the evaluation data is empty")
  keep = gather_hosts(np.concatenate(valid))
  return (gather_hosts(np.concatenate(audio))[keep],
          gather_hosts(np.concatenate(video))[keep])


def retrieval(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
              section: str = "eval_data") -> dict[str, Any]:
  """R@1/5/10 (percent) and median rank both ways, plus chance R@K."""
  audio, video = pooled_features(model, batches, section)
  results = metrics_lib.retrieval_metrics(audio, video)
  for k in (1, 5, 10):
    results[f"chance_r{k}"] = metrics_lib.chance_recall(results["num_clips"], k)
  return results


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  if activation == "sigmoid":
    return 1.0 / (1.0 + np.exp(-logits))
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


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
  if model.kind not in api.FINETUNED_KINDS:
    raise EvaluationError(
        f"--task classify needs a fine-tuned model ({' or '.join(api.FINETUNED_KINDS)}) "
        f"with a classification head; {source} is a {model.kind} (pretraining) model. "
        "Fine-tune it first, or use --task retrieval")


def model_modes(model: api.LoadedModel) -> tuple[str, ...]:
  """The classification modes a fine-tuned model has (MAViL: those of its heads)."""
  if hasattr(model.module, "modes"):
    return tuple(model.module.modes())
  return tuple(cav_mae.FT_MODES)


def classification(model: api.LoadedModel, batches: Iterable[Mapping[str, Any]],
                   mode: str = "multimodal", activation: str = "sigmoid",
                   section: str = "eval_data") -> dict[str, Any]:
  """Scores of a fine-tuned model: sigmoid or softmax outputs, averaged over the frames
  when the batches hold all 10 ([b, 10, H, W, 3]), then classification_metrics."""
  require_finetuned(model)
  if mode not in model_modes(model):
    raise EvaluationError(f"mode must be one of {model_modes(model)} for this "
                          f"{model.kind} model, got {mode!r}")
  if activation not in ("sigmoid", "softmax"):
    raise EvaluationError(f"activation must be sigmoid or softmax, got {activation!r}")
  scores, labels, valid = [], [], []
  frames_averaged = 1
  for index, batch in enumerate(batches):
    if index == 0:
      check_batch(model, batch, section)
    if "labels" not in batch:
      raise EvaluationError("the evaluation batches hold no labels")
    if np.shape(batch["labels"])[1] != model.module.num_classes:
      raise EvaluationError(
          f"the data has {np.shape(batch['labels'])[1]} classes, the model's head "
          f"{model.module.num_classes}")
    audio = None if mode in VIDEO_MODES else batch["audio"]
    frames = np.asarray(batch["frames"])
    if mode in AUDIO_MODES:  # frames unused: one pass whatever their number
      probs = _activate(model.classify(audio, None, mode), activation)
    elif frames.ndim == frames_ndim(model) + 1:  # [b, 10, H, W, 3]: average over frames
      frames_averaged = frames.shape[1]
      probs = np.mean([_activate(model.classify(audio, frames[:, i], mode), activation)
                       for i in range(frames.shape[1])], axis=0)
    else:
      probs = _activate(model.classify(audio, frames, mode), activation)
    scores.append(probs)
    labels.append(np.asarray(batch["labels"], np.float32))
    valid.append(valid_rows(batch))
  if not scores:
    raise EvaluationError("the evaluation data is empty")
  keep = gather_hosts(np.concatenate(valid))
  scores = gather_hosts(np.concatenate(scores))[keep]
  labels = gather_hosts(np.concatenate(labels))[keep]
  results = metrics_lib.classification_metrics(scores, labels,
                                               multilabel=activation == "sigmoid")
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
  if not checkpoint_path and not checkpoint.is_model_dir(workdir):
    raise EvaluationError(f"{workdir} holds no model checkpoint; train there first or pass "
                          "--checkpoint (a model directory or a reference .pth)")
  model, where = load_model(source, step)
  if task == "classify":  # before reading any data
    require_finetuned(model, source)
  mode = (mode or (config.get("mode", "") if config is not None else "")
          or (model_modes(model)[0] if task == "classify" else "multimodal"))
  if task == "classify" and average_frames and frames_ndim(model) == 5:
    raise EvaluationError("--average_frames averages CAV-MAE's outputs over 10 single "
                          f"frames; a {model.kind} model takes a clip of "
                          f"{model.module.num_frames} frames at once")
  activation = resolve_activation(activation, config)
  if batches is None:
    if config is None:
      raise EvaluationError("need a config (its eval_data section) or batches")
    # Retrieval uses frame 5 (spec 7); classification optionally all 10 frames.
    config.eval_data.eval_all_frames = task == "classify" and bool(average_frames)
    batches = input_iterator(config, "eval_data")
  if task == "retrieval":
    results = retrieval(model, batches)
  else:
    results = classification(model, batches, mode, activation)
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
  flags.DEFINE_enum("mode", None, list(cav_mae.FT_MODES), "classify: which inputs the "
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
