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

from avmae_jax import checkpoint
from avmae_jax import interop
from avmae_jax import models

# Model kinds with classification heads (what `classify` and the evaluation need).
FINETUNED_KINDS = ("cav_mae_ft", "mavil_ft")


@dataclasses.dataclass
class LoadedModel:
  """A model with its parameters; methods are jitted on first use."""
  module: nn.Module
  params: Any

  @property
  def kind(self) -> str:
    return models.kind_of(self.module)

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
    if self.kind not in FINETUNED_KINDS:
      raise TypeError(f"classify needs a fine-tuned model ({' or '.join(FINETUNED_KINDS)}); "
                      f"this is {self.kind}")
    if mode is None:
      mode = self.module.modes()[0] if hasattr(self.module, "modes") else "multimodal"
    a = None if audio is None else jnp.asarray(audio, jnp.float32)
    v = None if frames is None else jnp.asarray(frames, jnp.float32)
    return np.asarray(self._classify_fn(self.params, a, v, mode))

  def state_dict(self) -> dict[str, np.ndarray]:
    return interop.flax_to_torch(self.params)

  def save_torch(self, path: str, module_prefix: bool = False) -> None:
    """Writes every tensor of the reference layout (frozen tables and unused norms too)."""
    interop.write_pth(self.state_dict(), path, module_prefix)

  def save(self, directory: str, overwrite: bool = False) -> str:
    return checkpoint.save_model(directory, self.config, self.params, overwrite)


def example_inputs(module: nn.Module, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of (audio, frames) that `module` takes: frames [B, H, W, C] for CAV-MAE,
  [B, N, H, W, C] (a clip) for MAViL, whose modules say so themselves (`input_shapes`)."""
  if hasattr(module, "input_shapes"):
    return tuple(module.input_shapes(batch))
  audio = jax.ShapeDtypeStruct((batch, module.audio_length, module.num_mel_bins), jnp.float32)
  frames = jax.ShapeDtypeStruct(
      (batch, module.img_size, module.img_size, module.in_chans), jnp.float32)
  return audio, frames


def _init(module: nn.Module, seed, audio, frames):
  rngs = {"params": jax.random.fold_in(jax.random.key(seed), 0),
          "masking": jax.random.fold_in(jax.random.key(seed), 1)}
  return nn.meta.unbox(module.init(rngs, audio, frames)["params"])


def abstract_params(module: nn.Module) -> Any:
  """Parameter shapes and dtypes without computing anything (jax.eval_shape of init)."""
  return jax.eval_shape(functools.partial(_init, module, 0), *example_inputs(module))


def init_params(module: nn.Module, seed: int = 0) -> Any:
  """Freshly initialised parameters (the reference's initialisation scheme)."""
  audio, frames = (jnp.zeros(s.shape, s.dtype) for s in example_inputs(module))
  return jax.jit(functools.partial(_init, module, seed))(audio, frames)


def from_state_dict(state_dict: dict[str, np.ndarray], source: str = "state dict",
                    **overrides) -> LoadedModel:
  """Builds the model a reference state dict describes and loads it strictly."""
  config = interop.infer_model_config(state_dict, source)
  config.update(overrides)
  module = models.build(config)
  params, _ = interop.torch_to_flax(state_dict, abstract_params(module), strict=True,
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
    config = checkpoint.read_model_config(path)
    config.update(overrides)
    module = models.build(config)
    params = checkpoint.load_params(path, abstract_params(module), step=step)
    return LoadedModel(module, params)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  if step is not None:
    raise ValueError(f"{path}: step={step} applies to training workdirs, not files")
  return from_state_dict(interop.read_pth(path), source=path, **overrides)
