r"""Training: one script for CAV-MAE pretraining on one CPU or a TPU pod.

  python -m avmae_jax.train --config configs/demo.py --workdir /tmp/demo
  python -m avmae_jax.train --config configs/cav_mae_pretrain.py:size=base,data=audioset \
      --workdir gs://bucket/run --config.batch_size=256 --distributed

Sections below: distributed runtime and mesh; input; model, optimizer and sharded state;
checkpoint (restore or init); the loop (update, metrics, checkpoints, preemption,
evaluation). The workdir holds checkpoints/ (orbax: train state + input-iterator state),
metrics.jsonl, tensorboard/ and model.json (the model config of the run).
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

CHECKPOINT_DIR = "checkpoints"


class StopTraining(Exception):
  """Ends the run with a message (non-finite loss, bad config)."""


def _validate(config: ml_collections.ConfigDict) -> None:
  for field in ("batch_size", "log_every", "checkpoint_every", "eval_every"):
    value = config.get(field)
    if not isinstance(value, int) or value < (0 if field == "eval_every" else 1):
      raise ValueError(f"config.{field} must be a positive integer, got {value!r}")
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
  settings = config.get("synthetic")
  if not settings:
    return
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  builder = builders.AvmaeSynthetic(
      config=builders.synthetic_config(settings.num_train, settings.num_test, settings.seed,
                                       settings.num_classes),
      data_dir=os.path.expanduser(settings.data_dir), num_workers=settings.num_workers)
  if jax.process_index() == 0:
    builder.download_and_prepare()
  for section in ("data", "eval_data"):
    config[section].name = ""
    config[section].builder_dir = builder.data_dir


def _make_iterators(config):
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config.data.batch_size = config.batch_size
  config.data.seed = config.seed
  train_iter = pipeline.create_iterator(config.data)
  eval_iter = None
  if config.eval_every:
    eval_iter = pipeline.create_iterator(config.eval_data)
    eval_iter.initial_state = eval_iter.get_state()
  return train_iter, eval_iter


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3), create=True,
      enable_async_checkpointing=config.get("async_checkpointing", True))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options, item_names=("state", "data"))


def _save(manager, step, state, train_iter, force=False):
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(train_iter.get_state())), force=force)


def evaluate(trainer, params, eval_iter, step_key) -> dict:
  """Held-out MAE losses and contrastive accuracy (full batches) and retrieval R@K.

  The eval iterator makes one ordered pass; the last batch is padded (mask 0), and the
  padding is left out of every figure.
  """
  eval_iter.set_state(eval_iter.initial_state)
  sums, full_batches, audio_reps, video_reps = {}, 0, [], []
  for index, host_batch in enumerate(eval_iter):
    batch = trainer_lib.global_batch(
        trainer, {k: host_batch[k] for k in ("audio", "frames", "mask")})
    out = trainer.eval_step(params, batch, jax.random.fold_in(step_key, index))
    out = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)
    mask = out.pop("mask") > 0  # global, so every host agrees
    if mask.all():  # padded batches would bias the batch-mean losses
      full_batches += 1
      for key in trainer_lib.PRETRAIN_METRICS:
        if key in out:
          sums[key] = sums.get(key, 0.0) + float(out[key])
    audio_reps.append(out["audio_rep"][mask])
    video_reps.append(out["video_rep"][mask])
  results = {f"eval_{k}": v / max(full_batches, 1) for k, v in sums.items()}
  results.update(metrics_lib.retrieval_metrics(np.concatenate(audio_reps),
                                               np.concatenate(video_reps)))
  return results


def train(config: ml_collections.ConfigDict, workdir: str, train_iter=None,
          eval_iter=None) -> dict:
  """Runs (or resumes) training; returns the last evaluation's results.

  train_iter / eval_iter: input iterators to use instead of the config's datasets (any
  object with the pipeline iterator's __next__, get_state, set_state, steps_per_epoch).
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
    train_iter, eval_iter = _make_iterators(config)
  steps_per_epoch = train_iter.steps_per_epoch
  if config.total_steps == -1:
    config.total_steps = config.num_epochs * steps_per_epoch

  # -- Model, optimizer, sharded state ----------------------------------------------------
  trainer = trainer_lib.build_trainer(config, mesh, steps_per_epoch)
  manager = _checkpoint_manager(workdir, config)
  writer = summary.MetricWriter(workdir, config.get("tensorboard", True))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    model_checkpoint.write_model_config(workdir, models.model_config(trainer.module))

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
            + "  ".join(f"{k} {scalars[k]:.4f}" for k in ("loss_mae_a", "loss_mae_v", "nce",
                                                          "c_acc") if k in scalars)
            + f"  lr {scalars['lr']:.3g}  {rate:.1f} samples/s  ETA {eta / 60:.1f} min",
            flush=True)

  try:
    with jax.set_mesh(mesh):
      for step in range(first_step + 1, config.total_steps + 1):
        batch = trainer_lib.global_batch(trainer, trainer.train_inputs(next(train_iter)))
        state, metrics = trainer.train_step(state, batch)
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
        if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
          if pending is not None:
            check_and_log(*pending)
            pending = None
          results = evaluate(trainer, state.params, eval_iter, eval_key)
          writer.write(step, results, kind="eval")
          print(f"eval at step {step}: " + "  ".join(
              f"{k} {v:.3f}" for k, v in results.items() if isinstance(v, float)), flush=True)
      if pending is not None:
        check_and_log(*pending)
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
  if results and "a2v_r1" in results:
    chance = metrics_lib.chance_recall(results["num_clips"], 1)
    print(f"retrieval on {results['num_clips']} held-out clips: audio->video R@1 "
          f"{results['a2v_r1']:.1f}%, video->audio R@1 {results['v2a_r1']:.1f}% "
          f"(chance {chance:.1f}%)")


if __name__ == "__main__":
  app.run(main)
