"""Model checkpoint directories: the model config as JSON plus the parameters via orbax.

Two layouts are model directories (`avmae_jax.load`, `config.init_from`, evaluate, export):
  exported model (what `export --torch` and `LoadedModel.save` write):
    DIR/model.json   {"format": ..., "model": <model config, see avmae_jax.models.build>}
    DIR/params/      orbax StandardCheckpointer checkpoint of the parameter pytree
  training workdir (what `python -m avmae_jax.train` writes):
    DIR/model.json
    DIR/config.json  the whole run config (what `report` shows and inpaints from)
    DIR/checkpoints/<step>/state/   orbax checkpoint of TrainState(step, params, opt_state)
    DIR/checkpoints/<step>/data/    input-iterator state (not read here)
  From a workdir the parameters of the latest (or a chosen) step are read alone: an orbax
  partial restore of the `params` subtree, so the optimizer state (2x the parameters for
  Adam) and any weight-averaging sum are never read. checkpoints/train_state.py writes and
  resumes workdirs.

`read_flat_params` reads any checkpoint a run may start from (a model directory, a workdir
or a reference `.pth`) as native parameter paths, what `models.merge_params` takes.
"""

import contextlib
import json
import logging as py_logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from avmae_jax import models
from avmae_jax.checkpoints import interop

FORMAT = "avmae_jax.model/1"
MODEL_JSON = "model.json"
PARAMS_DIR = "params"
# Training workdir layout; train.py writes it with these names.
TRAIN_CHECKPOINT_DIR = "checkpoints"
TRAIN_STATE_ITEM = "state"
TRAIN_ITEM_NAMES = ("state", "data")
RUN_CONFIG_JSON = "config.json"


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not JSON-serialisable: {value!r}")


def save_model(directory: str, model_config: dict[str, Any], params: Any,
               overwrite: bool = False) -> str:
  """Writes `params` and `model_config` to `directory`; returns its absolute path."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, MODEL_JSON)) and not overwrite:
    raise FileExistsError(f"{directory} already holds a model checkpoint "
                          "(pass overwrite=True / --overwrite to replace it)")
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
  checkpointer.wait_until_finished()
  write_model_config(directory, model_config)
  return directory


def write_model_config(directory: str, model_config: dict[str, Any]) -> None:
  """Writes DIR/model.json, the record of which model a directory's parameters belong to."""
  with open(os.path.join(directory, MODEL_JSON), "w") as f:
    json.dump({"format": FORMAT, "model": model_config}, f, indent=2, default=_json_default)


def write_run_config(workdir: str, config: Any) -> None:
  """Writes WORKDIR/config.json, the run's whole config (an ml_collections ConfigDict)."""
  with open(os.path.join(workdir, RUN_CONFIG_JSON), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_run_config(workdir: str) -> Optional[dict[str, Any]]:
  """The run config a training workdir records, or None (a workdir of an older version)."""
  path = os.path.join(workdir, RUN_CONFIG_JSON)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_model_dir(path: str) -> bool:
  """True for an exported model directory or a training workdir (model.json plus either
  params/ or checkpoints/; the latter may not hold a finished step yet, load_params says so)."""
  return os.path.isfile(os.path.join(path, MODEL_JSON)) and (
      os.path.isdir(os.path.join(path, PARAMS_DIR))
      or os.path.isdir(os.path.join(path, TRAIN_CHECKPOINT_DIR)))


@contextlib.contextmanager
def _quiet_orbax():
  """Hides orbax's warnings about opening a checkpoint directory read-only (expected here)."""
  logger = py_logging.getLogger("absl")
  level = logger.level
  logger.setLevel(py_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _train_manager(directory: str):
  # read_only: a training job may be writing the same directory; never clean anything up.
  return ocp.CheckpointManager(
      os.path.join(directory, TRAIN_CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=TRAIN_ITEM_NAMES)


def train_steps(directory: str) -> list[int]:
  """Finished checkpoint steps of a training workdir, ascending (empty if none)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(os.path.join(directory, TRAIN_CHECKPOINT_DIR)):
    return []
  with _quiet_orbax():
    manager = _train_manager(directory)
    try:
      return sorted(manager.all_steps())
    finally:
      manager.close()


def read_model_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not an avmae_jax model checkpoint (no {MODEL_JSON})")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or "model" not in meta:
    raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
  return meta["model"]


def load_params(directory: str, target: Optional[Any] = None,
                step: Optional[int] = None) -> Any:
  """Restores the parameters of a model directory or training workdir (module docstring).

  target: arrays or ShapeDtypeStructs (with shardings, to place them, e.g. onto another
  mesh) fixing structure and dtypes. Required for a training workdir, whose parameters
  are restored alone by a partial restore of the train state.
  step: which training checkpoint (default the latest); exported models have one.
  """
  directory = os.path.abspath(directory)
  if target is not None:
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  path = os.path.join(directory, PARAMS_DIR)
  if os.path.isdir(path):
    if step is not None:
      raise ValueError(f"{directory} is an exported model with one set of parameters; "
                       f"step={step} applies to training workdirs only")
    return ocp.StandardCheckpointer().restore(path, target)
  if not os.path.isdir(os.path.join(directory, TRAIN_CHECKPOINT_DIR)):
    raise FileNotFoundError(f"{directory}: neither {PARAMS_DIR}/ (an exported model) nor "
                            f"{TRAIN_CHECKPOINT_DIR}/ (a training workdir)")
  if target is None:
    raise ValueError(f"{directory} is a training workdir; restoring its parameters needs "
                     "a target (e.g. models.abstract_params(module))")
  steps = train_steps(directory)
  if not steps:
    raise FileNotFoundError(f"{directory}: training workdir without a finished checkpoint "
                            f"in {TRAIN_CHECKPOINT_DIR}/ yet")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{directory}: no checkpoint of step {step}; have {steps}")
  # Partial restore (orbax-checkpoint 0.12): PyTreeRestore with an item holding only the
  # `params` subtree and partial_restore=True reads just those leaves of the saved train
  # state (saved with StandardSave, a PyTree checkpoint); restore_args built from the
  # target carry dtypes and shardings.
  item = {"params": target}
  with _quiet_orbax():
    manager = _train_manager(directory)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          TRAIN_STATE_ITEM: ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)}))
    finally:
      manager.close()
  return restored[TRAIN_STATE_ITEM]["params"]


def read_flat_params(path: str) -> dict[str, np.ndarray]:
  """{'/'-joined parameter path: array} of a model directory, a training workdir (its
  latest checkpoint) or a reference `.pth`."""
  if is_model_dir(path):
    saved = models.build(read_model_config(path))
    params = load_params(path, models.abstract_params(saved))
    return {k: np.asarray(v) for k, v in models.common.flat_params(params).items()}
  if os.path.isdir(path):
    raise FileNotFoundError(f"{path}: a directory without {MODEL_JSON} is neither a model "
                            "checkpoint nor a training workdir")
  return interop.state_dict_to_native(interop.read_pth(path))
