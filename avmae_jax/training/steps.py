"""The generic step builder: a task -> sharded init, donated jitted train step, evaluation.

Shared by `train.py` (the training script) and `bench.py` (step timing, ahead-of-time
compilation for TPU topologies), so that what is benchmarked is what trains. Nothing here
reads data or writes files, and nothing depends on the model or the task beyond their
interfaces (models/common.py, tasks/base.py).

  state = trainer.init()                               # parameters created already sharded
  state, metrics = trainer.train_step(state, batch, aux)   # aux: the task's frozen inputs
  record, extras = trainer.evaluate(state.params, batches, aux)

Sharding: parameters are created already sharded (jax.eval_shape of the init, logical
axis names -> mesh shardings, then a jit of the init with those out_shardings); the
optimizer state follows its parameters; batches are split over data x fsdp; the task's
aux (e.g. a teacher's parameters) is sharded by the same rules and never donated.

Frozen parameters (`optimizer.frozen`, plus the model's fixed tables, `frozen_param_names`;
a linear probe freezes all but the head) get no gradient (stop_gradient, so XLA drops their
backward pass) and are copied through each step unchanged, bit for bit. The step's rng is
`fold_in(fold_in(key(seed), 2), step)`.

Scanned blocks (`model.scan_layers`): the train state holds each stack of blocks stacked
(models/stacking.py), so the optimizer updates one array per stack and leaf; the loss,
evaluation, checkpoints (`to_checkpoint` / `from_checkpoint`), init-from and saved models
see the per-block layout (`native_params`).

Weight averaging (`config.wa_start`..`config.wa_end`, 1-based epochs, 0 = off): the train
state carries a running float32 sum of the parameters at the end of those epochs (one
parameter copy, sharded like the parameters and checkpointed with them, so resuming keeps
it); `wa_average` divides by their count, the reference's `wa_model` arithmetic.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avmae_jax import models
from avmae_jax import tasks
from avmae_jax.checkpoints import model_dir
from avmae_jax.models import stacking
from avmae_jax.parallel import mesh as mesh_lib
from avmae_jax.parallel import rules
from avmae_jax.tasks import base as tasks_base
from avmae_jax.training import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train steps taken (micro-steps when gradients are accumulated)
  params: Any
  opt_state: Any
  # Weight averaging (None when off): sum of the parameters at the averaged epochs' ends.
  wa_sum: Any = None
  wa_count: Any = None


def wa_epochs(config: ml_collections.ConfigDict) -> Optional[tuple[int, int]]:
  """(first, last) epoch of weight averaging, 1-based and inclusive, or None when off."""
  start, end = config.get("wa_start", 0) or 0, config.get("wa_end", 0) or 0
  for name, value in (("wa_start", start), ("wa_end", end)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f"config.{name} must be an epoch number >= 1 (0: no weight "
                       f"averaging), got {value!r}")
  if not start and not end:
    return None
  if not 1 <= start <= end:
    raise ValueError(f"config.wa_start..wa_end must be epochs with 1 <= wa_start <= wa_end, "
                     f"got {start}..{end}")
  return start, end


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


@dataclasses.dataclass
class Trainer:
  """A task, its optimizer and the compiled-on-first-call functions around them."""
  config: ml_collections.ConfigDict
  task: tasks_base.Task
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_aux: Any
  aux_shardings: Any
  frozen: Any  # tree of bools like the params: True where never updated
  wa_range: Optional[tuple[int, int]]
  init: Callable[[], TrainState]
  train_step: Callable[..., tuple[TrainState, dict]]
  wa_add: Optional[Callable[[TrainState], TrainState]]  # adds params to the WA sum
  wa_average: Optional[Callable[[TrainState], Any]]  # the averaged params
  # The scan layout (models/stacking.py): the model's block stacks ({} when it does not
  # scan), and the state in the per-block layout that checkpoints and models keep.
  stacks: Mapping[str, int]
  checkpoint_abstract_state: TrainState
  checkpoint_shardings: TrainState
  to_checkpoint: Callable[[TrainState], TrainState]
  from_checkpoint: Callable[[TrainState], TrainState]
  native_params: Callable[[Any], Any]  # train-state params -> per-block params

  @property
  def module(self) -> models.AVModel:
    return self.task.module

  @functools.cached_property
  def evaluate(self) -> tasks_base.Evaluator:
    """The task's evaluation on this mesh: (params, batches, aux=None) -> (record, extras)."""
    evaluator = self.task.evaluator(self.mesh, self.checkpoint_shardings.params,
                                    self.aux_shardings)
    return lambda params, batches, aux=None: evaluator(self.native_params(params), batches,
                                                       {} if aux is None else aux)

  def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict:
    """This host's numpy share of the batch -> global arrays on the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}

  def train_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a pipeline batch that the train step takes (not an unused modality)."""
    return {k: batch[k] for k in self.task.train_keys}

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract train batch (shapes, dtypes, shardings), e.g. for ahead-of-time compiling."""
    audio, frames = models.example_inputs(self.module, global_batch)
    dtype = jnp.dtype(self.config.data.get("dtype", "float32"))
    shapes = {"audio": (audio.shape, dtype), "frames": (frames.shape, dtype),
              "labels": ((global_batch, getattr(self.module, "num_classes", 0)), jnp.float32)}
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=self.batch_sharding)
            for k in self.task.train_keys}

  def state_spec(self) -> TrainState:
    return _with_shardings(self.abstract_state, self.state_shardings)

  def aux_spec(self) -> Any:
    """Shapes, dtypes and shardings of the aux argument (ahead-of-time compiling)."""
    return _with_shardings(self.abstract_aux, self.aux_shardings)

  def init_from(self, state: TrainState, path: str) -> tuple[TrainState, dict]:
    """The state with the parameters `path` gives under the model's `init_rules`: a model
    directory, a training workdir (its latest checkpoint) or a reference `.pth`. Returns
    (state, report of the parameters "loaded", "dropped" and freshly "initialised")."""
    loaded = model_dir.read_flat_params(path)
    fit = self.config.get("init_audio_pos", "")
    if fit:
      if fit not in models.AUDIO_POSITION_FITS:
        raise ValueError(f"config.init_audio_pos must be one of {models.AUDIO_POSITION_FITS} "
                         f"or empty, got {fit!r}")
      loaded = self.module.fit_audio_positions(loaded, fit)
    try:
      params, report = models.merge_params(
          jax.device_get(self.native_params(state.params)), loaded,
          self.module.init_rules(), source=f"config.init_from={path}")
    except models.CheckpointError as e:
      if fit or not any(n in str(e) for n in self.module.audio_position_tables):
        raise
      raise models.CheckpointError(
          f"{e}. The checkpoint's audio position tables are for another audio length than "
          f"model.audio_length={self.module.audio_length}: set config.init_audio_pos to "
          f"crop or interpolate to fit them") from e
    params = jax.device_put(params, self.checkpoint_shardings.params)
    return state.replace(params=self.stack_params(params)), report

  @functools.cached_property
  def stack_params(self) -> Callable[[Any], Any]:
    """Per-block params -> the train state's layout (on its shardings)."""
    return jax.jit(lambda p: stacking.stack(p, self.stacks),
                   out_shardings=self.state_shardings.params)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int,
          task: tasks_base.Task) -> Trainer:
  """The optimizer and the sharded jitted functions that train `task` on `mesh`."""
  module = task.module
  wa_range = wa_epochs(config)
  audio, frames = models.example_inputs(module, 1)
  native_boxed = models.boxed_abstract_params(module)
  # A scanning model's parameters live stacked in the train state (models/stacking.py).
  stacks = stacking.find_stacks(native_boxed) if module.scan_layers else {}
  boxed = stacking.stack(native_boxed, stacks)
  param_shardings = mesh_lib.logical_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)

  opt_view = ml_collections.ConfigDict(
      {"optimizer": config.optimizer.to_dict(), "num_epochs": config.get("num_epochs")})
  opt_view.optimizer.frozen = (list(config.optimizer.frozen)
                               + [f"^{name}$" for name in module.frozen_param_names()])
  tx, schedule = optim.make_optimizer(opt_view, abstract_params, steps_per_epoch,
                                      config.batch_size, module.lr_layers(), stacks)
  frozen = optim.frozen_mask(opt_view.optimizer.frozen, abstract_params, stacks)

  def init_state(layout_stacks=stacks):
    seed_key = jax.random.key(config.seed)
    init_rngs = {"params": jax.random.fold_in(seed_key, 0),
                 "masking": jax.random.fold_in(seed_key, 1)}
    with nn.logical_axis_rules(rules.RULES):
      params = nn.meta.unbox(module.init(
          init_rngs, jnp.zeros(audio.shape, audio.dtype), jnp.zeros(frames.shape, frames.dtype)
      )["params"])
    params = stacking.stack(params, layout_stacks)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if wa_range:
      state = state.replace(wa_sum=jax.tree.map(jnp.zeros_like, params),
                            wa_count=jnp.zeros((), jnp.int32))
    return state

  abstract_state = jax.eval_shape(init_state)
  replicated = mesh_lib.replicated(mesh)

  def shardings_of(state, params, shardings):
    return TrainState(
        step=replicated, params=shardings,
        opt_state=mesh_lib.like_params(state.opt_state, params, shardings, mesh),
        wa_sum=shardings if wa_range else None, wa_count=replicated if wa_range else None)

  state_shardings = shardings_of(abstract_state, abstract_params, param_shardings)
  # Checkpoints keep the per-block layout: the same state with every stack unstacked.
  checkpoint_abstract_state = jax.eval_shape(lambda s: stacking.unstack(s, stacks),
                                             abstract_state)
  native_shardings = mesh_lib.logical_shardings(native_boxed, mesh)
  checkpoint_shardings = shardings_of(checkpoint_abstract_state,
                                      nn.meta.unbox(native_boxed), native_shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  boxed_aux = task.boxed_aux()
  aux_shardings = mesh_lib.logical_shardings(boxed_aux, mesh) if boxed_aux else {}
  step_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def train_step(state: TrainState, batch, aux):
    key = jax.random.fold_in(step_key, state.step)

    def loss_fn(params):
      # No gradient into frozen parameters: XLA then skips their backward pass.
      params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen, params)
      with nn.logical_axis_rules(rules.RULES):
        return task.loss(stacking.unstack(params, stacks), batch, key, aux)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Frozen parameters pass through as they were (p + 0 would turn -0.0 into +0.0).
    params = jax.tree.map(lambda f, old, new: old if f else new, frozen, state.params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def wa_add(state: TrainState) -> TrainState:
    return state.replace(wa_sum=jax.tree.map(jnp.add, state.wa_sum, state.params),
                         wa_count=state.wa_count + 1)

  def wa_average(state: TrainState):
    # float32 sum / count, as the reference's wa_model (sdA[key] / float(model_cnt)).
    count = state.wa_count.astype(jnp.float32)
    return jax.tree.map(lambda s: (s / count).astype(s.dtype), state.wa_sum)

  return Trainer(
      config=config, task=task, mesh=mesh, tx=tx, schedule=schedule,
      abstract_state=abstract_state, state_shardings=state_shardings,
      batch_sharding=batch_sharding, abstract_aux=nn.meta.unbox(boxed_aux),
      aux_shardings=aux_shardings, frozen=frozen, wa_range=wa_range,
      init=jax.jit(init_state, out_shardings=state_shardings),
      # The task's aux is an extra argument, never donated (it must stay bit-identical).
      train_step=jax.jit(train_step,
                         in_shardings=(state_shardings, batch_sharding, aux_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      wa_add=jax.jit(wa_add, in_shardings=(state_shardings,), out_shardings=state_shardings,
                     donate_argnums=(0,)) if wa_range else None,
      wa_average=jax.jit(wa_average, in_shardings=(state_shardings,),
                         out_shardings=param_shardings) if wa_range else None,
      stacks=stacks, checkpoint_abstract_state=checkpoint_abstract_state,
      checkpoint_shardings=checkpoint_shardings,
      to_checkpoint=jax.jit(lambda s: stacking.unstack(s, stacks),
                            out_shardings=checkpoint_shardings) if stacks else _same,
      from_checkpoint=jax.jit(lambda s: stacking.stack(s, stacks),
                              out_shardings=state_shardings) if stacks else _same,
      native_params=jax.jit(lambda p: stacking.unstack(p, stacks),
                            out_shardings=native_shardings) if stacks else _same)


def _same(tree):
  return tree


def from_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                steps_per_epoch: int, stand_in_teacher: bool = False) -> Trainer:
  """`build` for the task of config.model (`tasks.for_config`)."""
  task = tasks.for_config(config, models.build(config.model), stand_in_teacher)
  return build(config, mesh, steps_per_epoch, task)


def describe_init(path: str, report: Mapping[str, list[str]]) -> str:
  """One line on what `Trainer.init_from` took from `path`."""
  return (f"init_from {path}: loaded {len(report['loaded'])} tensors"
          + (f"; dropped {len(report['dropped'])} unused ({_short(report['dropped'])})"
             if report["dropped"] else "")
          + (f"; freshly initialised {_short(report['initialised'])}"
             if report["initialised"] else ""))


def _short(keys: list[str], n: int = 6) -> str:
  return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
