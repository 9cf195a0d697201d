"""What every model is to the rest of the code: the interface, the modes, and init-from rules.

`AVModel` is the base of every model class. Besides the fields both families share (input
geometry, width, heads, norms, compute dtype), it declares what tasks, evaluators, the
optimizer and the commands ask of a model, so that no code outside this package looks at
a model's class or kind:

  kind                    the name in model configs and model.json ("cav_mae", ...)
  is_classifier           a fine-tuning model: logits in `modes()` from `__call__`
  metric_names            the scalars a pretraining `__call__` returns, for logging
  needs_teacher           trains against a frozen teacher's targets (self-training)
  input_shapes(batch)     (audio, frames) it takes; frames are single frames [B, H, W, C]
                          or clips [B, N, H, W, C] (`frames_per_input` N)
  modes()                 the classification modes it can run
  frozen_param_names()    top-level parameters no optimizer may update
  lr_layers()             layer ids for layer-wise lr decay
  init_rules()            what a checkpoint gives it when a run starts from one
  fit_audio_positions()   a checkpoint's audio position tables fitted to audio_length
  map_imagenet_mae()      the paper's ImageNet-MAE initialisation (CAV-MAE pretraining)
  check_inpainting()      whether `inpaint` can draw its reconstructions
  forward_flops(mode)     analytic matmul FLOPs of one sample's forward pass

The mode vocabulary (`MODES`, `uses_audio`, `uses_video`) is defined here once.
`merge_params` applies a model's `InitRules` to a checkpoint's parameters (the big_vision
`load` / `merge_params` pattern); names are '/'-joined native parameter paths, the names
optimizer patterns use ("blocks_a_0/attn/qkv/kernel").
"""

import dataclasses
import functools
import re
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax.models import layers

Dtype = Any
Params = Any

# Classification modes: which inputs a fine-tuned model sees. The missing* modes give one
# modality to a model tuned on both (CAV-MAE's robustness evaluation).
MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")
TRAIN_MODES = MODES[:3]  # the modes a model can be fine-tuned in


def uses_audio(mode: str) -> bool:
  return mode in ("multimodal", "audioonly", "missingaudioonly")


def uses_video(mode: str) -> bool:
  return mode in ("multimodal", "videoonly", "missingvideoonly")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked, with the reason in the message."""


class LrLayers(NamedTuple):
  """Depth of each parameter for layer-wise lr decay: `layer_of(path)` in 0..num_layers."""
  layer_of: Callable[[str], int]
  num_layers: int


def lr_layers_from_patterns(embeddings: str, block: str, fusion_block: str, depth: int,
                            fusion_depth: int) -> LrLayers:
  """MAE/BEiT's layer ids (`param_groups_lrd`) from three regexes on parameter paths.

  Embeddings are layer 0, modality-specific block i (group 1 of `block`) is i + 1, fusion
  block j (group 1 of `fusion_block`) follows the `depth` modality-specific ones, and
  everything else (final norms, heads, decoders) is the top, `num_layers`. The optimizer
  scales a layer's lr by decay ** (num_layers - layer).
  """
  embeddings_re, block_re, fusion_re = (re.compile(p) for p in (embeddings, block,
                                                                  fusion_block))
  top = depth + fusion_depth + 1

  def layer_of(path: str) -> int:
    if embeddings_re.search(path):
      return 0
    if match := block_re.search(path):
      return int(match.group(1)) + 1
    if match := fusion_re.search(path):
      return depth + int(match.group(1)) + 1
    return top

  return LrLayers(layer_of, top)


@dataclasses.dataclass(frozen=True)
class InitRules:
  """What a checkpoint gives a model when a run starts from it (`config.init_from`).

  Patterns are regexes searched in '/'-joined parameter paths. Every parameter not covered
  below is required: the checkpoint must hold it with the model's shape, and every
  checkpoint parameter not covered must exist in the model.
    drop:        checkpoint parameters the model never uses (a pretraining decoder): left out.
    optional:    parts of the model a checkpoint may lack, taken entry by entry where it
                 has them (one fusion block more than pretraining); checkpoint entries the
                 model does not have are left out.
    replaceable: parts taken whole or not at all, one per pattern (a classifier head): if
                 any checkpoint entry of the part is missing from the model or has another
                 shape (another class count), the whole part keeps its fresh values.
  """
  drop: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()
  replaceable: tuple[str, ...] = ()


def flat_params(params: Params) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a parameter tree."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)), sep="/")
  return dict(flat)


def count_blocks(state_dict: Mapping[str, Any], pattern: str) -> int:
  """How many blocks a reference state dict holds: the distinct group-1 indices of
  `pattern` in its keys, which must be 0..n-1."""
  ids = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
  if ids and ids != set(range(len(ids))):
    raise CheckpointError(f"block indices for {pattern!r} are not 0..n-1: {sorted(ids)}")
  return len(ids)


def _listing(names, n: int = 12) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f" ... and {len(names) - n} more" if len(names) > n else "")


def merge_params(init: Params, loaded: Mapping[str, Any], rules: InitRules,
                 source: str = "the checkpoint") -> tuple[Params, dict[str, list[str]]]:
  """`init` with what `loaded` ({path: array}, see `flat_params`) gives it under `rules`.

  Returns (params, report): params shaped and typed like `init` (numpy); report lists the
  paths "loaded" (from the checkpoint), "dropped" (in the checkpoint, not used) and
  "initialised" (kept from `init`). A checkpoint that does not fit raises CheckpointError
  naming the parameters, and shapes where they differ.
  """
  target = {k: np.asarray(v) for k, v in flat_params(init).items()}
  matches = lambda patterns, name: any(re.search(p, name) for p in patterns)
  fits = lambda name: name in target and np.shape(loaded[name]) == target[name].shape
  dropped = {k for k in loaded if matches(rules.drop, k)}
  for pattern in rules.replaceable:
    part = [k for k in loaded if k not in dropped and re.search(pattern, k)]
    if not all(fits(k) for k in part):
      dropped.update(part)
  dropped.update(k for k in loaded if k not in dropped and k not in target
                 and matches(rules.optional, k))
  kept = [k for k in loaded if k not in dropped]
  fresh = [k for k in target if k not in loaded or k in dropped]
  problems = []
  missing = [k for k in fresh if not matches(rules.optional + rules.replaceable, k)]
  if missing:
    problems.append(f"tensors missing: {_listing(missing)}")
  unexpected = [k for k in kept if k not in target]
  if unexpected:
    problems.append(f"tensors this model does not have: {_listing(unexpected)}")
  problems += [f"{k} has shape {tuple(np.shape(loaded[k]))}, the model expects "
               f"{target[k].shape}" for k in sorted(kept) if k in target and not fits(k)]
  if problems:
    raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
  merged = dict(target)
  for k in kept:
    merged[k] = np.asarray(loaded[k]).astype(target[k].dtype)
  params = flax.traverse_util.unflatten_dict(merged, sep="/")
  return params, {"loaded": sorted(kept), "dropped": sorted(dropped),
                  "initialised": sorted(fresh)}


AUDIO_POSITION_FITS = ("crop", "interpolate")


def fit_time_axis(table: np.ndarray, time_patches: int, how: str) -> np.ndarray:
  """A position table [..., T, ..., D] as `time_patches` positions along axis 0.

  crop: the first positions (those a zero-padded short clip occupies in the trained model;
  for fixed sin-cos tables exactly the table of the shorter grid). interpolate: the whole
  table resampled linearly (half-pixel centres, no antialiasing, as torch's
  F.interpolate(mode="bilinear") that AST uses), so the clip spans the trained range.
  """
  t = table.shape[0]
  if how == "crop":
    if time_patches > t:
      raise CheckpointError(f"crop cannot make {t} audio time positions into "
                            f"{time_patches}; use interpolate")
    return table[:time_patches]
  if how != "interpolate":
    raise ValueError(f"audio position fit must be one of {AUDIO_POSITION_FITS}, got {how!r}")
  resized = jax.image.resize(jnp.asarray(table, jnp.float32),
                             (time_patches,) + table.shape[1:], "linear", antialias=False)
  return np.asarray(resized).astype(table.dtype)


class AVModel(nn.Module):
  """The base of every model: shared fields, and the interface (module docstring).

  The input geometry, width, heads, norms, position-table training, rematerialisation and
  compute dtype are common to both families; each model adds its depths, video geometry
  and token grids (their layouts differ).
  """
  img_size: int = 224
  audio_length: int = 1024
  num_mel_bins: int = 128
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  num_heads: int = 12
  mlp_ratio: float = 4.0
  norm_eps: float = layers.TORCH_LAYERNORM_EPS
  trainable_pos_embed: bool = False
  # How the blocks compute (layers.py): rematerialisation policy, one lax.scan per stack of
  # blocks instead of unrolled blocks, the attention implementation, the compute dtype.
  # None of these changes the parameters.
  remat_policy: str = "none"
  scan_layers: bool = False  # models.build also takes "auto" (True on TPU/GPU)
  attention: str = "xla"
  dtype: Dtype = jnp.float32

  kind: ClassVar[str] = ""
  is_classifier: ClassVar[bool] = False
  # The audio position tables (top-level parameter names), the rows before their grid (a
  # cls row) and the grid axis that is time: what `fit_audio_positions` resizes.
  audio_position_tables: ClassVar[tuple[str, ...]] = ()
  position_cls_rows: ClassVar[int] = 0
  audio_time_axis: ClassVar[int] = 0
  metric_names: ClassVar[tuple[str, ...]] = ()
  # Width/depth/head presets, e.g. {"base": {...}, "tiny": {...}} (see `size_fields`).
  sizes: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

  @classmethod
  def size_fields(cls, size: str) -> dict[str, Any]:
    """The width/depth/head fields of a size preset that this class has (a fine-tuning
    model has no decoder)."""
    if size not in cls.sizes:
      raise ValueError(f"model size must be one of {sorted(cls.sizes)}, got {size!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in cls.sizes[size].items() if k in known}

  # -- Interface ------------------------------------------------------------------------

  def input_shapes(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes of (audio, frames) this model takes."""
    raise NotImplementedError

  @property
  def frames_per_input(self) -> int:
    """1 for models that take single frames [B, H, W, C], N for clips [B, N, H, W, C]."""
    frames = self.input_shapes()[1].shape
    return 1 if len(frames) == 4 else frames[1]

  @property
  def needs_teacher(self) -> bool:
    return False

  def modes(self) -> tuple[str, ...]:
    """The classification modes this model runs (none for pretraining models)."""
    return ()

  def frozen_param_names(self) -> tuple[str, ...]:
    """Top-level parameters the optimizer must not update (fixed sin-cos tables)."""
    return ()

  def lr_layers(self) -> LrLayers:
    raise NotImplementedError

  def init_rules(self) -> InitRules:
    """Pretraining models take a checkpoint of their own architecture, every tensor."""
    return InitRules()

  def fit_audio_positions(self, loaded: Mapping[str, Any], how: str) -> dict[str, Any]:
    """`loaded` ({path: array}) with its audio position tables made to fit this model's
    audio_length (`fit_time_axis`: "crop" or "interpolate"), e.g. to fine-tune a model
    pretrained on 1,024 frames (10.24 s) at 256 frames on short clips; what
    `config.init_audio_pos` asks of `config.init_from`. Other tables are left as they are.
    """
    out = dict(loaded)
    freq = self.num_mel_bins // self.patch_size
    want = self.audio_length // self.patch_size
    for name in self.audio_position_tables:
      if name not in loaded:
        continue
      table = np.asarray(loaded[name])
      cls, grid = table[:, :self.position_cls_rows], table[:, self.position_cls_rows:]
      if grid.shape[1] % freq:
        raise CheckpointError(f"{name}: {grid.shape[1]} positions are not a grid of {freq} "
                              "frequency rows")
      have = grid.shape[1] // freq
      if have == want:
        continue
      rows = (have, freq) if self.audio_time_axis == 0 else (freq, have)
      grid = grid.reshape(grid.shape[0], *rows, grid.shape[-1])
      # Time first, then back: fit_time_axis works along axis 0.
      grid = np.moveaxis(grid, 1 + self.audio_time_axis, 0)
      grid = np.moveaxis(fit_time_axis(grid, want, how), 0, 1 + self.audio_time_axis)
      out[name] = np.concatenate([cls, grid.reshape(grid.shape[0], -1, grid.shape[-1])], 1)
    return out

  def forward_flops(self, mode: str = "multimodal") -> float:
    raise NotImplementedError

  def teacher_flops(self) -> float:
    """A self-training teacher's forward pass per sample (0: no teacher)."""
    return 0.0

  def map_imagenet_mae(self, mae: Mapping[str, Any], target: Mapping[str, np.ndarray]
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
    """An ImageNet MAE ViT state dict mapped onto this model's reference state dict
    (`export --imagenet_mae`); (mapped state dict, keys left at `target`'s values)."""
    raise ValueError("--imagenet_mae initialises a pretraining model (model.kind='cav_mae')")

  def check_inpainting(self) -> None:
    """Raises ValueError unless the model can draw inpainting pictures (`inpaint`)."""
    raise ValueError(f"inpainting needs a pretraining model (cav_mae) with its decoder; "
                     f"this is a {self.kind} model")

  # -- Helpers both families use ---------------------------------------------------------

  def make_block(self, dim: int, heads: int, name: str, static_modality: bool = False,
                 **fields) -> nn.Module:
    """One transformer block of a stack (layers.Block), rematerialised under
    `remat_policy` when the stack is unrolled (a scanned stack remats its scan body).
    `static_modality`: the block takes CAV-MAE's modality string as a Python argument."""
    layers.check_compute_fields(self.remat_policy, self.attention)
    cls = layers.Block
    if self.remat_policy != "none" and not self.scan_layers:
      cls = nn.remat(cls, policy=layers.remat_policy(self.remat_policy),
                     static_argnums=(2,) if static_modality else ())
    return cls(dim, heads, self.mlp_ratio, self.norm_eps, self.dtype,
               attention=self.attention, name=name, **fields)

  def run(self, blocks, x: jax.Array, *static_args) -> jax.Array:
    """`x` through `blocks` in order (scanned when `scan_layers`; layers.BlockStack)."""
    return layers.BlockStack(self, blocks, self.scan_layers, self.remat_policy)(x, *static_args)

  @property
  def num_audio_tokens(self) -> int:
    rows, cols = self.audio_grid
    return rows * cols

  def _pos(self, table: jax.Array) -> jax.Array:
    """A position table, fixed (no gradient) unless `trainable_pos_embed`."""
    return table if self.trainable_pos_embed else jax.lax.stop_gradient(table)

  def check_audio(self, audio: Optional[jax.Array]):
    want = (self.audio_length, self.num_mel_bins)
    if audio is not None and (audio.ndim != 3 or audio.shape[1:] != want):
      raise ValueError(f"audio must be [batch, {want[0]}, {want[1]}] (time, mel bins), "
                       f"got {tuple(audio.shape)}")


# -- Parameters of a module, without a checkpoint ------------------------------------------


def example_inputs(module: AVModel, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of (audio, frames) that `module` takes."""
  return tuple(module.input_shapes(batch))


def _init(module: AVModel, seed, audio, frames):
  rngs = {"params": jax.random.fold_in(jax.random.key(seed), 0),
          "masking": jax.random.fold_in(jax.random.key(seed), 1)}
  return module.init(rngs, audio, frames)["params"]


def boxed_abstract_params(module: AVModel) -> Params:
  """Shapes and dtypes of the parameters with their logical axis names (nn.Partitioned)."""
  return jax.eval_shape(functools.partial(_init, module, 0), *example_inputs(module))


def abstract_params(module: AVModel) -> Params:
  """Parameter shapes and dtypes without computing anything (jax.eval_shape of init)."""
  return nn.meta.unbox(boxed_abstract_params(module))


def init_params(module: AVModel, seed: int = 0) -> Params:
  """Freshly initialised parameters (the reference's initialisation scheme)."""
  audio, frames = (jnp.zeros(s.shape, s.dtype) for s in example_inputs(module))
  return jax.jit(lambda a, v: nn.meta.unbox(_init(module, seed, a, v)))(audio, frames)
