"""Flax (linen) models and the one place that turns a model config into a module.

A model config is a mapping whose `kind` names the class and whose other fields are that
class's dataclass fields (dtype given by name, e.g. "bfloat16"). Size presets live here so
that configs/, the PyTorch interop and the tests share them.
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from avmae_jax.models import cav_mae
from avmae_jax.models import mavil
from avmae_jax.models.cav_mae import CAVMAE, CAVMAEFT
from avmae_jax.models.mavil import MAViL, MAViLFT

MODEL_CLASSES = {"cav_mae": CAVMAE, "cav_mae_ft": CAVMAEFT, "mavil": MAViL,
                 "mavil_ft": MAViLFT}

# Encoder and decoder widths/depths per size. `base` is the paper's; `tiny` keeps the real
# input sizes (1024x128 audio, 224x224 frames) so it runs on real data, for tests and the demo.
# Head counts keep head_dim 64 (encoder) and 32 (decoder), the convention `.pth` import uses.
SIZES = {
    "base": dict(embed_dim=768, num_heads=12, modality_specific_depth=11, shared_depth=1,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=128, num_heads=2, modality_specific_depth=2, shared_depth=1,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
}
# MAViL (spec mavil.md): a 12-layer ViT per modality, 2 fusion layers (3 when fine-tuning,
# as in the released model), decoders 8 x 512. `tiny` keeps the real input sizes
# (1024x128 audio, 8 frames of 224x224); widths are multiples of 16 (3-D sin-cos tables).
MAVIL_SIZES = {
    "base": dict(embed_dim=768, num_heads=12, encoder_depth=12, fusion_depth=2,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=128, num_heads=2, encoder_depth=2, fusion_depth=1,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
}
DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def size_fields(size: str, kind: str = "cav_mae") -> dict[str, Any]:
  """The width/depth/head fields of a size preset for a model kind."""
  sizes = MAVIL_SIZES if kind in ("mavil", "mavil_ft") else SIZES
  if size not in sizes:
    raise ValueError(f"model size must be one of {sorted(sizes)}, got {size!r}")
  fields = dict(sizes[size])
  if kind in ("cav_mae_ft", "mavil_ft"):
    for name in DECODER_FIELDS:
      fields.pop(name)
  if kind == "mavil_ft":
    fields["fusion_depth"] += 1  # the released fine-tuned model adds a fusion layer
  return fields


def frozen_param_names(model: nn.Module) -> tuple[str, ...]:
  """Top-level parameters the optimizer must not update, for any model kind."""
  if isinstance(model, (MAViL, MAViLFT)):
    return mavil.frozen_param_names(model)
  return cav_mae.frozen_param_names(model)


class LrLayers(NamedTuple):
  """Depth of each parameter for layer-wise lr decay: `layer_of(path)` in 0..num_layers."""
  layer_of: Callable[[str], int]
  num_layers: int


# kind family: (embeddings, modality-specific block i, fusion block j) as regexes on the
# '/'-joined parameter path; a block's index is the regex's group 1.
_LR_LAYER_PATTERNS = {
    "cav_mae": (r"^(patch_embed_|pos_embed_|modality_)", r"^blocks_[av]_(\d+)/",
                r"^blocks_u_(\d+)/"),
    "mavil": (r"^(patch_embed|cls_token|pos_embed)", r"^blocks_(?:v_)?(\d+)/",
              r"^blocks_av_(\d+)/"),
}


def lr_layers(model: nn.Module) -> LrLayers:
  """The layer ids of MAE/BEiT's layer-wise lr decay (`param_groups_lrd`), for any kind.

  Embeddings (patch projections, cls/modality tokens, position tables) are layer 0,
  modality-specific block i (audio and video alike) is i + 1, fusion block j follows the
  modality-specific ones, everything else (final norms, heads, decoders) is the top,
  `num_layers`. The optimizer scales a layer's lr by decay ** (num_layers - layer).
  """
  family = "mavil" if isinstance(model, (MAViL, MAViLFT)) else "cav_mae"
  if family == "mavil":
    depth = model.encoder_depth
    fusion = 0 if getattr(model, "heads", None) == "unimodal" else model.fusion_depth
  else:
    depth, fusion = model.modality_specific_depth, model.shared_depth
  embeddings, block, fusion_block = (re.compile(p) for p in _LR_LAYER_PATTERNS[family])
  top = depth + fusion + 1

  def layer_of(path: str) -> int:
    if embeddings.search(path):
      return 0
    if match := block.search(path):
      return int(match.group(1)) + 1
    if match := fusion_block.search(path):
      return depth + int(match.group(1)) + 1
    return top

  return LrLayers(layer_of, top)


def build(config: Mapping[str, Any]) -> nn.Module:
  """Builds the module a model config describes; unknown fields are errors, not ignored."""
  fields = dict(config)
  kind = fields.pop("kind", None)
  if kind not in MODEL_CLASSES:
    raise ValueError(f"model.kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
  cls = MODEL_CLASSES[kind]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"model config for {kind!r} has unknown field(s) {unknown}; "
                     f"known: {sorted(known)}")
  if "dtype" in fields:
    fields["dtype"] = to_dtype(fields["dtype"])
  return cls(**fields)


def to_dtype(name: Any):
  if not isinstance(name, str):
    return name
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}")
  return jnp.dtype(name)


def kind_of(model: nn.Module) -> str:
  for kind, cls in MODEL_CLASSES.items():
    if type(model) is cls:  # pylint: disable=unidiomatic-typecheck
      return kind
  raise TypeError(f"not an avmae_jax model: {type(model).__name__}")


def model_config(model: nn.Module) -> dict[str, Any]:
  """The JSON-able config that `build` turns back into `model`."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  fields["dtype"] = jnp.dtype(fields["dtype"]).name
  return {"kind": kind_of(model), **fields}
