"""Helpers for big_vision-style configs: `get_config("size=base,data=audioset")`.

`parse_arg` turns the text after the colon of `configs/FILE.py:ARGS` into a ConfigDict
of typed values; `load_config` loads "path[:args]" without absl flags (tests, notebooks).
"""

import importlib.util
import os

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" against `defaults`; values take the default's type.

  Unknown keys are errors naming the key and the accepted ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; accepted: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} must be true or false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads "configs/FILE.py[:args]" by calling its get_config(args)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location("_avmae_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
