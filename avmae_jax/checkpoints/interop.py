"""Exact conversion between Flax parameters and reference PyTorch state dicts.

Flax names mirror the reference modules (layers.py), so the mapping is mechanical:
  module `blocks_a_3`       <-> `blocks_a.3`   (a trailing _<int> is a list index)
  Dense `kernel` [in, out]  <-> `weight` [out, in]
  Conv `kernel` [kh,kw,I,O] <-> `weight` [O, I, kh, kw]
  Conv3d `kernel` [kt,kh,kw,I,O] <-> `weight` [O, I, kt, kh, kw]   (MAViL's video tubelets)
  LayerNorm `scale`         <-> `weight`
Everything else keeps its name and shape. Conversion is numpy-only; torch is imported
only to read or write `.pth` files.

This covers CAV-MAE and MAViL alike (MAViL's key layout: `avmae_jax.torch_port.mavil`).
Also here: reading a `.pth` robustly (`module.` prefix, nested "model"/"state_dict"), and a
reference state dict under native names without a model (`state_dict_to_native`). What a
state dict says about its architecture, and the ImageNet-MAE initialisation, are the
models' own (`models.config_from_state_dict`, `CAVMAE.map_imagenet_mae`).
"""

import os
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from avmae_jax.models.common import CheckpointError

Params = Any
StateDict = dict[str, np.ndarray]

_LIST_INDEX = re.compile(r"^(.*)_(\d+)$")
_MAX_LISTED = 12


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


def state_dict_to_native(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A reference state dict as {'/'-joined Flax parameter path: array in Flax layout}.

  The inverse of `flax_to_torch` without a template: `blocks_a.3` is the module
  `blocks_a_3`; a `weight` is a LayerNorm `scale` when 1-D, else a Dense or Conv `kernel`
  (these models have no other 1-D weights), transposed by its number of axes.
  """
  out = {}
  for key, value in strip_module_prefix(state_dict).items():
    value = np.asarray(value)
    *modules, leaf = key.split(".")
    if not modules:  # a top-level parameter (tokens, position tables)
      out[leaf] = value
      continue
    names = []
    for part in modules:
      if part.isdigit() and names:
        names[-1] += f"_{part}"
      else:
        names.append(part)
    if leaf == "weight":
      leaf = "scale" if value.ndim == 1 else "kernel"
    out["/".join(names + [leaf])] = np.ascontiguousarray(_to_flax_layout(value, leaf))
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

