"""Exact conversion between Flax parameters and reference PyTorch state dicts.

Flax names mirror the reference modules (layers.py), so the mapping is mechanical:
  module `blocks_a_3`       <-> `blocks_a.3`   (a trailing _<int> is a list index)
  Dense `kernel` [in, out]  <-> `weight` [out, in]
  Conv `kernel` [kh,kw,I,O] <-> `weight` [O, I, kh, kw]
  Conv3d `kernel` [kt,kh,kw,I,O] <-> `weight` [O, I, kt, kh, kw]   (MAViL's video tubelets)
  LayerNorm `scale`         <-> `weight`
Everything else keeps its name and shape. Conversion is numpy-only; torch is imported
only to read or write `.pth` files.

This covers CAV-MAE and MAViL alike (MAViL's key layout: `avmae_jax.torch_port`, MAViL
section). Also here: reading a `.pth` robustly (`module.` prefix, nested "model"/"state_dict"),
inferring the architecture (CAV-MAE or MAViL) from a state dict, and the reference's
ImageNet-MAE ViT-B -> CAV-MAE initialisation mapping (cav-mae spec section 6).
"""

import os
import re
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import numpy as np

Params = Any
StateDict = dict[str, np.ndarray]

_LIST_INDEX = re.compile(r"^(.*)_(\d+)$")
_MAX_LISTED = 12


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked, with the reason in the message."""


def _torch_key(path: tuple[str, ...]) -> tuple[str, str]:
  """Flax param path -> (torch key, leaf kind)."""
  *modules, leaf = path
  parts = []
  for name in modules:
    match = _LIST_INDEX.match(name)
    parts.extend([match.group(1), match.group(2)] if match else [name])
  if not modules:  # a top-level parameter (tokens, position tables)
    return leaf, "plain"
  name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(parts + [name]), leaf


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf == "kernel" and value.ndim == 5:
    return value.transpose(4, 3, 0, 1, 2)
  return value


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 5:
    return value.transpose(2, 3, 4, 1, 0)
  return value


def _flat(params: Params) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)))


def torch_shapes(params: Params) -> dict[str, tuple[int, ...]]:
  """The reference state dict's key -> shape for Flax params (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, value in _flat(params).items():
    key, leaf = _torch_key(path)
    out[key] = tuple(_to_torch_layout(np.empty(value.shape, np.int8), leaf).shape)
  return out


def flax_to_torch(params: Params) -> StateDict:
  """Flax params -> reference state dict (numpy arrays, torch layout and names)."""
  out = {}
  for path, value in _flat(params).items():
    key, leaf = _torch_key(path)
    out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), leaf))
  return out


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops DataParallel's `module.` prefix where every key has it."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _listing(keys) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def torch_to_flax(state_dict: Mapping[str, Any], template: Params, strict: bool = True,
                  source: str = "state dict") -> tuple[Params, dict[str, list[str]]]:
  """Reference state dict -> Flax params shaped like `template` (arrays or ShapeDtypeStructs).

  A shape mismatch is always an error naming the key and both shapes. With `strict`,
  missing or unexpected keys are errors naming them; otherwise missing entries keep the
  template's values (which must then be arrays) and the report lists both sets.
  """
  state_dict = strip_module_prefix(state_dict)
  flat_template = _flat(template)
  expected = {}
  for path in flat_template:
    key, leaf = _torch_key(path)
    expected[key] = (path, leaf)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  if strict and (missing or unexpected):
    problems = []
    if missing:
      problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
      problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
  flat = {}
  for key, (path, leaf) in expected.items():
    want = flat_template[path]
    if key not in state_dict:
      if not isinstance(want, (np.ndarray, jax.Array)):
        raise CheckpointError(f"{source}: {key} is missing and the template has no value")
      flat[path] = want
      continue
    value = np.asarray(state_dict[key])
    want_shape = tuple(_to_torch_layout(np.empty(want.shape, np.int8), leaf).shape)
    if value.shape != want_shape:
      raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {want_shape}")
    flat[path] = np.ascontiguousarray(_to_flax_layout(value, leaf)).astype(want.dtype)
  return flax.traverse_util.unflatten_dict(flat), {"missing": missing,
                                                   "unexpected": unexpected}


def read_pth(path: str) -> StateDict:
  """Reads a `.pth` state dict as numpy arrays, with a clear error for anything else."""
  import torch  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad file; name the file instead
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
  for nested in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(nested), Mapping):
      obj = obj[nested]
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"found {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise CheckpointError(f"{path}: not a state dict: entries {_listing(map(str, bad))} "
                          "are not tensors")
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point()
          else v.detach().numpy() for k, v in strip_module_prefix(obj).items()}


def write_pth(state_dict: Mapping[str, np.ndarray], path: str,
              module_prefix: bool = False) -> None:
  """Writes numpy arrays as a torch state dict (optionally with DataParallel's prefix)."""
  import torch  # pylint: disable=import-outside-toplevel

  prefix = "module." if module_prefix else ""
  tensors = {prefix + k: torch.from_numpy(np.array(v, copy=True))
             for k, v in state_dict.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch.save(tensors, path)


def _count(state_dict: Mapping[str, np.ndarray], pattern: str) -> int:
  ids = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
  if ids and ids != set(range(len(ids))):
    raise CheckpointError(f"block indices for {pattern!r} are not 0..n-1: {sorted(ids)}")
  return len(ids)


def infer_model_config(state_dict: Mapping[str, np.ndarray],
                       source: str = "state dict") -> dict[str, Any]:
  """A model config (see avmae_jax.models.build) that fits a reference state dict.

  Shapes fix widths, depths, grid sizes and the class count; head counts cannot be read
  from shapes, so they follow the ViT convention (head_dim 64 in the encoder, 32 in the
  decoder) unless the caller overrides them.
  """
  sd = strip_module_prefix(state_dict)
  if "patch_embed_v.proj.weight" in sd and len(sd["patch_embed_v.proj.weight"].shape) == 5:
    return _infer_mavil_config(sd, source)

  def shape(key):
    if key not in sd:
      raise CheckpointError(f"{source}: not a CAV-MAE state dict (no {key}), nor a MAViL "
                            "one (no 5-D patch_embed_v.proj.weight)")
    return tuple(sd[key].shape)

  embed_dim = shape("modality_a")[-1]
  patch = shape("patch_embed_a.proj.weight")[-1]
  n_audio, n_video = shape("pos_embed_a")[1], shape("pos_embed_v")[1]
  mel_rows = 128 // patch  # the reference fixes 128 mel bins; its audio grid is (8, T/16)
  side = int(round(n_video ** 0.5))
  cfg = dict(
      img_size=side * patch, audio_length=(n_audio // mel_rows) * patch,
      num_mel_bins=mel_rows * patch, patch_size=patch,
      in_chans=shape("patch_embed_v.proj.weight")[1], embed_dim=embed_dim,
      num_heads=max(1, embed_dim // 64),
      modality_specific_depth=_count(sd, r"blocks_a\.(\d+)\."),
      shared_depth=_count(sd, r"blocks_u\.(\d+)\."),
      mlp_ratio=shape("blocks_a.0.mlp.fc1.weight")[0] / embed_dim)
  if "mlp_head.1.weight" in sd:
    return dict(kind="cav_mae_ft", num_classes=shape("mlp_head.1.weight")[0], **cfg)
  decoder_dim = shape("decoder_embed.weight")[0]
  return dict(kind="cav_mae", decoder_embed_dim=decoder_dim,
              decoder_depth=_count(sd, r"decoder_blocks\.(\d+)\."),
              decoder_num_heads=max(1, decoder_dim // 32), **cfg)


def _infer_mavil_config(sd: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """`infer_model_config` for MAViL state dicts (kinds mavil and mavil_ft).

  Shapes give the token counts, not the input sizes; like the reference, we assume 128 mel
  bins (so audio_length = tokens / 8 * 16) and 224x224 frames (so num_frames = video tokens
  / 196 * tubelet). Other input sizes: pass them as overrides.
  """

  def shape(key):
    if key not in sd:
      raise CheckpointError(f"{source}: not a MAViL state dict (no {key})")
    return tuple(sd[key].shape)

  embed_dim, in_chans, tubelet, patch, _ = shape("patch_embed_v.proj.weight")
  n_audio, n_video = shape("pos_embed")[1] - 1, shape("pos_embed_v")[1] - 1
  mel_cols, side = 128 // patch, 224 // patch
  if n_audio % mel_cols or n_video % (side * side):
    raise CheckpointError(
        f"{source}: {n_audio} audio / {n_video} video tokens do not fit 128 mel bins and "
        f"224x224 frames with patch {patch}; pass the input sizes as overrides")
  cfg = dict(
      img_size=side * patch, num_frames=n_video // (side * side) * tubelet,
      tubelet_size=tubelet, audio_length=n_audio // mel_cols * patch,
      num_mel_bins=mel_cols * patch, patch_size=patch, in_chans=in_chans,
      embed_dim=embed_dim, num_heads=max(1, embed_dim // 64),
      encoder_depth=_count(sd, r"blocks\.(\d+)\."),
      mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / embed_dim)
  fusion_depth = _count(sd, r"blocks_av\.(\d+)\.")
  if "head_av.weight" in sd or "head_a.weight" in sd:
    has_av, has_uni = "head_av.weight" in sd, "head_a.weight" in sd
    heads = "all" if has_av and has_uni else ("multimodal" if has_av else "unimodal")
    classes = shape("head_av.weight" if has_av else "head_a.weight")[0]
    if has_av:
      cfg["fusion_depth"] = fusion_depth
    return dict(kind="mavil_ft", num_classes=classes, heads=heads, **cfg)
  decoder_dim, _ = shape("decoder_embed.weight")
  out_a, out_v = shape("decoder_pred.weight")[0], shape("decoder_pred_v.weight")[0]
  if out_a == patch * patch and out_v == tubelet * patch * patch * in_chans:
    stage = 1
  elif out_a == out_v == embed_dim:
    stage = 2
  else:
    raise CheckpointError(f"{source}: decoder_pred / decoder_pred_v output {out_a} / {out_v} "
                          f"values, neither pixels (stage 1) nor features {embed_dim} (stage 2)")
  return dict(kind="mavil", stage=stage, fusion_depth=fusion_depth,
              decoder_embed_dim=decoder_dim,
              decoder_depth=_count(sd, r"decoder_blocks\.(\d+)\."),
              decoder_num_heads=max(1, decoder_dim // 32), **cfg)


def imagenet_mae_state_dict(mae: Mapping[str, np.ndarray], template: Params,
                            modality_specific_depth: int) -> tuple[StateDict, list[str]]:
  """Maps an ImageNet MAE ViT state dict onto CAV-MAE (the reference's initialisation).

  MAE blocks 0..d-1 go to blocks_a.i and blocks_v.i, the rest to blocks_u (their norms
  also into the _a/_v norms); MAE `norm` to norm, norm_a and norm_v; the RGB patch conv to
  patch_embed_v and, summed over RGB, to patch_embed_a; the decoder by name; decoder_pred to
  decoder_pred_v and its first p*p rows to decoder_pred_a; the MAE position tables without
  their cls row to pos_embed_v / decoder_pos_embed_v. Returns the CAV-MAE state dict (the
  template's values where MAE has nothing) and the keys that kept the template's values.
  """
  mae = strip_module_prefix(mae)
  if "blocks.0.attn.qkv.weight" not in mae:
    raise CheckpointError("not an MAE ViT state dict (no blocks.0.attn.qkv.weight)")
  out = flax_to_torch(template)
  mapped = {}

  def put(key, value):
    if key not in out:
      return
    value = np.asarray(value, np.float32)
    if value.shape != out[key].shape:
      raise CheckpointError(f"MAE checkpoint: {key} would get shape {value.shape}, "
                            f"the model expects {out[key].shape}")
    mapped[key] = value

  d = modality_specific_depth
  for key, value in mae.items():
    if key.startswith("blocks."):
      _, idx, rest = key.split(".", 2)
      idx = int(idx)
      if idx < d:
        put(f"blocks_a.{idx}.{rest}", value)
        put(f"blocks_v.{idx}.{rest}", value)
      else:
        put(f"blocks_u.{idx - d}.{rest}", value)
        if rest.startswith(("norm1.", "norm2.")):
          for m in ("a", "v"):
            put(f"blocks_u.{idx - d}.{rest[:5]}_{m}.{rest[6:]}", value)
    elif key.startswith("norm."):
      for name in ("norm", "norm_a", "norm_v"):
        put(f"{name}.{key[5:]}", value)
    elif key == "patch_embed.proj.weight":
      put("patch_embed_v.proj.weight", value)
      put("patch_embed_a.proj.weight", np.asarray(value).sum(axis=1, keepdims=True))
    elif key == "patch_embed.proj.bias":
      put("patch_embed_v.proj.bias", value)
      put("patch_embed_a.proj.bias", value)
    elif key in ("pos_embed", "decoder_pos_embed"):
      put(f"{key}_v", np.asarray(value)[:, 1:])
    elif key.startswith("decoder_pred."):
      leaf = key.split(".", 1)[1]
      put(f"decoder_pred_v.{leaf}", value)
      rows = out[f"decoder_pred_a.{leaf}"].shape[0]
      put(f"decoder_pred_a.{leaf}", np.asarray(value)[:rows])
    else:  # decoder_embed, decoder_blocks, decoder_norm, mask_token: same names
      put(key, value)
  out.update(mapped)
  return out, sorted(set(out) - set(mapped))
