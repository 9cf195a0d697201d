"""Train state, sharded initialisation and the jitted train and eval steps.

Shared by `train.py` (the training script) and `bench.py` (step timing, ahead-of-time
compilation for TPU topologies), so that what is benchmarked is what trains. Nothing here
reads data or files: inputs are batches of arrays, outputs are arrays and metrics.

Sharding: parameters are created already sharded (jax.eval_shape of the init, logical
axis names -> mesh shardings, then a jit of the init with those out_shardings); the
optimizer state follows its parameters; batches are split over data x fsdp.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avmae_jax import api
from avmae_jax import models
from avmae_jax import optim
from avmae_jax import sharding
from avmae_jax.models import cav_mae

PRETRAIN_METRICS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "nce", "c_acc")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train steps taken (micro-steps when gradients are accumulated)
  params: Any
  opt_state: Any


@dataclasses.dataclass
class Trainer:
  """A model, its optimizer and the compiled-on-first-call functions around them."""
  config: ml_collections.ConfigDict
  module: nn.Module
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  init: Callable[[], TrainState]
  train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]
  eval_step: Callable[[Any, Mapping[str, jax.Array], jax.Array], dict]

  @property
  def kind(self) -> str:
    return models.kind_of(self.module)

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract train batch (shapes, dtypes, shardings), e.g. for ahead-of-time compiling."""
    audio, frames = api.example_inputs(self.module, global_batch)
    spec = {"audio": audio, "frames": frames}
    dtype = jnp.dtype(self.config.data.get("dtype", "float32"))
    spec = {k: jax.ShapeDtypeStruct(v.shape, dtype, sharding=self.batch_sharding)
            for k, v in spec.items()}
    if self.kind == "cav_mae_ft":
      spec["labels"] = jax.ShapeDtypeStruct((global_batch, self.module.num_classes),
                                            jnp.float32, sharding=self.batch_sharding)
    return spec

  def train_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a pipeline batch that the train step takes."""
    keys = ("audio", "frames", "labels") if self.kind == "cav_mae_ft" else ("audio", "frames")
    return {k: batch[k] for k in keys}


def _model_losses(module, params, batch, key):
  """(loss, metrics) of one batch: the pretraining losses, or fine-tuning BCE/CE."""
  if models.kind_of(module) == "cav_mae":
    out = module.apply({"params": params}, batch["audio"], batch["frames"],
                       rngs={"masking": key})
    return out["loss"], {k: out[k] for k in PRETRAIN_METRICS}
  raise NotImplementedError(f"training {models.kind_of(module)} lands with fine-tuning")


def frozen_patterns(module: nn.Module) -> list[str]:
  """Regexes of parameters the optimizer must leave alone whatever the config says."""
  return [f"^{name}$" for name in cav_mae.frozen_param_names(module)]


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  steps_per_epoch: int) -> Trainer:
  """Builds the model, optimizer and sharded jitted functions of a training config."""
  module = models.build(config.model)
  audio, frames = api.example_inputs(module, 1)
  rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
  boxed = jax.eval_shape(lambda a, v: module.init(rngs, a, v), audio, frames)["params"]
  param_shardings = sharding.logical_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)

  opt_view = ml_collections.ConfigDict(
      {"optimizer": config.optimizer.to_dict(), "num_epochs": config.get("num_epochs")})
  opt_view.optimizer.frozen = list(config.optimizer.frozen) + frozen_patterns(module)
  tx, schedule = optim.make_optimizer(opt_view, abstract_params, steps_per_epoch,
                                      config.batch_size)

  def init_state():
    seed_key = jax.random.key(config.seed)
    init_rngs = {"params": jax.random.fold_in(seed_key, 0),
                 "masking": jax.random.fold_in(seed_key, 1)}
    with nn.logical_axis_rules(sharding.RULES):
      params = nn.meta.unbox(module.init(
          init_rngs, jnp.zeros(audio.shape, audio.dtype), jnp.zeros(frames.shape, frames.dtype)
      )["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state)
  state_shardings = TrainState(
      step=sharding.replicated(mesh), params=param_shardings,
      opt_state=sharding.like_params(abstract_state.opt_state, abstract_params,
                                     param_shardings, mesh))
  batch_sharding = sharding.batch_sharding(mesh)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(step_key, state.step)

    def loss_fn(params):
      with nn.logical_axis_rules(sharding.RULES):
        return _model_losses(module, params, batch, key)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   lr=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch, key):
    """Pretraining losses under a fixed mask, and pooled forward_feat vectors per clip."""
    with nn.logical_axis_rules(sharding.RULES):
      out = {}
      if models.kind_of(module) == "cav_mae":
        losses = module.apply({"params": params}, batch["audio"], batch["frames"],
                              rngs={"masking": key})
        out = {k: losses[k] for k in PRETRAIN_METRICS}
      a, v = module.apply({"params": params}, batch["audio"], batch["frames"],
                          method=module.forward_feat)
    out["audio_rep"], out["video_rep"] = a.mean(axis=1), v.mean(axis=1)
    out["mask"] = batch["mask"]
    return out

  metric_sharding = sharding.replicated(mesh)
  return Trainer(
      config=config, module=module, mesh=mesh, tx=tx, schedule=schedule,
      abstract_state=abstract_state, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init_state, out_shardings=state_shardings),
      train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, metric_sharding),
                         donate_argnums=(0,)),
      eval_step=jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding, None),
                        out_shardings=metric_sharding))


def global_batch(trainer: Trainer, host_batch: Mapping[str, np.ndarray]) -> dict:
  """This host's numpy share of the batch -> global arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, np.asarray(v))
          for k, v in host_batch.items()}


def init_from(trainer: Trainer, state: TrainState, path: Optional[str]) -> TrainState:
  """Starts from a model checkpoint directory or a reference `.pth` (strictly matched)."""
  if not path:
    return state
  from avmae_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from avmae_jax import interop  # pylint: disable=import-outside-toplevel
  if checkpoint.is_model_dir(path):
    saved = models.build(checkpoint.read_model_config(path))
    params = checkpoint.load_params(path, api.abstract_params(saved))
    sd = interop.flax_to_torch(params)
  else:
    sd = interop.read_pth(path)
  params, _ = interop.torch_to_flax(sd, trainer.abstract_state.params, strict=True,
                                    source=path)
  return state.replace(params=jax.device_put(params, trainer.state_shardings.params))
