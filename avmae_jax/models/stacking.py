"""The scan layout of a parameter tree: each stack of identical blocks as one stacked entry.

Models store their parameters per block (`blocks_a_0/...`, the reference's layout) and
`layers.BlockStack` stacks them inside the computation. The train state holds them stacked
(`blocks_a/...` with a leading layer axis) when the model scans its blocks, so that the
optimizer updates one array per stack and leaf instead of one per block — a few dozen
elementwise programs for XLA to compile instead of hundreds. The conversion happens at the
train state's boundaries (checkpoints, evaluation, init-from, saved models; training/steps.py),
both ways, like big_vision's `pyloop_to_scan` / `scan_to_pyloop`, so every file on disk keeps
the per-block layout.

`stack` and `unstack` work on any pytree that holds copies of the parameter dict (the
parameters, Adam's moments, a weight-average sum): every dict that has a stack's block keys
is converted, everything else passes through.
"""

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_AXIS = "layers"  # logical name of the stacked axis (replicated: parallel/rules.py)
Stacks = Mapping[str, int]  # stack name -> number of blocks, e.g. {"blocks_a": 11}


def find_stacks(params: Mapping[str, Any]) -> dict[str, int]:
  """The stacks of a per-block parameter dict: top-level entries `<name>_0 .. <name>_{n-1}`
  (n >= 2) with the same tree structure, shapes and dtypes."""
  groups: dict[str, dict[int, Any]] = {}
  for key, value in params.items():
    match = re.fullmatch(r"(.+)_(\d+)", key)
    if match and isinstance(value, Mapping):
      groups.setdefault(match.group(1), {})[int(match.group(2))] = value
  stacks = {}
  for name, members in groups.items():
    n = len(members)
    if n < 2 or sorted(members) != list(range(n)) or name in params:
      continue
    signature = lambda tree: jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)),
                                          nn.meta.unbox(tree))
    first = signature(members[0])
    if all(signature(members[i]) == first for i in range(1, n)):
      stacks[name] = n
  return stacks


def _has_blocks(tree: Any, stacks: Stacks) -> bool:
  return isinstance(tree, Mapping) and any(f"{name}_0" in tree for name in stacks)


def _has_stacks(tree: Any, stacks: Stacks) -> bool:
  return isinstance(tree, Mapping) and any(name in tree for name in stacks)


def _stack_leaves(*leaves):
  if isinstance(leaves[0], nn.Partitioned):  # logical axis names get the layer axis first
    value = jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].value.shape),
                                 leaves[0].value.dtype)
    return leaves[0].replace(value=value, names=(LAYER_AXIS,) + tuple(leaves[0].names))
  if isinstance(leaves[0], np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _map_param_dicts(tree: Any, selects: Callable[[Any], bool],
                     convert: Callable[[Mapping[str, Any]], dict]) -> Any:
  """`convert` applied to every dict of `tree` that `selects` picks; the rest unchanged."""
  return jax.tree.map(lambda node: convert(node) if selects(node) else node, tree,
                      is_leaf=selects)


def stack(tree: Any, stacks: Stacks) -> Any:
  """Per-block layout -> scan layout (also on boxed abstract parameters, for shardings)."""
  if not stacks:
    return tree

  def convert(node):
    out = {k: v for k, v in node.items()
           if not any(re.fullmatch(re.escape(name) + r"_\d+", k) for name in stacks)}
    for name, n in stacks.items():
      out[name] = jax.tree.map(_stack_leaves, *[node[f"{name}_{i}"] for i in range(n)],
                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return out

  return _map_param_dicts(tree, lambda x: _has_blocks(x, stacks), convert)


def unstack(tree: Any, stacks: Stacks) -> Any:
  """Scan layout -> per-block layout (the layout of checkpoints, models and the modules)."""
  if not stacks:
    return tree

  def convert(node):
    out = {k: v for k, v in node.items() if k not in stacks}
    for name, n in stacks.items():
      for i in range(n):
        out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], node[name])
    return out

  return _map_param_dicts(tree, lambda x: _has_stacks(x, stacks), convert)


def block_names(path: str, stacks: Stacks) -> list[str]:
  """The per-block parameter names a ('/'-joined) scan-layout leaf name stands for."""
  head, sep, rest = path.partition("/")
  if head in stacks:
    return [f"{head}_{i}{sep}{rest}" for i in range(stacks[head])]
  return [path]
