r"""Training: one script for CAV-MAE and MAViL pretraining, fine-tuning and linear probing,
on one CPU or a TPU pod.

  python -m avmae_jax.train --config configs/demo.py --workdir /tmp/demo
  python -m avmae_jax.train --config configs/cav_mae_pretrain.py:size=base,data=audioset \
      --workdir gs://bucket/run --config.batch_size=256 --distributed
  python -m avmae_jax.train --config configs/cav_mae_finetune.py:recipe=as20k \
      --workdir DIR --config.init_from=cav-mae-scale++.pth
  python -m avmae_jax.train --config configs/mavil_pretrain.py:size=base --workdir S1
  python -m avmae_jax.train --config configs/mavil_pretrain.py:size=base,stage=2 \
      --config.teacher=S1 --workdir S2        # round 2: --config.teacher=S2 --workdir S3

MAViL stage 2 (self-training): the teacher (config.teacher, a stage-1 or stage-2 workdir or
model directory) is loaded once, frozen, outside the train state; the step it was taken
at is pinned in DIR/teacher.json, so that a resumed run keeps the same teacher even if
the teacher's run has gone on (a different config.teacher is then an error).

Sections below: distributed runtime and mesh; input; model, optimizer and sharded state;
checkpoint (restore or init); the loop (update, weight averaging, metrics, checkpoints,
preemption, evaluation); the end of a fine-tuning run. The workdir holds checkpoints/
(orbax: train state + input-iterator state), metrics.jsonl, tensorboard/ and model.json
(the model config of the run).

Fine-tuning (model.kind = "cav_mae_ft" or "mavil_ft"): periodic evaluation scores the
held-out split (frame 5; MAViL: the centred clip) in every mode of config.eval_modes: mAP,
mAUC, d', accuracy and the loss. At the end, with weight averaging (config.wa_start..wa_end)
the averaged model is written to DIR/averaged (a model checkpoint directory); the final
model (the averaged one, else the last) is evaluated once more, averaging its sigmoid (bce)
or softmax (ce) outputs over the 10 frames of each clip when config.final_eval_all_frames
(the reference's final evaluation, CAV-MAE only; skipped for modes that see no frames),
and the figures with the per-class AP go to DIR/final_eval.json (also a "final_eval" record
in metrics.jsonl).
"""

import json
import math
import os
import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from avmae_jax import checkpoint as model_checkpoint
from avmae_jax import metrics as metrics_lib
from avmae_jax import models
from avmae_jax import sharding
from avmae_jax import summary
from avmae_jax import trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:args]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods and GPU "
    "clusters; the launch/ scripts set it).")
flags.mark_flags_as_required(["config", "workdir"])

CHECKPOINT_DIR = model_checkpoint.TRAIN_CHECKPOINT_DIR
AVERAGED_DIR = "averaged"  # the weight-averaged model of a fine-tuning run
FINAL_EVAL_JSON = "final_eval.json"
# Scalars the progress line shows when the run logs them.
_SHOWN = ("loss_mae_a", "loss_mae_v", "nce", "c_acc", "loss_rec_a", "loss_rec_v",
          "loss_inter", "acc_inter", "grad_norm")
TEACHER_JSON = "teacher.json"  # MAViL stage 2: which teacher checkpoint this run learns from


class StopTraining(Exception):
  """Ends the run with a message (non-finite loss, bad config)."""


def _validate(config: ml_collections.ConfigDict) -> None:
  for field in ("batch_size", "log_every", "checkpoint_every"):
    value = config.get(field)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field} must be a positive integer, got {value!r}")
  if not isinstance(config.get("eval_every"), int) or config.eval_every < -1:
    raise ValueError("config.eval_every must be a number of steps, 0 (never) or -1 (every "
                     f"epoch), got {config.get('eval_every')!r}")
  if config.total_steps == -1:
    if not isinstance(config.get("num_epochs"), int) or config.num_epochs < 1:
      raise ValueError("config.total_steps=-1 needs config.num_epochs >= 1, got "
                       f"{config.get('num_epochs')!r}")
  elif not isinstance(config.total_steps, int) or config.total_steps < 1:
    raise ValueError(f"config.total_steps must be >= 1 or -1 (from num_epochs), got "
                     f"{config.total_steps!r}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} must divide by the "
                     f"{jax.process_count()} hosts")


def _prepare_synthetic(config: ml_collections.ConfigDict) -> None:
  """Makes the built-in synthetic dataset if a config asks for it and it is not there."""
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  builders.prepare_for_config(config)


def _make_iterators(config):
  """(train, eval, final eval) iterators; the final one reads all 10 frames of each clip
  when config.final_eval_all_frames and a fine-tuning evaluation mode looks at frames."""
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config.data.batch_size = config.batch_size
  config.data.seed = config.seed
  train_iter = pipeline.create_iterator(config.data)
  eval_iter = final_iter = None
  if config.eval_every:
    eval_iter = pipeline.create_iterator(config.eval_data)
    eval_iter.initial_state = eval_iter.get_state()
    final_iter = eval_iter
    if (config.model.kind == "cav_mae_ft" and config.get("final_eval_all_frames", False)
        and any(trainer_lib.uses_video(m)
                for m in trainer_lib.finetune_settings(config).eval_modes)):
      final_data = ml_collections.ConfigDict(config.eval_data.to_dict())
      final_data.eval_all_frames = True
      final_iter = pipeline.create_iterator(final_data)
      final_iter.initial_state = final_iter.get_state()
  return train_iter, eval_iter, final_iter


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3), create=True,
      enable_async_checkpointing=config.get("async_checkpointing", True))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options, item_names=model_checkpoint.TRAIN_ITEM_NAMES)


def _save(manager, step, state, train_iter, force=False):
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(train_iter.get_state())), force=force)


def evaluate(trainer, params, eval_iter, step_key, teacher=()) -> dict:
  """Held-out figures of `params`: see evaluate_pretraining / evaluate_classification."""
  if trainer.finetune is not None:
    return evaluate_classification(trainer, params, eval_iter)[0]
  return evaluate_pretraining(trainer, params, eval_iter, step_key, teacher)


def evaluate_pretraining(trainer, params, eval_iter, step_key, teacher=()) -> dict:
  """Held-out MAE losses and contrastive accuracy (full batches) and retrieval R@K.

  The eval iterator makes one ordered pass; the last batch is padded (mask 0), and the
  padding is left out of every figure. teacher: MAViL stage 2's (teacher parameters,).
  """
  eval_iter.set_state(eval_iter.initial_state)
  sums, full_batches, audio_reps, video_reps = {}, 0, [], []
  for index, host_batch in enumerate(eval_iter):
    batch = trainer_lib.global_batch(trainer, trainer.eval_inputs(host_batch))
    out = trainer.eval_step(params, batch, jax.random.fold_in(step_key, index), *teacher)
    out = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)
    mask = out.pop("mask") > 0  # global, so every host agrees
    if mask.all():  # padded batches would bias the batch-mean losses
      full_batches += 1
      for key in trainer.pretrain_metrics:
        if key in out:
          sums[key] = sums.get(key, 0.0) + float(out[key])
    audio_reps.append(out["audio_rep"][mask])
    video_reps.append(out["video_rep"][mask])
  results = {f"eval_{k}": v / max(full_batches, 1) for k, v in sums.items()}
  results.update(metrics_lib.retrieval_metrics(np.concatenate(audio_reps),
                                               np.concatenate(video_reps)))
  return results


def evaluate_classification(trainer, params, eval_iter) -> tuple[dict, dict]:
  """Held-out classification figures of a fine-tuning model in each evaluation mode.

  Returns (results, per_class_ap): results holds eval_mAP, eval_mAUC, eval_d_prime,
  eval_accuracy, eval_loss (single-frame passes only) for config.mode and
  eval_<mode>_<figure> for the other modes of config.eval_modes, plus num_clips and
  frames (frames per clip the scores average over); per_class_ap maps each mode to its
  list of per-class APs (None for classes without a positive clip).
  """
  settings = trainer.finetune
  eval_iter.set_state(eval_iter.initial_state)
  scores = {m: [] for m in settings.eval_modes}
  losses = {m: [] for m in settings.eval_modes}
  targets, frames = [], 1
  for host_batch in eval_iter:
    inputs = trainer.eval_inputs(host_batch)
    if "frames" in inputs and np.ndim(inputs["frames"]) == trainer.frames_ndim + 1:
      frames = int(np.shape(inputs["frames"])[1])  # several inputs per clip, averaged
    out = trainer.eval_step(params, trainer_lib.global_batch(trainer, inputs), None)
    out = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)
    keep = out["mask"] > 0  # global, so every host agrees
    targets.append(out["labels"][keep])
    for m in settings.eval_modes:
      scores[m].append(out[f"scores/{m}"][keep])
      if f"loss/{m}" in out:
        losses[m].append(out[f"loss/{m}"][keep])
  targets = np.concatenate(targets)
  results, per_class_ap = {"num_clips": int(len(targets)), "frames": frames}, {}
  for m in settings.eval_modes:
    figures = metrics_lib.classification_metrics(np.concatenate(scores[m]), targets,
                                                 settings.multilabel)
    prefix = "eval_" if m == settings.mode else f"eval_{m}_"
    for name in ("mAP", "mAUC", "d_prime", "accuracy"):
      results[prefix + name] = figures[name]
    if losses[m]:
      results[prefix + "loss"] = float(np.concatenate(losses[m]).mean())
    per_class_ap[m] = [None if math.isnan(ap) else ap for ap in figures["per_class_ap"]]
  return results, per_class_ap


def _finish_finetuning(trainer, state, workdir, final_iter, writer) -> dict:
  """Writes the weight-averaged model and evaluates the final model (see the docstring)."""
  params, which = state.params, "last"
  if trainer.wa_range is not None:
    count = int(jax.device_get(state.wa_count))
    if count:
      params, which = trainer.wa_average(state), "averaged"
      path = model_checkpoint.save_model(os.path.join(workdir, AVERAGED_DIR),
                                         models.model_config(trainer.module), params,
                                         overwrite=True)
      print(f"weight averaging: the mean of the parameters at the end of epochs "
            f"{trainer.wa_range[0]}..{trainer.wa_range[1]} ({count} checkpoints) is in "
            f"{path}", flush=True)
  if final_iter is None:
    return {}
  results, per_class_ap = evaluate_classification(trainer, params, final_iter)
  step = int(jax.device_get(state.step))
  results["model"] = which
  writer.write(step, results, kind="final_eval")
  if jax.process_index() == 0:
    record = dict(results, step=step, mode=trainer.finetune.mode, loss=trainer.finetune.loss,
                  per_class_ap=per_class_ap)
    with open(os.path.join(workdir, FINAL_EVAL_JSON), "w") as f:
      json.dump(_finite_or_none(record), f, indent=1, allow_nan=False)
  return results


def _load_teacher(trainer, workdir: str) -> tuple:
  """MAViL stage 2: (teacher parameters,), the train step's extra argument; () otherwise.

  A training workdir as teacher gives its latest checkpoint, whose step is written to
  DIR/teacher.json; a resumed run reads it back (same teacher, same step).
  """
  if trainer.teacher is None:
    return ()
  path = trainer.teacher_path
  if path == os.path.abspath(workdir):
    raise ValueError(f"config.teacher={path} is this run's own workdir; the teacher is "
                     "the previous stage's (or round's) workdir")
  steps = model_checkpoint.train_steps(path)
  step = steps[-1] if steps else None  # None: an exported model directory
  record_path = os.path.join(workdir, TEACHER_JSON)
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["path"] != path:
      raise ValueError(f"config.teacher={path}, but this workdir has trained with the "
                       f"teacher {record['path']} ({record_path}); use that one, or "
                       "another workdir")
    step = record["step"]
  params = trainer.load_teacher(step)
  if jax.process_index() == 0:
    if not os.path.exists(record_path):  # pinned once it loaded
      with open(record_path, "w") as f:
        json.dump({"path": path, "step": step, "teacher_stage": trainer.teacher.stage}, f,
                  indent=1)
    print(f"teacher: MAViL stage {trainer.teacher.stage} from {path}"
          + (f" (step {step})" if step is not None else ""), flush=True)
  return (params,)


def _finite_or_none(value):
  """JSON has no NaN: undefined figures (e.g. mAUC without negatives) become null."""
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def train(config: ml_collections.ConfigDict, workdir: str, train_iter=None,
          eval_iter=None, final_iter=None) -> dict:
  """Runs (or resumes) training; returns the last evaluation's results (for fine-tuning,
  the final evaluation's).

  train_iter / eval_iter / final_iter: input iterators to use instead of the config's
  datasets (any object with the pipeline iterator's __next__, get_state, set_state,
  steps_per_epoch; evaluation ones also iterate and carry `initial_state`). final_iter
  defaults to eval_iter.
  """
  # -- Mesh -------------------------------------------------------------------------------
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  _validate(config)
  mesh = sharding.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices (%d hosts)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # -- Input ------------------------------------------------------------------------------
  if train_iter is None:
    _prepare_synthetic(config)
    train_iter, eval_iter, final_iter = _make_iterators(config)
  elif final_iter is None:
    final_iter = eval_iter
  steps_per_epoch = train_iter.steps_per_epoch
  if config.total_steps == -1:
    config.total_steps = config.num_epochs * steps_per_epoch

  # -- Model, optimizer, sharded state ----------------------------------------------------
  trainer = trainer_lib.build_trainer(config, mesh, steps_per_epoch)
  if trainer.wa_range and trainer.wa_range[1] > config.total_steps // steps_per_epoch:
    raise ValueError(
        f"config.wa_end={trainer.wa_range[1]} is beyond the run's "
        f"{config.total_steps // steps_per_epoch} complete epochs ({config.total_steps} steps "
        f"of {steps_per_epoch} per epoch)")
  manager = _checkpoint_manager(workdir, config)
  writer = summary.MetricWriter(workdir, config.get("tensorboard", True))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    model_checkpoint.write_model_config(workdir, models.model_config(trainer.module))
  with jax.set_mesh(mesh):
    teacher = _load_teacher(trainer, workdir)  # () unless MAViL stage 2

  # -- Checkpoint: resume from the latest, else init (optionally from given weights) --------
  with jax.set_mesh(mesh):
    latest = manager.latest_step()
    if latest is not None:
      abstract = jax.tree.map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          trainer.abstract_state, trainer.state_shardings)
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      state = restored.state
      train_iter.set_state(restored.data)
      logging.info("resumed from step %d", latest)
    else:
      state = trainer.init()
      state = trainer_lib.init_from(trainer, state, config.get("init_from", ""))
  first_step = int(state.step)

  # -- Preemption: SIGTERM asks for a checkpoint at the next step boundary ------------------
  preempted = {"flag": False}

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  signal.signal(signal.SIGTERM, on_sigterm)

  # -- Loop -------------------------------------------------------------------------------
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 3)
  results = {}
  pending = None  # (step, metrics) of the previous step, checked once the next is queued
  # Throughput over the steps since the last log line (the first window includes compiling).
  window = {"step": first_step, "time": time.perf_counter()}
  samples_per_step = config.batch_size

  def check_and_log(step, metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise StopTraining(f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                         f"(step {manager.latest_step()}) is kept in {workdir}.")
    if step % config.log_every == 0 or step == config.total_steps:
      now = time.perf_counter()
      rate = ((step - window["step"]) * samples_per_step / max(now - window["time"], 1e-9))
      window.update(step=step, time=now)
      scalars = {k: float(v) for k, v in metrics.items()}
      scalars["samples_per_s"] = rate
      scalars["epoch"] = step / steps_per_epoch
      writer.write(step, scalars)
      eta = (config.total_steps - step) * samples_per_step / max(rate, 1e-9)
      print(f"step {step}/{config.total_steps}  loss {loss:.4f}  "
            + "  ".join(f"{k} {scalars[k]:.4f}" for k in _SHOWN if k in scalars)
            + f"  lr {scalars['lr']:.3g}  {rate:.1f} samples/s  ETA {eta / 60:.1f} min",
            flush=True)

  def epoch_end(step):
    return step % steps_per_epoch == 0

  try:
    with jax.set_mesh(mesh):
      for step in range(first_step + 1, config.total_steps + 1):
        batch = trainer_lib.global_batch(trainer, trainer.train_inputs(next(train_iter)))
        state, metrics = trainer.train_step(state, batch, *teacher)
        if (trainer.wa_range and epoch_end(step)
            and trainer.wa_range[0] <= step // steps_per_epoch <= trainer.wa_range[1]):
          state = trainer.wa_add(state)  # before any checkpoint of this step
        if pending is not None:
          check_and_log(*pending)
        pending = (step, metrics)
        stop = preempted["flag"] or (jax.process_count() > 1
                                     and manager.reached_preemption(step))
        if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
          check_and_log(*pending)
          pending = None
          _save(manager, step, state, train_iter, force=True)
        if stop:
          manager.wait_until_finished()
          print(f"preempted: saved step {step} to {workdir}; run again to resume", flush=True)
          return results
        if config.eval_every and (
            step == config.total_steps
            or (step % config.eval_every == 0 if config.eval_every > 0 else epoch_end(step))):
          if pending is not None:
            check_and_log(*pending)
            pending = None
          results = evaluate(trainer, state.params, eval_iter, eval_key, teacher)
          writer.write(step, results, kind="eval")
          print(f"eval at step {step}: " + "  ".join(
              f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float)), flush=True)
      if pending is not None:
        check_and_log(*pending)
      if trainer.finetune is not None:
        final = _finish_finetuning(trainer, state, workdir, final_iter, writer)
        results = final or results
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return results


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO; ask with --verbosity=0
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  try:
    results = train(config, _WORKDIR.value)
  except (StopTraining, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if results and "eval_accuracy" in results:
    if config.model.kind == "mavil_ft":  # one clip of num_frames frames is one input
      inputs = f"clips of {config.model.num_frames} frames"
    else:
      inputs = f"{results['frames']} frame{'s' if results['frames'] > 1 else ''} per clip"
    print(f"held-out classification on {results['num_clips']} clips "
          f"({config.get('mode', 'multimodal')}, {results.get('model', 'last')} model, "
          f"{inputs}): "
          f"accuracy {100 * results['eval_accuracy']:.1f}% (chance "
          f"{100 / config.model.num_classes:.1f}%), mAP {100 * results['eval_mAP']:.1f}, "
          f"mAUC {results['eval_mAUC']:.3f}")
  if results and "a2v_r1" in results:
    chance = metrics_lib.chance_recall(results["num_clips"], 1)
    print(f"retrieval on {results['num_clips']} held-out clips: audio->video R@1 "
          f"{results['a2v_r1']:.1f}%, video->audio R@1 {results['v2a_r1']:.1f}% "
          f"(chance {chance:.1f}%)")


if __name__ == "__main__":
  app.run(main)
