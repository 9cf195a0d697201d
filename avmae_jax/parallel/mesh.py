"""The device mesh and the shardings made from it (the axes and rules are in rules.py).

Parameters get theirs from their logical axis names through `rules.RULES`; optimizer state
follows its parameters; batches are split over data x fsdp.
"""

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from avmae_jax.parallel.rules import BATCH_AXES
from avmae_jax.parallel.rules import MESH_AXES
from avmae_jax.parallel.rules import RULES


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None
              ) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh has unknown axes {unknown}; axes are {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive, with at most one -1: {dict(shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices do not divide by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"there are {len(devices)}")
  try:  # topology-aware placement where jax knows the interconnect (TPU, GPU)
    grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of nn.Partitioned (e.g. jax.eval_shape of model.init)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path
               if hasattr(k, "key") or hasattr(k, "name"))


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that holds copies of the parameters (optimizer moments,
  accumulated gradients) plus scalars: a leaf whose dict path ends with a parameter's
  path and has its shape gets that parameter's sharding, anything else is replicated."""
  by_path = {}
  for (path, value), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                     jax.tree.leaves(param_shardings)):
    by_path[_dict_keys(path)] = (value.shape, sharding)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == getattr(leaf, "shape", None):
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)
