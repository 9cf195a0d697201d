"""What a training run optimises and how it is scored, one module per task:

  pretraining.Pretraining      the model's own losses (CAV-MAE, MAViL stage 1); retrieval
  self_training.SelfTraining   pretraining against a frozen teacher (MAViL stage 2)
  classification.Classification  fine-tuning and linear probing; mAP / accuracy

`for_config` picks the task a model's interface asks for. The interface of a task is in
base.py; training/steps.py builds the sharded, jitted steps from any of them.
"""

import ml_collections

from avmae_jax.models.common import AVModel
from avmae_jax.tasks.base import Task
from avmae_jax.tasks.classification import Classification
from avmae_jax.tasks.pretraining import Pretraining
from avmae_jax.tasks.self_training import SelfTraining

__all__ = ["Classification", "Pretraining", "SelfTraining", "Task", "for_config"]


def for_config(config: ml_collections.ConfigDict, module: AVModel,
               stand_in_teacher: bool = False) -> Task:
  """The task that trains `module` (built from config.model) as `config` asks.

  stand_in_teacher: a self-training task without config.teacher gets a random teacher of
  the student's architecture (benchmarks).
  """
  if module.is_classifier:
    task_class = Classification
  elif module.needs_teacher:
    if stand_in_teacher and not config.get("teacher"):
      return SelfTraining(config, module, stand_in_teacher=True)
    task_class = SelfTraining
  else:
    task_class = Pretraining
  if config.get("teacher") and task_class is not SelfTraining:
    raise ValueError(f"config.teacher={config.teacher!r} is for MAViL stage 2 "
                     f"(model.kind='mavil', model.stage=2)")
  return task_class(config, module)
