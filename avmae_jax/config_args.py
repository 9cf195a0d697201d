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


def check_choice(name: str, value, choices):
  """Returns `value` if it is one of `choices`, else raises a ValueError naming `name`."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
  return value


def training_run(batch_size: int, num_epochs: int, eval_every: int,
                 init_from: str = "") -> ml_collections.ConfigDict:
  """The run-level fields every training config starts from (the rest is added per config).

  eval_every: steps between evaluations; -1: at the end of every epoch; 0: never.
  init_from: a model checkpoint directory, training workdir or `.pth` to start from.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = batch_size  # global
  config.num_epochs = num_epochs
  config.total_steps = -1  # -1: num_epochs x steps per epoch of the training split
  config.log_every = 100
  config.checkpoint_every = 2000
  config.keep_checkpoints = 3
  config.eval_every = eval_every
  config.init_from = init_from
  # When init_from's audio position tables are for another audio length than
  # model.audio_length (e.g. fine-tuning a 1,024-frame model on 2.56 s clips with
  # audio_length=256): "crop" keeps the first positions (where a padded short clip sits in
  # the trained model), "interpolate" resamples the whole table to the new length (AST's
  # choice); "" (default) refuses a checkpoint of another length.
  config.init_audio_pos = ""
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  # JAX's persistent compilation cache: a restarted or resumed run loads its compiled
  # programs instead of compiling them again. "auto": $JAX_COMPILATION_CACHE_DIR if set,
  # else ~/.cache/avmae_jax/jax (XDG_CACHE_HOME respected); a path (or gs:// bucket shared
  # by a pod's hosts); "" turns it off.
  config.compilation_cache_dir = "auto"
  return config


def compute_fields() -> dict:
  """How every recipe's model computes (models/layers.py). "auto" follows the backend: on
  TPU and GPU bfloat16 compute (parameters, optimizer state, norms, softmax and losses stay
  float32) and scanned blocks (one compiled block per stack); on CPU float32 and unrolled
  blocks, which run about 5% faster there and compile faster at small depths. No
  rematerialisation; cuDNN's fused attention where it applies."""
  return dict(dtype="auto", scan_layers="auto", remat_policy="none", attention="auto")


def short_run(config: ml_collections.ConfigDict, steps: int, warmup_steps: int,
              lr: float) -> None:
  """Turns `config` into a short CPU run of `steps` steps at batch 32 (demos, synthetic
  variants): evaluation at the end, lr fixed (not scaled by the small batch), warmup and
  cosine length in steps."""
  config.batch_size = 32
  config.total_steps = steps
  config.eval_every = steps
  config.optimizer.lr = lr
  config.optimizer.lr_scale_by_batch = False
  config.optimizer.warmup_epochs = None
  config.optimizer.warmup_steps = warmup_steps
  config.optimizer.total_steps = steps
