"""Flax (linen) models, and the one place that registers them and turns a config into one.

A model config is a mapping whose `kind` names the class and whose other fields are that
class's dataclass fields (dtype given by name, e.g. "bfloat16"). What the rest of the code
may ask of a model is its interface, `common.AVModel`; each model file holds its classes,
size presets and reference-checkpoint knowledge. A new model is a file here plus one line
in `MODEL_CLASSES` (and, for reading reference `.pth` files, one in `_REFERENCE_CONFIGS`).
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from avmae_jax.models import cav_mae
from avmae_jax.models import layers
from avmae_jax.models import mavil
from avmae_jax.models import mavil_ft
from avmae_jax.models.common import abstract_params
from avmae_jax.models.common import AUDIO_POSITION_FITS
from avmae_jax.models.common import AVModel
from avmae_jax.models.common import boxed_abstract_params
from avmae_jax.models.common import CheckpointError
from avmae_jax.models.common import example_inputs
from avmae_jax.models.common import init_params
from avmae_jax.models.common import merge_params

__all__ = ["AUDIO_POSITION_FITS", "AVModel", "CheckpointError", "MODEL_CLASSES", "abstract_params",
           "DTYPES", "boxed_abstract_params", "build", "classifier_kinds", "config_from_state_dict",
           "example_inputs", "init_params", "merge_params", "model_config", "size_fields",
           "to_dtype"]

MODEL_CLASSES: dict[str, type[AVModel]] = {
    cls.kind: cls for cls in (cav_mae.CAVMAE, cav_mae.CAVMAEFT, mavil.MAViL, mavil_ft.MAViLFT)}
# Each family's reader of reference state dicts: its model config, or None if not its own.
_REFERENCE_CONFIGS = (mavil.reference_config, cav_mae.reference_config)


def size_fields(size: str, kind: str = "cav_mae") -> dict[str, Any]:
  """The width/depth/head fields of a size preset for a model kind."""
  return _model_class(kind).size_fields(size)


def classifier_kinds() -> tuple[str, ...]:
  """The kinds of fine-tuning models (with classification heads)."""
  return tuple(kind for kind, cls in MODEL_CLASSES.items() if cls.is_classifier)


def _model_class(kind: Any) -> type[AVModel]:
  if kind not in MODEL_CLASSES:
    raise ValueError(f"model.kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
  return MODEL_CLASSES[kind]


def build(config: Mapping[str, Any]) -> AVModel:
  """Builds the module a model config describes; unknown fields are errors, not ignored."""
  fields = dict(config)
  kind = fields.pop("kind", None)
  cls = _model_class(kind)
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  if "remat" in fields:  # model.json written before remat_policy: remat=True/False
    legacy = fields.pop("remat")
    fields.setdefault("remat_policy", "full" if legacy else "none")
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"model config for {kind!r} has unknown field(s) {unknown}; "
                     f"known: {sorted(known)}")
  if "dtype" in fields:
    fields["dtype"] = to_dtype(fields["dtype"])
  scan = fields.get("scan_layers", False)
  if isinstance(scan, str):  # "auto", or true/false given on a command line
    scan = {"auto": on_accelerator(), "true": True, "false": False}.get(scan.lower(), scan)
    fields["scan_layers"] = scan
  if not isinstance(fields.get("scan_layers", False), bool):
    raise ValueError(f"model.scan_layers must be true, false or 'auto', got "
                     f"{fields['scan_layers']!r}")
  layers.check_compute_fields(fields.get("remat_policy", "none"),
                              fields.get("attention", "xla"))
  return cls(**fields)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def on_accelerator() -> bool:
  """What the "auto" compute fields follow: JAX's default backend is a TPU or GPU."""
  return jax.default_backend() != "cpu"


def to_dtype(name: Any):
  """A compute dtype by name; "auto" is bfloat16 on an accelerator (TPU, GPU) and float32
  on CPU, where bfloat16 matmuls are emulated and slower."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if on_accelerator() else jnp.float32)
  return jnp.dtype(name)


def model_config(model: AVModel) -> dict[str, Any]:
  """The JSON-able config that `build` turns back into `model`."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  fields["dtype"] = jnp.dtype(fields["dtype"]).name
  return {"kind": model.kind, **fields}


def config_from_state_dict(state_dict: Mapping[str, Any], source: str = "state dict"
                           ) -> dict[str, Any]:
  """A model config that fits a reference state dict ({key: array or anything with a
  .shape}, keys without DataParallel's `module.` prefix)."""
  for reference_config in _REFERENCE_CONFIGS:
    config = reference_config(state_dict, source)
    if config is not None:
      return config
  raise CheckpointError(f"{source}: not a CAV-MAE state dict (no modality_a), nor a MAViL one "
                        "(no 5-D patch_embed_v.proj.weight)")
