"""Optimizer factory: the CAV-MAE and MAViL recipes as one optax GradientTransformation.

`make_optimizer(config, params, steps_per_epoch, global_batch_size, lr_layers)` reads
`config.optimizer` (defaults: `default_optimizer_config()`) and returns `(tx, schedule)`:

  * `tx` is the whole update rule: frozen parameters -> gradient clipping -> per-group
    optimizer -> layer-wise lr scale, optionally wrapped in gradient accumulation.
  * `schedule(step)` is the learning rate of the BASE parameter group at training-loop step
    `step` (the number of batches consumed before this one); the head group uses
    `schedule(step) * head_lr_mult`. Use it for logging only: `tx` carries its own counters.

Recipes (`optimizer.name`):
  "adam_step"     CAV-MAE reference (cav-mae spec section 6): torch.optim.Adam with coupled L2
                  weight decay (the decay is added to the gradient BEFORE the moments), lr
                  constant within an epoch and multiplied by `lr_decay` at every epoch in
                  range(lr_step_start, 1000, lr_step_every), i.e. torch's MultiStepLR stepped
                  once per epoch. No warmup.
  "adamw_cosine"  MAE / MAViL (mavil spec, Optimiser): torch.optim.AdamW (decoupled weight
                  decay), linear warmup from 0, then cosine decay to `min_lr` at `total_steps`.

Units. Every step count in the config (`warmup_steps`, `total_steps`) and `steps_per_epoch`
counts training-loop steps, one per global batch of `global_batch_size` examples. With
`grad_accum_steps = k > 1` the parameters change only on every k-th step (optax.MultiSteps
applies the mean of the k gradients); optimizer update u consumes loop steps u*k .. u*k+k-1 and
uses the learning rate of its FIRST loop step, u*k (MAE's accumulation convention: it sets the
lr when data_iter_step % accum_iter == 0). The counters inside `tx` count optimizer updates;
`schedule` takes loop steps and already accounts for k. `lr_scale_by_batch` scales by the
effective batch `global_batch_size * k / 256` (MAE's eff_batch_size includes accum_iter).

Parameter groups are picked by `re.search` on the '/'-joined parameter path relative to the
tree passed in (e.g. "mlp_head_1/kernel", "blocks_a_0/attn/qkv/bias"; pass the params
collection itself, not {"params": ...}): `frozen` (no update at all, not even weight decay; they
also do not count in the clipping norm, as in torch where they carry no .grad), `head_patterns`
(lr * `head_lr_mult`; frozen wins over head), the rest is the base group. Every pattern must
match some parameter (a typo is an error, not a silent no-op).

Layer-wise lr decay (`layer_decay` < 1, MAE/BEiT fine-tuning): a parameter at layer l of L
(the model's `lr_layers()`: embeddings 0, block i i+1, heads L) trains at lr *
layer_decay ** (L - l), weight decay included (torch param groups with lr_scale), on top of
the head multiplier.
"""

import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avmae_jax.models import stacking

NAMES = ("adam_step", "adamw_cosine")

# The reference builds MultiStepLR(milestones=list(range(start, 1000, step))).
_REFERENCE_MILESTONE_END = 1000

_FROZEN, _TRAINABLE, _BASE, _HEAD = "frozen", "trainable", "base", "head"

Schedule = Callable[[Any], Any]


def default_optimizer_config(name: str = "adam_step") -> ml_collections.ConfigDict:
  """The recipe defaults for `name` ("adam_step": CAV-MAE pretraining; "adamw_cosine": MAViL).

  Every field exists for both recipes (so that command-line overrides work either way);
  fields a recipe does not use must keep their neutral value (None), else it is an error.
  """
  if name not in NAMES:
    raise ValueError(f"optimizer.name must be one of {NAMES}, got {name!r}")
  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.name = name
  c.lr = 5e-5  # adam_step: AS-2M base pretraining; adamw_cosine: MAE's base lr per 256
  c.lr_scale_by_batch = False  # lr * global_batch_size * grad_accum_steps / 256
  c.b1 = 0.95
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 5e-7
  c.no_decay_1d = False  # exempt 1-D parameters (biases, norm scales) from weight decay
  c.no_decay_patterns = []  # regexes of parameters exempt from weight decay
  # adam_step: lr *= lr_decay at every epoch in range(lr_step_start, 1000, lr_step_every).
  c.lr_step_start = placeholder(int)
  c.lr_step_every = placeholder(int)
  c.lr_decay = placeholder(float)
  # adamw_cosine: warmup in steps or epochs (at most one), length in steps or epochs (exactly
  # one; if both are None the top-level `config.num_epochs` is used).
  c.warmup_steps = placeholder(int)
  c.warmup_epochs = placeholder(float)
  c.total_steps = placeholder(int)
  c.total_epochs = placeholder(int)
  c.min_lr = placeholder(float)
  c.grad_clip_norm = placeholder(float)  # None: no clipping
  c.grad_accum_steps = 1  # 1: off
  c.frozen = []  # regexes of parameters that are never updated
  c.head_patterns = []  # regexes of the head group, lr * head_lr_mult
  c.head_lr_mult = 1.0
  c.layer_decay = 1.0  # 1: off; else layer-wise lr decay (needs the model's layer ids)
  if name == "adam_step":
    c.lr_step_start = 10
    c.lr_step_every = 5
    c.lr_decay = 0.5
  else:
    c.lr = 1.5e-4
    c.lr_scale_by_batch = True
    c.b1 = 0.9
    c.b2 = 0.95
    c.weight_decay = 0.05
    c.no_decay_1d = True  # MAE's optim_factory.add_weight_decay
    c.warmup_epochs = 40.0  # MAE pretraining's warmup; set it with the run length
    c.min_lr = 0.0
  return c


def param_path(path: Sequence[Any]) -> str:
  """'/'-joined name of a pytree key path, e.g. "mlp_head_1/kernel"."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_paths(params: Any) -> list[str]:
  return [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def frozen_mask(patterns: Sequence[str], params: Any, stacks: stacking.Stacks = None) -> Any:
  """A tree of bools shaped like `params`: True where `make_optimizer` freezes the parameter.

  The same rule as `optimizer.frozen` (re.search on the '/'-joined path); the trainer uses it
  to stop gradients into frozen parameters (so that XLA drops their backward pass, e.g. the
  whole encoder when linear probing) and to keep them bit-identical. `stacks`: `params` is
  in the scan layout (models/stacking.py); patterns still see per-block names.
  """
  compiled = [re.compile(p) for p in patterns]
  return _label_fn(lambda path, _: any(c.search(path) for c in compiled), stacks)(params)


def _label_fn(fn: Callable[[str, Any], Any], stacks: stacking.Stacks = None
              ) -> Callable[[Any], Any]:
  # A callable rather than a precomputed tree: nested multi_transform hands the inner
  # transforms a tree in which other groups' leaves are MaskedNode, so labels must be computed
  # on whatever tree arrives; paths are unchanged by the masking.
  stacks = stacks or {}

  def label(path, leaf):
    name = param_path(path)
    names = stacking.block_names(name, stacks)
    if len(names) == 1:
      return fn(name, leaf)
    # A stacked leaf: every block of the stack must get the same label.
    block = jax.ShapeDtypeStruct(tuple(np.shape(leaf))[1:], leaf.dtype)
    labels = {fn(n, block) for n in names}
    if len(labels) > 1:
      raise ValueError(f"the optimizer treats the blocks of {name.split('/')[0]} differently "
                       f"({names[0]} ...); that needs model.scan_layers=False")
    return labels.pop()

  return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


# --- validation -------------------------------------------------------------------------------

def _fail(field: str, requirement: str, value: Any):
  raise ValueError(f"optimizer.{field} must {requirement}, got {value!r}")


def _number(c, field: str) -> float:
  value = c[field]
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value)):
    _fail(field, "be a finite number", value)
  return float(value)


def _integer(c, field: str) -> int:
  value = c[field]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    _fail(field, "be an integer", value)
  return int(value)


def _patterns(c, field: str, paths: list[str]) -> list[re.Pattern]:
  value = c[field]
  if isinstance(value, str) or not isinstance(value, (list, tuple)):
    _fail(field, "be a list of regular expressions", value)
  compiled = []
  for pattern in value:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f"optimizer.{field}: bad regular expression {pattern!r}: {e}") from e
    # A pattern that matches nothing is almost always a typo that would silently train
    # (or not freeze) the wrong parameters.
    if not any(compiled[-1].search(p) for p in paths):
      raise ValueError(f"optimizer.{field}: pattern {pattern!r} matches no parameter "
                       f"(parameters look like {paths[:4]})")
  return compiled


def _check_unused(c, fields: Sequence[str], name: str):
  for field in fields:
    if c[field] is not None:
      _fail(field, f"be None for optimizer.name={name!r} (unused there)", c[field])


def _validate(c: ml_collections.ConfigDict, paths: list[str]) -> dict[str, Any]:
  """Checks every field of `config.optimizer`; returns the values make_optimizer needs."""
  unknown = sorted(set(c.keys()) - set(default_optimizer_config().keys()))
  if unknown:
    raise ValueError(f"unknown optimizer field(s) {['optimizer.' + k for k in unknown]}")
  missing = sorted(set(default_optimizer_config().keys()) - set(c.keys()))
  if missing:
    raise ValueError(f"missing optimizer field(s) {['optimizer.' + k for k in missing]} "
                     "(start from avmae_jax.training.optim.default_optimizer_config())")
  v = {}
  if c.name not in NAMES:
    _fail("name", f"be one of {NAMES}", c.name)
  v["lr"] = _number(c, "lr")
  if v["lr"] <= 0:
    _fail("lr", "be > 0", c.lr)
  if not isinstance(c.lr_scale_by_batch, bool):
    _fail("lr_scale_by_batch", "be a bool", c.lr_scale_by_batch)
  for field in ("b1", "b2"):
    v[field] = _number(c, field)
    if not 0 <= v[field] < 1:
      _fail(field, "be in [0, 1)", c[field])
  v["eps"] = _number(c, "eps")
  if v["eps"] < 0:
    _fail("eps", "be >= 0", c.eps)
  v["weight_decay"] = _number(c, "weight_decay")
  if v["weight_decay"] < 0:
    _fail("weight_decay", "be >= 0", c.weight_decay)
  if not isinstance(c.no_decay_1d, bool):
    _fail("no_decay_1d", "be a bool", c.no_decay_1d)
  v["no_decay"] = _patterns(c, "no_decay_patterns", paths)
  v["frozen"] = _patterns(c, "frozen", paths)
  v["head"] = _patterns(c, "head_patterns", paths)
  v["head_lr_mult"] = _number(c, "head_lr_mult")
  if v["head_lr_mult"] <= 0:
    _fail("head_lr_mult", "be > 0", c.head_lr_mult)
  if v["head_lr_mult"] != 1 and not v["head"]:
    _fail("head_patterns", "be non-empty when optimizer.head_lr_mult != 1", c.head_patterns)
  v["layer_decay"] = _number(c, "layer_decay")
  if not 0 < v["layer_decay"] <= 1:
    _fail("layer_decay", "be in (0, 1] (1 = off)", c.layer_decay)
  if c.grad_clip_norm is not None:
    v["grad_clip_norm"] = _number(c, "grad_clip_norm")
    if v["grad_clip_norm"] <= 0:
      _fail("grad_clip_norm", "be None or > 0", c.grad_clip_norm)
  else:
    v["grad_clip_norm"] = None
  v["grad_accum_steps"] = _integer(c, "grad_accum_steps")
  if v["grad_accum_steps"] < 1:
    _fail("grad_accum_steps", "be >= 1 (1 = no accumulation)", c.grad_accum_steps)

  if c.name == "adam_step":
    _check_unused(c, ("warmup_steps", "warmup_epochs", "total_steps", "total_epochs", "min_lr"),
                  c.name)
    v["lr_step_start"] = _integer(c, "lr_step_start")
    if v["lr_step_start"] < 0:
      _fail("lr_step_start", "be >= 0", c.lr_step_start)
    v["lr_step_every"] = _integer(c, "lr_step_every")
    if v["lr_step_every"] < 1:
      _fail("lr_step_every", "be >= 1", c.lr_step_every)
    v["lr_decay"] = _number(c, "lr_decay")
    if v["lr_decay"] <= 0:
      _fail("lr_decay", "be > 0", c.lr_decay)
  else:
    _check_unused(c, ("lr_step_start", "lr_step_every", "lr_decay"), c.name)
    if c.warmup_steps is not None and c.warmup_epochs is not None:
      _fail("warmup_epochs", "be None when optimizer.warmup_steps is set", c.warmup_epochs)
    if c.warmup_steps is not None and _integer(c, "warmup_steps") < 0:
      _fail("warmup_steps", "be >= 0", c.warmup_steps)
    if c.warmup_epochs is not None and _number(c, "warmup_epochs") < 0:
      _fail("warmup_epochs", "be >= 0", c.warmup_epochs)
    if c.total_steps is not None and c.total_epochs is not None:
      _fail("total_epochs", "be None when optimizer.total_steps is set", c.total_epochs)
    if c.total_steps is not None and _integer(c, "total_steps") < 1:
      _fail("total_steps", "be >= 1", c.total_steps)
    if c.total_epochs is not None and _integer(c, "total_epochs") < 1:
      _fail("total_epochs", "be >= 1", c.total_epochs)
    if c.min_lr is None:
      _fail("min_lr", "be a number for adamw_cosine", c.min_lr)
    v["min_lr"] = _number(c, "min_lr")
    if v["min_lr"] < 0:
      _fail("min_lr", "be >= 0", c.min_lr)
  return v


# --- schedules --------------------------------------------------------------------------------

def _step_schedule(lr: float, start: int, every: int, decay: float,
                   steps_per_epoch: int) -> Schedule:
  """lr at loop step s, as MultiStepLR(range(start, 1000, every), decay) stepped per epoch."""
  num_milestones = len(range(start, _REFERENCE_MILESTONE_END, every))

  # Closed form rather than optax.piecewise_constant_schedule: the reference's milestones run
  # to epoch 1000 (up to ~1000 boundaries), which piecewise_constant unrolls into one
  # compare-and-select per boundary per group (seconds of compile time).
  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    passed = jnp.clip((epoch - start) // every + 1, 0, num_milestones)
    return lr * jnp.power(jnp.float32(decay), passed.astype(jnp.float32))

  return schedule


def _cosine_schedule(lr: float, min_lr: float, warmup_steps: int,
                     total_steps: int) -> Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=min_lr)


def _loop_schedule(c, v, steps_per_epoch: int, global_batch_size: int,
                   config: ml_collections.ConfigDict) -> Schedule:
  """The base-group lr as a function of the training-loop step."""
  lr = v["lr"]
  if c.lr_scale_by_batch:
    lr = lr * global_batch_size * v["grad_accum_steps"] / 256
  if c.name == "adam_step":
    return _step_schedule(lr, v["lr_step_start"], v["lr_step_every"], v["lr_decay"],
                          steps_per_epoch)
  if c.total_steps is not None:
    total = c.total_steps
  elif c.total_epochs is not None:
    total = c.total_epochs * steps_per_epoch
  elif config.get("num_epochs") is not None:
    total = config.num_epochs * steps_per_epoch
  else:
    raise ValueError("optimizer.total_steps (or optimizer.total_epochs, or config.num_epochs) "
                     "must be set for optimizer.name='adamw_cosine'")
  if c.warmup_steps is not None:
    warmup = c.warmup_steps
  elif c.warmup_epochs is not None:
    warmup = int(round(c.warmup_epochs * steps_per_epoch))
  else:
    warmup = 0
  if warmup >= total:
    _fail("warmup_steps", f"give fewer warmup steps than the {total} total steps", warmup)
  if v["min_lr"] > lr:
    _fail("min_lr", f"be <= the (scaled) peak lr {lr}", c.min_lr)
  return _cosine_schedule(lr, v["min_lr"], warmup, total)


# --- the optimizer ----------------------------------------------------------------------------

def _group(c, v, update_schedule: Schedule, mult: float, stacks: stacking.Stacks
           ) -> optax.GradientTransformation:
  """The optimizer of one trainable group, lr = update_schedule(update) * mult."""
  if mult == 1.0:
    lr_fn = update_schedule
  else:
    lr_fn = lambda count: update_schedule(count) * mult

  def decays(path: str, leaf) -> bool:
    if c.no_decay_1d and len(np.shape(leaf)) <= 1:
      return False
    return not any(p.search(path) for p in v["no_decay"])

  decay_mask = _label_fn(decays, stacks)
  if c.name == "adam_step":
    # torch.optim.Adam(weight_decay=wd): grad += wd * param before the moment updates.
    return optax.chain(
        optax.add_decayed_weights(v["weight_decay"], mask=decay_mask),
        optax.scale_by_adam(b1=v["b1"], b2=v["b2"], eps=v["eps"]),
        optax.scale_by_learning_rate(lr_fn))
  return optax.adamw(lr_fn, b1=v["b1"], b2=v["b2"], eps=v["eps"],
                     weight_decay=v["weight_decay"], mask=decay_mask)


def _scale_by_layer(decay: float, layer_of: Callable[[str], int], num_layers: int,
                    stacks: stacking.Stacks = None) -> optax.GradientTransformation:
  """Multiplies each update by decay ** (num_layers - layer_of(path)); stateless. A
  stacked leaf (scan layout) gets one factor per block along its layer axis."""

  def factor(name):
    layer = layer_of(name)
    if not 0 <= layer <= num_layers:
      raise ValueError(f"layer id {layer} of {name!r} is outside 0..{num_layers}")
    return decay ** (num_layers - layer)

  def scale(path, u):
    names = stacking.block_names(param_path(path), stacks or {})
    if len(names) > 1:
      factors = np.asarray([factor(n) for n in names], np.float32)
      return u * jnp.asarray(factors, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    f = factor(names[0])
    return u if f == 1.0 else u * jnp.asarray(f, u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, steps_per_epoch: int,
                   global_batch_size: int, lr_layers: Optional[tuple[Callable[[str], int], int]]
                   = None, stacks: stacking.Stacks = None
                   ) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the update rule described by `config.optimizer`.

  Args:
    config: the training config; reads `config.optimizer` (all fields of
      `default_optimizer_config()`), and `config.num_epochs` only as the last fallback for the
      length of the adamw_cosine schedule.
    params: the parameter pytree (or a tree of ShapeDtypeStructs of it); used to check that
      every pattern matches some parameter and that something is left to train.
    steps_per_epoch: training-loop steps (global batches) per epoch.
    global_batch_size: examples per training-loop step over all devices (without the
      accumulation factor, which is applied here).
    lr_layers: (layer_of(path), num_layers), the model's layer ids for `layer_decay` < 1
      (`module.lr_layers()`); required only then.
    stacks: the model's block stacks when `params` is in the scan layout
      (models/stacking.py); patterns and layer ids still see per-block names.

  Returns:
    (tx, schedule): `tx` the optax transformation (apply its updates with
    optax.apply_updates); `schedule(step)` the base-group lr of loop step `step`.
  """
  if "optimizer" not in config:
    raise ValueError("config.optimizer is missing (see avmae_jax.training.optim.default_optimizer_config)")
  c = config.optimizer
  for name, value in (("steps_per_epoch", steps_per_epoch),
                      ("global_batch_size", global_batch_size)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  steps_per_epoch, global_batch_size = int(steps_per_epoch), int(global_batch_size)
  stacks = stacks or {}
  paths = [n for p in param_paths(params) for n in stacking.block_names(p, stacks)]
  if not paths:
    raise ValueError("params has no leaves")
  v = _validate(c, paths)

  def is_frozen(path: str) -> bool:
    return any(p.search(path) for p in v["frozen"])

  if all(is_frozen(p) for p in paths):
    raise ValueError("optimizer.frozen freezes every parameter: nothing would train")

  k = v["grad_accum_steps"]
  loop_schedule = _loop_schedule(c, v, steps_per_epoch, global_batch_size, config)
  if k == 1:
    update_schedule = loop_schedule
    schedule = loop_schedule
  else:
    # Inner counters count updates; update u takes the lr of its first loop step u*k.
    update_schedule = lambda count: loop_schedule(count * k)
    schedule = lambda step: loop_schedule((jnp.asarray(step) // k) * k)

  head_group = lambda path, _: _HEAD if any(p.search(path) for p in v["head"]) else _BASE
  groups = optax.multi_transform(
      {_BASE: _group(c, v, update_schedule, 1.0, stacks),
       _HEAD: _group(c, v, update_schedule, v["head_lr_mult"], stacks)},
      _label_fn(head_group, stacks))
  if v["layer_decay"] != 1.0:
    if lr_layers is None:
      _fail("layer_decay", "be 1 unless the caller gives the model's layer ids (lr_layers)",
            c.layer_decay)
    groups = optax.chain(groups, _scale_by_layer(v["layer_decay"], *lr_layers, stacks))
  trainable = groups
  if v["grad_clip_norm"] is not None:
    # Inside the trainable branch, so frozen parameters' gradients (the model may well produce
    # some) do not count in the norm, as in torch where they have no .grad.
    trainable = optax.chain(optax.clip_by_global_norm(v["grad_clip_norm"]), groups)
  tx = optax.multi_transform(
      {_FROZEN: optax.set_to_zero(), _TRAINABLE: trainable},
      _label_fn(lambda path, _: _FROZEN if is_frozen(path) else _TRAINABLE, stacks))
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx, schedule
