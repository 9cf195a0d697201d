"""Train state, sharded initialisation and the jitted train and eval steps.

Shared by `train.py` (the training script) and `bench.py` (step timing, ahead-of-time
compilation for TPU topologies), so that what is benchmarked is what trains. Nothing here
reads data or writes files: inputs are batches of arrays, outputs are arrays and metrics
(`init_from` reads the checkpoint it is given).

Pretraining (`model.kind = "cav_mae"`) trains on the model's own losses. Fine-tuning
(`"cav_mae_ft"`, cav-mae spec sections 5-6) trains the classifier in `config.mode`
(multimodal, audioonly, videoonly) with `config.loss`: "bce" (BCE with logits, mean over
clips and classes: AudioSet, multi-label) or "ce" (cross-entropy against the soft targets
of mixup and label smoothing: VGGSound). Its eval step returns class scores (sigmoid for
bce, softmax for ce) for every mode of `config.eval_modes`; given frames [B, 10, H, W, 3]
(the pipeline's eval_all_frames) it averages the scores over the 10 frames.

Frozen parameters (`optimizer.frozen`, plus the fixed sin-cos tables of a pretraining
model; a linear probe freezes all but the head) get no gradient (stop_gradient, so XLA
drops their backward pass) and are copied through each step unchanged, bit for bit.

Weight averaging (`config.wa_start`..`config.wa_end`, 1-based epochs, 0 = off): the train
state carries a running float32 sum of the parameters at the end of those epochs (one
parameter copy, sharded like the parameters and checkpointed with them, so resuming keeps
it); `wa_average` divides by their count, the reference's `wa_model` arithmetic.

Sharding: parameters are created already sharded (jax.eval_shape of the init, logical
axis names -> mesh shardings, then a jit of the init with those out_shardings); the
optimizer state follows its parameters; batches are split over data x fsdp.
"""

import dataclasses
import os
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
TRAIN_MODES = ("multimodal", "audioonly", "videoonly")
LOSSES = ("bce", "ce")
# Pretraining-only entries of a CAV-MAE state dict, dropped when fine-tuning starts from it.
_PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token")
_HEAD_PREFIX = "mlp_head."


def uses_audio(mode: str) -> bool:
  return mode in ("multimodal", "audioonly", "missingaudioonly")


def uses_video(mode: str) -> bool:
  return mode in ("multimodal", "videoonly", "missingvideoonly")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train steps taken (micro-steps when gradients are accumulated)
  params: Any
  opt_state: Any
  # Weight averaging (None when off): sum of the parameters at the averaged epochs' ends.
  wa_sum: Any = None
  wa_count: Any = None


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
  """The fine-tuning fields of a training config, validated."""
  mode: str
  loss: str
  eval_modes: tuple[str, ...]  # config.mode first

  @property
  def multilabel(self) -> bool:
    return self.loss == "bce"


def finetune_settings(config: ml_collections.ConfigDict) -> FinetuneSettings:
  """Reads and checks config.mode, config.loss and config.eval_modes of a fine-tuning run."""
  mode = config.get("mode", "multimodal")
  if mode not in TRAIN_MODES:
    raise ValueError(f"config.mode must be one of {TRAIN_MODES} for training, got {mode!r}")
  loss = config.get("loss", "bce")
  if loss not in LOSSES:
    raise ValueError(f"config.loss must be one of {LOSSES}, got {loss!r}")
  extra = config.get("eval_modes", ()) or ()
  if isinstance(extra, str):
    raise ValueError(f"config.eval_modes must be a list of modes, got {extra!r}")
  for m in extra:
    if m not in cav_mae.FT_MODES:
      raise ValueError(f"config.eval_modes: {m!r} is not one of {cav_mae.FT_MODES}")
  return FinetuneSettings(mode, loss, tuple(dict.fromkeys([mode, *extra])))


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
  finetune: Optional[FinetuneSettings] = None  # None when pretraining
  frozen: Any = None  # tree of bools like the params: True where never updated
  wa_range: Optional[tuple[int, int]] = None
  wa_add: Optional[Callable[[TrainState], TrainState]] = None  # adds params to the WA sum
  wa_average: Optional[Callable[[TrainState], Any]] = None  # the averaged params

  @property
  def kind(self) -> str:
    return models.kind_of(self.module)

  def _input_keys(self, modes) -> tuple[str, ...]:
    if self.kind != "cav_mae_ft":
      return ("audio", "frames")
    keys = ("audio",) if any(uses_audio(m) for m in modes) else ()
    keys += ("frames",) if any(uses_video(m) for m in modes) else ()
    return keys + ("labels",)

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract train batch (shapes, dtypes, shardings), e.g. for ahead-of-time compiling."""
    audio, frames = api.example_inputs(self.module, global_batch)
    dtype = jnp.dtype(self.config.data.get("dtype", "float32"))
    spec = {"audio": jax.ShapeDtypeStruct(audio.shape, dtype, sharding=self.batch_sharding),
            "frames": jax.ShapeDtypeStruct(frames.shape, dtype, sharding=self.batch_sharding)}
    if self.kind == "cav_mae_ft":
      spec["labels"] = jax.ShapeDtypeStruct((global_batch, self.module.num_classes),
                                            jnp.float32, sharding=self.batch_sharding)
    return {k: spec[k] for k in self._input_keys(self._train_modes)}

  @property
  def _train_modes(self) -> tuple[str, ...]:
    return (self.finetune.mode,) if self.finetune else ()

  def train_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a pipeline batch that the train step takes (not an unused modality)."""
    return {k: batch[k] for k in self._input_keys(self._train_modes)}

  def eval_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of an evaluation batch that the eval step takes."""
    keys = self._input_keys(self.finetune.eval_modes if self.finetune else ()) + ("mask",)
    return {k: batch[k] for k in keys}


def classification_loss(logits: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """Per-clip loss [B]: BCE with logits averaged over classes (so its batch mean is torch's
  BCEWithLogitsLoss), or cross-entropy against soft targets (torch's CrossEntropyLoss with
  probability targets)."""
  logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
  if loss == "bce":
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=-1)
  return optax.softmax_cross_entropy(logits, targets)


def class_scores(logits: jax.Array, loss: str) -> jax.Array:
  """The outputs the final evaluation averages over frames: sigmoid (bce) or softmax (ce)."""
  logits = logits.astype(jnp.float32)
  return jax.nn.sigmoid(logits) if loss == "bce" else jax.nn.softmax(logits, axis=-1)


def _classify(module, params, batch, mode, frames=None):
  audio = batch["audio"] if uses_audio(mode) else None
  if uses_video(mode):
    frames = batch["frames"] if frames is None else frames
  else:
    frames = None
  return module.apply({"params": params}, audio, frames, mode)


def _model_losses(module, params, batch, key, finetune: Optional[FinetuneSettings]):
  """(loss, metrics) of one batch: the pretraining losses, or fine-tuning BCE/CE."""
  if finetune is None:
    out = module.apply({"params": params}, batch["audio"], batch["frames"],
                       rngs={"masking": key})
    return out["loss"], {k: out[k] for k in PRETRAIN_METRICS}
  logits = _classify(module, params, batch, finetune.mode)
  loss = classification_loss(logits, batch["labels"], finetune.loss).mean()
  return loss, {"loss": loss}


def frozen_patterns(module: nn.Module) -> list[str]:
  """Regexes of parameters the optimizer must leave alone whatever the config says."""
  return [f"^{name}$" for name in cav_mae.frozen_param_names(module)]


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  steps_per_epoch: int) -> Trainer:
  """Builds the model, optimizer and sharded jitted functions of a training config."""
  module = models.build(config.model)
  finetune = finetune_settings(config) if models.kind_of(module) == "cav_mae_ft" else None
  wa_range = wa_epochs(config)
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
  frozen = optim.frozen_mask(opt_view.optimizer.frozen, abstract_params)

  def init_state():
    seed_key = jax.random.key(config.seed)
    init_rngs = {"params": jax.random.fold_in(seed_key, 0),
                 "masking": jax.random.fold_in(seed_key, 1)}
    with nn.logical_axis_rules(sharding.RULES):
      params = nn.meta.unbox(module.init(
          init_rngs, jnp.zeros(audio.shape, audio.dtype), jnp.zeros(frames.shape, frames.dtype)
      )["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    if wa_range:
      state = state.replace(wa_sum=jax.tree.map(jnp.zeros_like, params),
                            wa_count=jnp.zeros((), jnp.int32))
    return state

  abstract_state = jax.eval_shape(init_state)
  state_shardings = TrainState(
      step=sharding.replicated(mesh), params=param_shardings,
      opt_state=sharding.like_params(abstract_state.opt_state, abstract_params,
                                     param_shardings, mesh),
      wa_sum=param_shardings if wa_range else None,
      wa_count=sharding.replicated(mesh) if wa_range else None)
  batch_sharding = sharding.batch_sharding(mesh)
  step_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(step_key, state.step)

    def loss_fn(params):
      # No gradient into frozen parameters: XLA then skips their backward pass.
      params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen, params)
      with nn.logical_axis_rules(sharding.RULES):
        return _model_losses(module, params, batch, key, finetune)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Frozen parameters pass through as they were (p + 0 would turn -0.0 into +0.0).
    params = jax.tree.map(lambda f, old, new: old if f else new, frozen, state.params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch, key):
    """Pretraining: losses under a fixed mask and pooled forward_feat vectors per clip.
    Fine-tuning: class scores (and per-clip losses) in every evaluation mode."""
    with nn.logical_axis_rules(sharding.RULES):
      if finetune is not None:
        return _finetune_eval(module, params, batch, finetune)
      losses = module.apply({"params": params}, batch["audio"], batch["frames"],
                            rngs={"masking": key})
      out = {k: losses[k] for k in PRETRAIN_METRICS}
      a, v = module.apply({"params": params}, batch["audio"], batch["frames"],
                          method=module.forward_feat)
    out["audio_rep"], out["video_rep"] = a.mean(axis=1), v.mean(axis=1)
    out["mask"] = batch["mask"]
    return out

  def wa_add(state: TrainState) -> TrainState:
    return state.replace(wa_sum=jax.tree.map(jnp.add, state.wa_sum, state.params),
                         wa_count=state.wa_count + 1)

  def wa_average(state: TrainState):
    # float32 sum / count, as the reference's wa_model (sdA[key] / float(model_cnt)).
    count = state.wa_count.astype(jnp.float32)
    return jax.tree.map(lambda s: (s / count).astype(s.dtype), state.wa_sum)

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
                        out_shardings=metric_sharding),
      finetune=finetune, frozen=frozen, wa_range=wa_range,
      wa_add=jax.jit(wa_add, in_shardings=(state_shardings,), out_shardings=state_shardings,
                     donate_argnums=(0,)) if wa_range else None,
      wa_average=jax.jit(wa_average, in_shardings=(state_shardings,),
                         out_shardings=param_shardings) if wa_range else None)


def _finetune_eval(module, params, batch, finetune: FinetuneSettings) -> dict:
  """Scores [B, C] per mode; with frames [B, F, H, W, 3], the mean of the F frames' scores
  (the reference's multi-frame evaluation), else also the per-clip loss [B]."""
  out = {"labels": batch["labels"], "mask": batch["mask"]}
  frames = batch.get("frames")
  all_frames = frames is not None and frames.ndim == 5
  for mode in finetune.eval_modes:
    if all_frames and uses_video(mode):
      # One frame at a time (lax.map), so memory stays that of a single-frame batch.
      per_frame = jax.lax.map(
          lambda f, m=mode: class_scores(_classify(module, params, batch, m, f), finetune.loss),
          jnp.moveaxis(frames, 1, 0))
      out[f"scores/{mode}"] = per_frame.mean(axis=0)
      continue
    logits = _classify(module, params, batch, mode)  # frames unused here if all_frames
    out[f"scores/{mode}"] = class_scores(logits, finetune.loss)
    if not all_frames:
      out[f"loss/{mode}"] = classification_loss(logits, batch["labels"], finetune.loss)
  return out


def global_batch(trainer: Trainer, host_batch: Mapping[str, np.ndarray]) -> dict:
  """This host's numpy share of the batch -> global arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, np.asarray(v))
          for k, v in host_batch.items()}


def load_init(trainer: Trainer, state: TrainState, path: str
              ) -> tuple[TrainState, dict[str, list[str]]]:
  """Loads `path` into the state's parameters; returns (state, report).

  path: a model checkpoint directory, a training workdir (its latest checkpoint), or a
  reference `.pth` (pretraining or fine-tuned CAV-MAE). Pretraining loads strictly. A
  fine-tuning model takes every encoder tensor (all must be there, with matching shapes);
  a pretraining checkpoint's decoder and mask token are dropped and the classifier head
  keeps its fresh initialisation; a fine-tuned checkpoint's head is taken when its class
  count matches and otherwise initialised fresh. report: "loaded", "dropped" (in the
  checkpoint, not used), "initialised" (kept from the fresh init), as reference keys.
  """
  from avmae_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from avmae_jax import interop  # pylint: disable=import-outside-toplevel
  if checkpoint.is_model_dir(path):
    saved = models.build(checkpoint.read_model_config(path))
    sd = interop.flax_to_torch(checkpoint.load_params(path, api.abstract_params(saved)))
  elif os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from={path}: a directory without "
                            f"{checkpoint.MODEL_JSON} is neither a model checkpoint nor a "
                            "training workdir")
  else:
    sd = interop.strip_module_prefix(interop.read_pth(path))
  if trainer.kind != "cav_mae_ft":
    params, _ = interop.torch_to_flax(sd, trainer.abstract_state.params, strict=True,
                                      source=path)
    report = {"loaded": sorted(sd), "dropped": [], "initialised": []}
  else:
    dropped = sorted(k for k in sd if k.startswith(_PRETRAIN_ONLY_PREFIXES))
    head_bias = sd.get(_HEAD_PREFIX + "1.bias")
    if head_bias is not None and head_bias.shape != (trainer.module.num_classes,):
      # Another label set (e.g. AudioSet -> VGGSound): the head starts afresh.
      dropped += sorted(k for k in sd if k.startswith(_HEAD_PREFIX))
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    params, keys = interop.torch_to_flax(sd, state.params, strict=False, source=path)
    encoder_missing = [k for k in keys["missing"] if not k.startswith(_HEAD_PREFIX)]
    problems = []
    if encoder_missing:
      problems.append(f"encoder tensors missing: {', '.join(encoder_missing[:12])}"
                      + (" ..." if len(encoder_missing) > 12 else ""))
    if keys["unexpected"]:
      problems.append(f"tensors this model does not have: {', '.join(keys['unexpected'][:12])}"
                      + (" ..." if len(keys["unexpected"]) > 12 else ""))
    if problems:
      raise interop.CheckpointError(
          f"config.init_from={path} does not fit the fine-tuning model's encoder: "
          + "; ".join(problems))
    report = {"loaded": sorted(sd), "dropped": dropped, "initialised": keys["missing"]}
  params = jax.device_put(params, trainer.state_shardings.params)
  return state.replace(params=params), report


def init_from(trainer: Trainer, state: TrainState, path: Optional[str]) -> TrainState:
  """Starts from a model checkpoint, a training workdir or a reference `.pth` (see
  `load_init`), printing what was loaded, dropped and freshly initialised."""
  if not path:
    return state
  state, report = load_init(trainer, state, path)
  if jax.process_index() == 0:
    print(f"init_from {path}: loaded {len(report['loaded'])} tensors"
          + (f"; dropped {len(report['dropped'])} unused ({_short(report['dropped'])})"
             if report["dropped"] else "")
          + (f"; freshly initialised {_short(report['initialised'])}"
             if report["initialised"] else ""), flush=True)
  return state


def _short(keys: list[str], n: int = 6) -> str:
  return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
