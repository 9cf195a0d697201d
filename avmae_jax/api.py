"""`avmae_jax.load`: one call from a checkpoint (ours or a reference `.pth`) to a usable model.

    model = avmae_jax.load("cav-mae-scale++.pth")      # or a model checkpoint directory
    feats = model.features(audio, frames)               # {"audio": [B,512,768], "video": [B,196,768]}
    pooled = model.features(audio, frames, pooled=True) # {"audio": [B,768], "video": [B,768]}
    logits = model.classify(audio, frames, mode="audioonly")   # fine-tuned models
    model.save_torch("out.pth")                         # loads strict=True in the reference

CAV-MAE: audio is [B, 1024, 128] normalised log-mel, frames [B, 224, 224, 3] normalised RGB
(NHWC). MAViL: audio [B, 1024, 128], frames [B, 8, 224, 224, 3] (a clip of 8 frames);
features are each modality's ViT outputs ({"audio": [B, 512, 768], "video": [B, 784, 768]}).
`example_inputs(model.module, B)` gives the shapes of any model. numpy in, numpy out.
"""

import dataclasses
import functools
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax import models
from avmae_jax.checkpoints import interop
from avmae_jax.checkpoints import model_dir
# Shapes and fresh parameters of a module, for users of the API (defined with the models).
from avmae_jax.models import abstract_params
from avmae_jax.models import example_inputs
from avmae_jax.models import init_params

__all__ = ["LoadedModel", "abstract_params", "example_inputs", "from_state_dict",
           "init_params", "load"]


@dataclasses.dataclass
class LoadedModel:
  """A model with its parameters; methods are jitted on first use."""
  module: nn.Module
  params: Any

  @property
  def kind(self) -> str:
    return self.module.kind

  @property
  def config(self) -> dict[str, Any]:
    return models.model_config(self.module)

  @functools.cached_property
  def _features_fn(self):
    def fn(p, a, v, pooled):
      a, v = self.module.apply({"params": p}, a, v, method=self.module.forward_feat)
      # Pool on the device: only [B, D] crosses to the host for retrieval.
      return (a.mean(axis=1), v.mean(axis=1)) if pooled else (a, v)
    return jax.jit(fn, static_argnums=3)

  def features(self, audio, frames, pooled: bool = False) -> dict[str, np.ndarray]:
    """forward_feat token sequences {"audio": [B, La, D], "video": [B, Lv, D]}, or with
    pooled=True their means over tokens, [B, D] each (the retrieval representation)."""
    a, v = self._features_fn(self.params, jnp.asarray(audio, jnp.float32),
                             jnp.asarray(frames, jnp.float32), bool(pooled))
    return {"audio": np.asarray(a), "video": np.asarray(v)}

  @functools.cached_property
  def _classify_fn(self):
    return jax.jit(lambda p, a, v, mode: self.module.apply({"params": p}, a, v, mode),
                   static_argnums=3)

  def classify(self, audio, frames, mode: Optional[str] = None) -> np.ndarray:
    """Logits [B, num_classes] of a fine-tuned model; pass None for an unused modality.

    mode: default "multimodal" (for MAViL with unimodal heads only, "audioonly").
    """
    if not self.module.is_classifier:
      raise TypeError(f"classify needs a fine-tuned model "
                      f"({' or '.join(models.classifier_kinds())}); this is {self.kind}")
    if mode is None:
      mode = self.module.modes()[0]
    a = None if audio is None else jnp.asarray(audio, jnp.float32)
    v = None if frames is None else jnp.asarray(frames, jnp.float32)
    return np.asarray(self._classify_fn(self.params, a, v, mode))

  def state_dict(self) -> dict[str, np.ndarray]:
    return interop.flax_to_torch(self.params)

  def save_torch(self, path: str, module_prefix: bool = False) -> None:
    """Writes every tensor of the reference layout (frozen tables and unused norms too)."""
    interop.write_pth(self.state_dict(), path, module_prefix)

  def save(self, directory: str, overwrite: bool = False) -> str:
    return model_dir.save_model(directory, self.config, self.params, overwrite)


def from_state_dict(state_dict: dict[str, np.ndarray], source: str = "state dict",
                    **overrides) -> LoadedModel:
  """Builds the model a reference state dict describes and loads it strictly."""
  state_dict = interop.strip_module_prefix(state_dict)
  config = models.config_from_state_dict(state_dict, source)
  config.update(overrides)
  module = models.build(config)
  params, _ = interop.torch_to_flax(state_dict, models.abstract_params(module), strict=True,
                                    source=source)
  return LoadedModel(module, jax.tree.map(jnp.asarray, params))


def load(path: str, step: Optional[int] = None, **overrides) -> LoadedModel:
  """Loads a model directory, a training workdir or a reference PyTorch `.pth`.

  A training workdir (`python -m avmae_jax.train --workdir DIR`) gives the parameters of
  its latest checkpoint, or of `step`.
  overrides: model config fields to set, e.g. num_heads (which a `.pth` cannot tell) or
  dtype="bfloat16".
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    config = model_dir.read_model_config(path)
    config.update(overrides)
    module = models.build(config)
    params = model_dir.load_params(path, models.abstract_params(module), step=step)
    return LoadedModel(module, params)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  if step is not None:
    raise ValueError(f"{path}: step={step} applies to training workdirs, not files")
  return from_state_dict(interop.read_pth(path), source=path, **overrides)
