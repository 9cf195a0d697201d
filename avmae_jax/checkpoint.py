"""Model checkpoint directories: the model config as JSON plus the parameters via orbax.

Layout of a model checkpoint directory (what `export --torch` writes and what training
can start or fine-tune from):
  DIR/model.json   {"format": ..., "model": <model config, see avmae_jax.models.build>}
  DIR/params/      orbax StandardCheckpointer checkpoint of the parameter pytree
"""

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "avmae_jax.model/1"
MODEL_JSON = "model.json"
PARAMS_DIR = "params"


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


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON))


def read_model_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not an avmae_jax model checkpoint (no {MODEL_JSON})")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or "model" not in meta:
    raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
  return meta["model"]


def load_params(directory: str, target: Optional[Any] = None) -> Any:
  """Restores the parameters; `target` (arrays or ShapeDtypeStructs with shardings) fixes
  structure, dtypes and placement, e.g. onto another mesh."""
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory}: no {PARAMS_DIR}/ with parameters")
  if target is not None:
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  return ocp.StandardCheckpointer().restore(path, target)
