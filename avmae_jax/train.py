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
(orbax: train state + input-iterator state), metrics.jsonl, tensorboard/, model.json
(the model config of the run) and config.json (the whole run config, as last started). Compiled programs go to JAX's persistent compilation cache
(config.compilation_cache_dir, training/compile_cache.py), so a restart does not compile
again.

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

from avmae_jax import models
from avmae_jax.checkpoints import model_dir
from avmae_jax.checkpoints import train_state
from avmae_jax.parallel import mesh as mesh_lib
from avmae_jax.training import compile_cache
from avmae_jax.training import steps
from avmae_jax.training import summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/FILE.py[:args]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods and GPU "
    "clusters; the launch/ scripts set it).")
flags.mark_flags_as_required(["config", "workdir"])

# Scalars the progress line shows when the run logs them.
_SHOWN = ("loss_mae_a", "loss_mae_v", "nce", "c_acc", "loss_rec_a", "loss_rec_v",
          "loss_inter", "acc_inter", "grad_norm")


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


def _iterator(section: ml_collections.ConfigDict, rewindable: bool = False):
  """The pipeline iterator of a data section (imports TensorFlow); evaluation iterators
  remember their start (`initial_state`) to make one ordered pass each time."""
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  iterator = pipeline.create_iterator(section)
  if rewindable:
    iterator.initial_state = iterator.get_state()
  return iterator


def _rewound(iterator):
  iterator.set_state(iterator.initial_state)
  return iterator


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
  compile_cache.enable(config.get("compilation_cache_dir", "auto"))
  mesh = mesh_lib.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices (%d hosts)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # -- Input ------------------------------------------------------------------------------
  from_config = train_iter is None
  if from_config:
    from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
    builders.prepare_for_config(config)  # the built-in synthetic dataset, if asked for
    config.data.batch_size, config.data.seed = config.batch_size, config.seed
    train_iter = _iterator(config.data)
    eval_iter = _iterator(config.eval_data, rewindable=True) if config.eval_every else None
  steps_per_epoch = train_iter.steps_per_epoch
  if config.total_steps == -1:
    config.total_steps = config.num_epochs * steps_per_epoch

  # -- Model, task, optimizer, sharded state ------------------------------------------------
  trainer = steps.from_config(config, mesh, steps_per_epoch)
  task = trainer.task
  if trainer.wa_range and trainer.wa_range[1] > config.total_steps // steps_per_epoch:
    raise ValueError(
        f"config.wa_end={trainer.wa_range[1]} is beyond the run's "
        f"{config.total_steps // steps_per_epoch} complete epochs ({config.total_steps} steps "
        f"of {steps_per_epoch} per epoch)")
  checkpoints = train_state.manager(workdir, config)
  writer = summary.MetricWriter(workdir, config.get("tensorboard", True))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    model_dir.write_model_config(workdir, models.model_config(task.module))
    model_dir.write_run_config(workdir, config)
  with jax.set_mesh(mesh):
    aux = task.load_aux(trainer.aux_shardings, workdir)  # {} unless the task has one

  # -- Checkpoint: resume from the latest, else init (optionally from given weights) --------
  with jax.set_mesh(mesh):
    restored = train_state.restore_latest(checkpoints, trainer.checkpoint_abstract_state,
                                          trainer.checkpoint_shardings)
    if restored is not None:
      state, data_state = restored
      state = trainer.from_checkpoint(state)  # per-block layout -> the train state's
      train_iter.set_state(data_state)
      logging.info("resumed from step %d", int(state.step))
    else:
      state = trainer.init()
      if config.get("init_from", ""):
        state, report = trainer.init_from(state, config.init_from)
        if jax.process_index() == 0:
          print(steps.describe_init(config.init_from, report), flush=True)
  first_step = int(state.step)

  # -- Preemption: SIGTERM asks for a checkpoint at the next step boundary ------------------
  preempted = {"flag": False}

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  signal.signal(signal.SIGTERM, on_sigterm)

  # -- Loop -------------------------------------------------------------------------------
  results = {}
  pending = None  # (step, metrics) of the previous step, checked once the next is queued
  # Throughput over the steps since the last log line (the first window includes compiling).
  window = {"step": first_step, "time": time.perf_counter()}
  samples_per_step = config.batch_size

  def check_and_log(step, metrics):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise StopTraining(f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                         f"(step {checkpoints.latest_step()}) is kept in {workdir}.")
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
        batch = trainer.global_batch(trainer.train_inputs(next(train_iter)))
        state, metrics = trainer.train_step(state, batch, aux)
        if (trainer.wa_range and epoch_end(step)
            and trainer.wa_range[0] <= step // steps_per_epoch <= trainer.wa_range[1]):
          state = trainer.wa_add(state)  # before any checkpoint of this step
        if pending is not None:
          check_and_log(*pending)
        pending = (step, metrics)
        stop = preempted["flag"] or (jax.process_count() > 1
                                     and checkpoints.reached_preemption(step))
        if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
          check_and_log(*pending)
          pending = None
          train_state.save(checkpoints, step, trainer.to_checkpoint(state),
                           train_iter.get_state(), force=True)
        if stop:
          checkpoints.wait_until_finished()
          print(f"preempted: saved step {step} to {workdir}; run again to resume", flush=True)
          return results
        if config.eval_every and (
            step == config.total_steps
            or (step % config.eval_every == 0 if config.eval_every > 0 else epoch_end(step))):
          if pending is not None:
            check_and_log(*pending)
            pending = None
          results, _ = trainer.evaluate(state.params, _rewound(eval_iter), aux)
          writer.write(step, results, kind="eval")
          print(f"eval at step {step}: " + "  ".join(
              f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float)), flush=True)
      if pending is not None:
        check_and_log(*pending)

      # -- The task's end of the run (fine-tuning: weight average, final evaluation) --------
      if from_config and eval_iter is not None and task.final_eval_all_frames:
        final_data = ml_collections.ConfigDict(config.eval_data.to_dict())
        final_data.eval_all_frames = True
        final_iter = _iterator(final_data, rewindable=True)
      final_iter = eval_iter if final_iter is None else final_iter
      results = task.finish(trainer, state, workdir,
                            _rewound(final_iter) if final_iter is not None else None,
                            writer) or results
  finally:
    checkpoints.wait_until_finished()
    checkpoints.close()
    writer.close()
  line = task.summary(results)
  if line and jax.process_index() == 0:
    print(line, flush=True)
  return results


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax is chatty at INFO; ask with --verbosity=0
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (StopTraining, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
