"""PyTorch port of the CAV-MAE models (`CAVMAE`, `CAVMAEFT`) and of MAViL (`MAViL`, `MAViLFT`).

Written from the numerical contracts in the project spec (cav-mae.md, sections 4 and 5;
mavil.md), not copied from the authors' repositories, and with no timm/torchvision
dependency, nor any dependency on the Flax code. It serves two purposes:

* users without the authors' code run checkpoints exported by this project with it: the
  state_dict keys and shapes are the reference's (without the DataParallel `module.` prefix),
  so `load_state_dict(strict=True)` works both ways;
* it is the independent reference the Flax models are tested against, so it reproduces the
  reference's arithmetic and its quirks (documented where they appear) rather than improving
  on them.

Layouts are the reference's: audio [B, T, F] (time, freq) log-mel, frames [B, C, H, W]
(CAV-MAE) or clips [B, C, N, H, W] (MAViL). `common.py` holds the shared layers, `cav_mae.py`
and `mavil.py` one family each; `CLASSES` maps our model kinds to the port's classes, and
`build` makes one from one of our model configs.
This package imports torch at top level; nothing else in `avmae_jax` imports it at import
time, so the rest of the package stays torch-free.
"""

import inspect
from typing import Any, Mapping

from avmae_jax.torch_port.cav_mae import Block
from avmae_jax.torch_port.cav_mae import CAVMAE
from avmae_jax.torch_port.cav_mae import CAVMAEFT
from avmae_jax.torch_port.cav_mae import structured_noise
from avmae_jax.torch_port.common import patchify
from avmae_jax.torch_port.common import random_masking
from avmae_jax.torch_port.common import sincos_pos_embed_2d
from avmae_jax.torch_port.common import unpatchify
from avmae_jax.torch_port.mavil import MAViL
from avmae_jax.torch_port.mavil import MAViLFT
from avmae_jax.torch_port.mavil import patchify_video
from avmae_jax.torch_port.mavil import sincos_pos_embed_3d
from avmae_jax.torch_port.mavil import symmetric_info_nce
from avmae_jax.torch_port.mavil import ViTBlock

__all__ = ["Block", "CAVMAE", "CAVMAEFT", "CLASSES", "MAViL", "MAViLFT", "ViTBlock", "build",
           "call_args", "patchify", "patchify_video", "random_masking", "sincos_pos_embed_2d",
           "sincos_pos_embed_3d", "structured_noise", "symmetric_info_nce", "unpatchify"]

# Our model kinds (model.json "kind") -> the port's classes.
CLASSES = {"cav_mae": CAVMAE, "cav_mae_ft": CAVMAEFT, "mavil": MAViL, "mavil_ft": MAViLFT}


def call_args(method, config: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of `config` that name parameters of `method` (a constructor or forward)."""
  names = inspect.signature(method).parameters
  return {k: v for k, v in config.items() if k in names}


def build(config: Mapping[str, Any]):
  """The port's model of one of our model configs (`avmae_jax.models.model_config`), with
  the fields its constructor takes (head counts, widths, geometry, loss settings)."""
  if config.get("kind") not in CLASSES:
    raise ValueError(f"the PyTorch port has no model of kind {config.get('kind')!r}; it has "
                     f"{sorted(CLASSES)}")
  cls = CLASSES[config["kind"]]
  return cls(**call_args(cls.__init__, config))
