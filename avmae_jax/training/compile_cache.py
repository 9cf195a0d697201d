"""JAX's persistent compilation cache for the commands that compile the big programs.

A preempted run that restarts (on every host of a pod) would otherwise compile its train
step again; with the cache it loads the compiled program. The directory is
`config.compilation_cache_dir`: "auto" is $JAX_COMPILATION_CACHE_DIR when set, else
$XDG_CACHE_HOME/avmae_jax/jax (~/.cache/avmae_jax/jax); any path JAX can write works,
including a gs:// bucket that all of a pod's hosts share; "" turns the cache off.
"""

import os
from typing import Optional

import jax


def resolve(setting: Optional[str]) -> str:
  """The cache directory a config's `compilation_cache_dir` names ("" for none)."""
  if setting is None or setting == "auto":
    explicit = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if explicit:
      return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "avmae_jax", "jax")
  if not isinstance(setting, str):
    raise ValueError(f"config.compilation_cache_dir must be a path, 'auto' or '', "
                     f"got {setting!r}")
  return setting if "://" in setting else os.path.expanduser(setting)


def enable(setting: Optional[str]) -> str:
  """Points JAX's persistent compilation cache at `resolve(setting)`; returns it."""
  path = resolve(setting)
  if path:
    if "://" not in path:
      os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
  return path
