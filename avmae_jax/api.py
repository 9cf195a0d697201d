"""`avmae_jax.load`: one call from a checkpoint (ours or a reference `.pth`) to a usable model.

    model = avmae_jax.load("cav-mae-scale++.pth")      # or a model checkpoint directory
    feats = model.features(audio, frames)               # {"audio": [B,512,768], "video": [B,196,768]}
    pooled = model.features(audio, frames, pooled=True) # {"audio": [B,768], "video": [B,768]}
    logits = model.classify(audio, frames, mode="audioonly")   # fine-tuned models
    model.save_torch("out.pth")                         # loads strict=True in the reference

From files and waveforms (decoded and normalised as `prepare` and the pipeline do; these
need the data extra, `pip install 'avmae_jax[data]'`):
    out = model.embed(["clip.mp4", "folder/", "dog.wav"])  # {"audio": [N, 768], "video", "path", ...}
    vec = model.embed_waveform(wave, sample_rate=44100)    # [768]; mono float in [-1, 1]

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

  def embed(self, paths, pooled: bool = True, batch_size: int = 16, windows: bool = True,
            config=None, progress: bool = False) -> dict[str, Any]:
    """Embeddings of video and audio files (or folders of them), as `python -m
    avmae_jax.embed` writes them: {"audio": [N, D], "video": [N, D] (NaN rows for
    audio-only files), "clip_id", "path", "windows", "has_video", "labels" (empty),
    "failed": [{path, reason}] (files that could not be decoded, skipped)}.

    A clip longer than the model's audio length gets the mean over windows of that length
    (windows=False: its start only). config: a training config whose eval_data transforms
    to apply (default: the model family's evaluation defaults). Imports TensorFlow.
    """
    from avmae_jax import embed as embed_lib  # pylint: disable=import-outside-toplevel
    files = embed_lib.find_files([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    data = embed_lib.data_config(self, config)
    rounds = list(embed_lib.embed_files(self, data, [os.fspath(f) for f in files], pooled,
                                        batch_size, windows, progress))
    failed = [item for _, round_failed in rounds for item in round_failed]
    parts = [arrays for arrays, _ in rounds if arrays is not None]
    if not parts:
      raise ValueError(f"no file could be embedded: {failed or 'no media files given'}")
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["failed"] = failed
    return out

  def embed_waveform(self, waveform, sample_rate: int = 16000, pooled: bool = True,
                     windows: bool = True, config=None) -> np.ndarray:
    """The audio embedding of a mono waveform (float in [-1, 1], any rate): [D], or the
    [La, D] tokens with pooled=False; long clips averaged over windows. No TensorFlow."""
    from avmae_jax import embed as embed_lib  # pylint: disable=import-outside-toplevel
    return embed_lib.embed_waveform(self, waveform, sample_rate, pooled, windows, config)

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
