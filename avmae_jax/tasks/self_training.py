"""Self-training (MAViL stage 2): the pretraining losses against a frozen teacher's targets.

The task owns its teacher end to end:
  build   from the model.json of `config.teacher` (a stage-1 or stage-2 training workdir
          or model directory), computing like the student (dtype, scanned blocks,
          attention) without rematerialisation (no backward pass goes through it); the student checks that it fits
          (`check_teacher`);
  subset  only what makes the targets (`teacher_subset`: encoders and fusion, not the
          decoders) is kept on the devices, sharded like the student by the same rules;
  load    once per run: a workdir's latest checkpoint by an orbax partial restore of that
          subset, or a model directory's parameters;
  pin     the step it was taken at goes to WORKDIR/teacher.json, so that a resumed run keeps
          the same teacher even if the teacher's run has gone on (another config.teacher
          is then an error);
  pass    its parameters are the steps' `aux` argument: outside the train state (neither
          checkpointed nor in the optimizer) and not donated, so they stay bit-identical;
          the targets are computed inside each step (unmasked clips, no gradient).
"""

import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from avmae_jax import models
from avmae_jax.checkpoints import model_dir
from avmae_jax.models.common import AVModel
from avmae_jax.tasks import pretraining

TEACHER_JSON = "teacher.json"  # which teacher checkpoint a run learns from


def teacher_path(config: ml_collections.ConfigDict) -> str:
  """config.teacher as an absolute path ('' when unset)."""
  path = config.get("teacher", "") or ""
  return os.path.abspath(os.path.expanduser(path)) if path else ""


class SelfTraining(pretraining.Pretraining):
  """Pretraining whose model takes `teacher_targets` from a frozen teacher.

  stand_in_teacher: a random teacher of the student's architecture instead of
  config.teacher (benchmarks; its parameters come from `random_aux`).
  """

  def __init__(self, config: ml_collections.ConfigDict, module: AVModel,
               stand_in_teacher: bool = False):
    super().__init__(config, module)
    self.teacher_path = teacher_path(config)
    if stand_in_teacher:
      teacher_config = models.model_config(module.stand_in_teacher())
    else:
      if not self.teacher_path:
        raise ValueError("MAViL stage 2 needs config.teacher: the stage-1 (or earlier "
                         "stage-2) training workdir or model directory to learn from")
      if not model_dir.is_model_dir(self.teacher_path):
        raise FileNotFoundError(
            f"config.teacher={self.teacher_path}: not a training workdir or model directory "
            f"(no {model_dir.MODEL_JSON} with params/ or checkpoints/)")
      teacher_config = model_dir.read_model_config(self.teacher_path)
    student = models.model_config(module)
    self.teacher = models.build(dict(
        teacher_config, remat_policy="none",
        **{k: student[k] for k in ("dtype", "scan_layers", "attention")}))
    module.check_teacher(self.teacher)

  def model_inputs(self, batch, aux):
    return {"teacher_targets": self.module.targets_from(self.teacher, aux, batch["audio"],
                                                        batch["frames"])}

  def boxed_aux(self) -> Any:
    return self.module.teacher_subset(models.boxed_abstract_params(self.teacher))

  def load_teacher(self, shardings: Any, step: Optional[int] = None) -> Any:
    """The teacher's parameters from `teacher_path` (a training workdir's latest or `step`
    checkpoint, or a model directory), placed on `shardings`."""
    path = self.teacher_path
    if os.path.isdir(os.path.join(path, model_dir.PARAMS_DIR)):
      # An exported model holds one parameter tree, restored whole.
      params = model_dir.load_params(path, models.abstract_params(self.teacher), step=step)
      return jax.device_put(self.module.teacher_subset(params), shardings)
    # A training workdir: a partial restore reads just the used subset, already sharded.
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.meta.unbox(self.boxed_aux()), shardings)
    return model_dir.load_params(path, target, step=step)

  def load_aux(self, shardings: Any, workdir: Optional[str] = None) -> Any:
    """The teacher: its latest checkpoint; for a run in `workdir`, the one pinned in
    WORKDIR/teacher.json (pinned at the run's first load)."""
    if workdir is None:
      return self.load_teacher(shardings)
    path = self.teacher_path
    if path == os.path.abspath(workdir):
      raise ValueError(f"config.teacher={path} is this run's own workdir; the teacher is "
                       "the previous stage's (or round's) workdir")
    steps = model_dir.train_steps(path)
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
    params = self.load_teacher(shardings, step)
    if jax.process_index() == 0:
      description, fields = self.module.describe_teacher(self.teacher)
      if not os.path.exists(record_path):  # pinned once it loaded
        with open(record_path, "w") as f:
          json.dump({"path": path, "step": step, **fields}, f, indent=1)
      print(f"teacher: {description} from {path}"
            + (f" (step {step})" if step is not None else ""), flush=True)
    return params

  def random_aux(self, shardings: Any, seed: int = 1) -> Any:
    params = models.init_params(self.teacher, seed)
    return jax.device_put(self.module.teacher_subset(params), shardings)
