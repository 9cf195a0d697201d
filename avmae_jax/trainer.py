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

MAViL (`"mavil"`, mavil spec): stage 1 trains on the model's own losses like CAV-MAE
(metrics `mavil.PRETRAIN_METRICS`). Stage 2 (self-training) has a teacher: the model
`config.teacher` names (a stage-1 or stage-2 workdir or model directory), built from its
own model.json, computing in the student's dtype. Its parameters are loaded once
(`Trainer.load_teacher`), sharded like the student's by the same logical-axis rules, and
passed to the jitted steps as an extra argument, `train_step(state, batch, teacher)` and
`eval_step(params, batch, key, teacher)`: they are not in the train state (so neither
checkpointed nor in the optimizer) and not donated, so they stay bit-identical. The
targets (`mavil.compute_teacher_targets`, unmasked clips, no gradient) are computed inside
the step. Only what makes the targets is kept on the devices: the teacher's encoders and
fusion blocks (and its small tokens and tables), not its decoders. Fine-tuning
`"mavil_ft"` works as `"cav_mae_ft"` in the modes its heads have; `load_init` copies a
MAViL pretraining encoder into it.

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
from avmae_jax.models import mavil

PRETRAIN_METRICS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "nce", "c_acc")
# Fine-tuning kinds (classifier heads, labels); the others train on their own losses.
FINETUNE_KINDS = ("cav_mae_ft", "mavil_ft")
TRAIN_MODES = ("multimodal", "audioonly", "videoonly")
LOSSES = ("bce", "ce")
# Pretraining-only entries of a CAV-MAE state dict, dropped when fine-tuning starts from it.
_PRETRAIN_ONLY_PREFIXES = ("decoder_", "mask_token")
_HEAD_PREFIX = "mlp_head."
# MAViL: the pretraining-only entries (decoders, mask tokens, the encoder's final `norm`),
# the fine-tuning heads, and the teacher's entries stage 2 never runs (its decoders and
# final norm: submodules, so absent parameters are never looked up).
_MAVIL_PRETRAIN_ONLY = ("decoder_", "mask_token", "norm.")
_MAVIL_HEAD_PREFIXES = ("fc_norm_", "head_")
_TEACHER_UNUSED = ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred")
_TEACHER_UNUSED_EXACT = ("norm",)
# Teacher and student must agree on the inputs and the feature width.
_TEACHER_FIELDS = ("audio_length", "num_mel_bins", "img_size", "num_frames", "tubelet_size",
                   "patch_size", "in_chans", "embed_dim")


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


def model_modes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The classification modes the fine-tuning model of `config` can run: CAV-MAE's five,
  or those of a MAViL model's heads."""
  if config.model.get("kind") == "mavil_ft":
    return mavil.HEAD_MODES[config.model.get("heads", "multimodal")]
  return cav_mae.FT_MODES


def finetune_settings(config: ml_collections.ConfigDict) -> FinetuneSettings:
  """Reads and checks config.mode, config.loss and config.eval_modes of a fine-tuning run."""
  modes = model_modes(config)
  mode = config.get("mode", "multimodal")
  if mode not in TRAIN_MODES:
    raise ValueError(f"config.mode must be one of {TRAIN_MODES} for training, got {mode!r}")
  if mode not in modes:
    raise ValueError(f"config.mode={mode!r} needs a head this model does not have "
                     f"(config.model.heads={config.model.get('heads')!r} gives {modes})")
  loss = config.get("loss", "bce")
  if loss not in LOSSES:
    raise ValueError(f"config.loss must be one of {LOSSES}, got {loss!r}")
  extra = config.get("eval_modes", ()) or ()
  if isinstance(extra, str):
    raise ValueError(f"config.eval_modes must be a list of modes, got {extra!r}")
  for m in extra:
    if m not in modes:
      raise ValueError(f"config.eval_modes: {m!r} is not one of this model's modes {modes}")
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
  # MAViL stage 2: the frozen teacher (module, shardings and shapes of the parameters the
  # steps take, where they come from), None otherwise.
  teacher: Optional[nn.Module] = None
  teacher_shardings: Any = None
  abstract_teacher: Any = None
  teacher_path: str = ""

  @property
  def kind(self) -> str:
    return models.kind_of(self.module)

  @property
  def frames_ndim(self) -> int:
    """Axes of the frames the model takes: 4 ([B, H, W, 3]) or 5 (MAViL's clips)."""
    return len(api.example_inputs(self.module)[1].shape)

  @property
  def pretrain_metrics(self) -> tuple[str, ...]:
    """The scalars a pretraining step reports (besides grad_norm and lr)."""
    return mavil.PRETRAIN_METRICS if self.kind == "mavil" else PRETRAIN_METRICS

  def teacher_spec(self) -> Any:
    """Shapes, dtypes and shardings of the teacher argument (ahead-of-time compiling)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.abstract_teacher, self.teacher_shardings)

  def load_teacher(self, step: Optional[int] = None) -> Any:
    """The teacher's parameters from `teacher_path` (a training workdir's latest or `step`
    checkpoint, or a model directory), placed on the mesh."""
    from avmae_jax import checkpoint  # pylint: disable=import-outside-toplevel
    path = self.teacher_path
    if os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)):
      # An exported model holds one parameter tree, restored whole.
      params = checkpoint.load_params(path, api.abstract_params(self.teacher), step=step)
      return jax.device_put(_teacher_subset(params), self.teacher_shardings)
    # A training workdir: a partial restore reads just the used subset, already sharded.
    return checkpoint.load_params(path, self.teacher_spec(), step=step)

  def init_teacher(self, seed: int = 0) -> Any:
    """Random teacher parameters (benchmarks: a step's cost does not depend on them)."""
    params = api.init_params(self.teacher, seed)
    return jax.device_put(_teacher_subset(params), self.teacher_shardings)

  def _input_keys(self, modes) -> tuple[str, ...]:
    if self.kind not in FINETUNE_KINDS:
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
    if self.kind in FINETUNE_KINDS:
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


def _classify(module, params, batch, mode, frames=None, dropout_key=None):
  """Logits of `mode`; a `dropout_key` turns on the model's stochastic depth (training)."""
  audio = batch["audio"] if uses_audio(mode) else None
  if uses_video(mode):
    frames = batch["frames"] if frames is None else frames
  else:
    frames = None
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  return module.apply({"params": params}, audio, frames, mode, rngs=rngs)


def _pretrain_losses(module, params, batch, key, targets=None) -> dict:
  """The pretraining model's outputs; `targets` are MAViL stage 2's teacher targets."""
  extra = {} if targets is None else {"teacher_targets": targets}
  return module.apply({"params": params}, batch["audio"], batch["frames"], **extra,
                      rngs={"masking": key})


def _model_losses(module, params, batch, key, finetune: Optional[FinetuneSettings],
                  targets=None):
  """(loss, metrics) of one batch: the pretraining losses, or fine-tuning BCE/CE."""
  if finetune is None:
    out = _pretrain_losses(module, params, batch, key, targets)
    names = mavil.PRETRAIN_METRICS if isinstance(module, mavil.MAViL) else PRETRAIN_METRICS
    return out["loss"], {k: out[k] for k in names}
  logits = _classify(module, params, batch, finetune.mode, dropout_key=key)
  loss = classification_loss(logits, batch["labels"], finetune.loss).mean()
  return loss, {"loss": loss}


def frozen_patterns(module: nn.Module) -> list[str]:
  """Regexes of parameters the optimizer must leave alone whatever the config says."""
  return [f"^{name}$" for name in models.frozen_param_names(module)]


def _teacher_subset(params: Any) -> Any:
  """The teacher parameters stage 2 uses: all but its decoders and final norm."""
  return {k: v for k, v in params.items()
          if not k.startswith(_TEACHER_UNUSED) and k not in _TEACHER_UNUSED_EXACT}


def teacher_path(config: ml_collections.ConfigDict) -> str:
  """config.teacher as an absolute path ('' when unset)."""
  path = config.get("teacher", "") or ""
  return os.path.abspath(os.path.expanduser(path)) if path else ""


def build_teacher(config: ml_collections.ConfigDict, student: nn.Module,
                  teacher_model: Optional[Mapping[str, Any]] = None) -> Optional[nn.Module]:
  """MAViL stage 2's teacher module (None for any other model), from `teacher_model` (a
  model config) or else the model.json of `config.teacher`. It computes in the student's
  dtype, without rematerialisation (no backward pass through it)."""
  if not (isinstance(student, mavil.MAViL) and student.stage == 2):
    if config.get("teacher"):
      raise ValueError(f"config.teacher={config.teacher!r} is for MAViL stage 2 "
                       f"(model.kind='mavil', model.stage=2)")
    return None
  if teacher_model is None:
    from avmae_jax import checkpoint  # pylint: disable=import-outside-toplevel
    path = teacher_path(config)
    if not path:
      raise ValueError("MAViL stage 2 needs config.teacher: the stage-1 (or earlier stage-2) "
                       "training workdir or model directory to learn from")
    if not checkpoint.is_model_dir(path):
      raise FileNotFoundError(f"config.teacher={path}: not a training workdir or model "
                              f"directory (no {checkpoint.MODEL_JSON} with params/ or "
                              f"checkpoints/)")
    teacher_model = checkpoint.read_model_config(path)
  fields = dict(teacher_model)
  if fields.get("kind") != "mavil":
    raise ValueError(f"config.teacher must be a MAViL pretraining model (kind 'mavil'), got "
                     f"kind {fields.get('kind')!r}")
  fields.update(dtype=jnp.dtype(student.dtype).name, remat=False)
  teacher = models.build(fields)
  bad = [f"{name} (teacher {getattr(teacher, name)}, student {getattr(student, name)})"
         for name in _TEACHER_FIELDS if getattr(teacher, name) != getattr(student, name)]
  if bad:
    raise ValueError(f"config.teacher does not fit the student: {', '.join(bad)} differ")
  return teacher


def build_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  steps_per_epoch: int,
                  teacher_model: Optional[Mapping[str, Any]] = None) -> Trainer:
  """Builds the model, optimizer and sharded jitted functions of a training config.

  teacher_model: MAViL stage 2's teacher model config, instead of config.teacher's
  model.json (benchmarks; the parameters then come from `Trainer.init_teacher`).
  """
  module = models.build(config.model)
  finetune = (finetune_settings(config) if models.kind_of(module) in FINETUNE_KINDS
              else None)
  teacher = build_teacher(config, module, teacher_model)
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
                                      config.batch_size, models.lr_layers(module))
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
  teacher_shardings = abstract_teacher = None
  if teacher is not None:
    boxed_teacher = _teacher_subset(jax.eval_shape(
        lambda a, v: teacher.init(rngs, a, v), audio, frames)["params"])
    teacher_shardings = sharding.logical_shardings(boxed_teacher, mesh)
    abstract_teacher = nn.meta.unbox(boxed_teacher)

  def teacher_targets(teacher_args, batch):
    """Stage 2: the frozen teacher's targets of the batch (no gradient); else None."""
    if teacher is None:
      return None
    (teacher_params,) = teacher_args
    with nn.logical_axis_rules(sharding.RULES):
      return mavil.compute_teacher_targets(teacher, teacher_params, batch["audio"],
                                           batch["frames"])

  def train_step(state: TrainState, batch, *teacher_args):
    key = jax.random.fold_in(step_key, state.step)
    targets = teacher_targets(teacher_args, batch)

    def loss_fn(params):
      # No gradient into frozen parameters: XLA then skips their backward pass.
      params = jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, frozen, params)
      with nn.logical_axis_rules(sharding.RULES):
        return _model_losses(module, params, batch, key, finetune, targets)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Frozen parameters pass through as they were (p + 0 would turn -0.0 into +0.0).
    params = jax.tree.map(lambda f, old, new: old if f else new, frozen, state.params, params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params, batch, key, *teacher_args):
    """Pretraining: losses under a fixed mask and pooled forward_feat vectors per clip.
    Fine-tuning: class scores (and per-clip losses) in every evaluation mode."""
    targets = teacher_targets(teacher_args, batch)
    with nn.logical_axis_rules(sharding.RULES):
      if finetune is not None:
        return _finetune_eval(module, params, batch, finetune)
      _, out = _model_losses(module, params, batch, key, None, targets)
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
  # The teacher's parameters are an extra, non-donated argument (stage 2 only).
  teacher_in = () if teacher is None else (teacher_shardings,)
  return Trainer(
      config=config, module=module, mesh=mesh, tx=tx, schedule=schedule,
      abstract_state=abstract_state, state_shardings=state_shardings,
      batch_sharding=batch_sharding,
      init=jax.jit(init_state, out_shardings=state_shardings),
      train_step=jax.jit(train_step,
                         in_shardings=(state_shardings, batch_sharding) + teacher_in,
                         out_shardings=(state_shardings, metric_sharding),
                         donate_argnums=(0,)),
      eval_step=jax.jit(eval_step,
                        in_shardings=(param_shardings, batch_sharding, None) + teacher_in,
                        out_shardings=metric_sharding),
      teacher=teacher, teacher_shardings=teacher_shardings, abstract_teacher=abstract_teacher,
      teacher_path=teacher_path(config) if teacher is not None else "",
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
  # One more axis than the model takes: several frames to average (CAV-MAE's 10; MAViL
  # takes a clip [B, N, H, W, 3] as its input).
  clip_ndim = 5 if isinstance(module, mavil.MAViLFT) else 4
  all_frames = frames is not None and frames.ndim == clip_ndim + 1
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
  MAViL fine-tuning (`mavil_ft`) from a MAViL checkpoint (stage 1 or 2, or fine-tuned):
  see `_mavil_finetune_init`.
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
  if trainer.kind == "mavil_ft":
    params, report = _mavil_finetune_init(state.params, sd, path)
  elif trainer.kind not in FINETUNE_KINDS:
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


def _mavil_finetune_init(params, sd: dict[str, Any], path: str):
  """MAViLFT parameters from a MAViL state dict: (params, report) as `load_init`.

  Every encoder tensor is taken (patch embeddings, cls tokens, position tables, both
  ViTs): all must be there with matching shapes. Dropped: the pretraining-only decoders,
  mask tokens and final `norm`; fusion blocks this model does not have (unimodal heads
  have none); heads that do not fit (another class count or head set). Kept from the
  fresh initialisation: the heads, and fusion blocks the checkpoint lacks (the
  fine-tuning model has one more than pretraining, as the released one).
  """
  from avmae_jax import interop  # pylint: disable=import-outside-toplevel
  target = interop.torch_shapes(params)
  fits = lambda k: k in target and tuple(np.shape(sd[k])) == target[k]
  dropped = [k for k in sd if k.startswith(_MAVIL_PRETRAIN_ONLY)]
  heads = [k for k in sd if k.startswith(_MAVIL_HEAD_PREFIXES)]
  if not all(fits(k) for k in heads):
    dropped += heads
  dropped += [k for k in sd if k.startswith("blocks_av.") and k not in target]
  dropped = sorted(set(dropped))
  sd = {k: v for k, v in sd.items() if k not in set(dropped)}
  params, keys = interop.torch_to_flax(sd, params, strict=False, source=path)
  fresh = _MAVIL_HEAD_PREFIXES + ("blocks_av.",)
  problems = []
  encoder_missing = [k for k in keys["missing"] if not k.startswith(fresh)]
  if encoder_missing:
    problems.append(f"encoder tensors missing: {_short(encoder_missing, 12)}")
  if keys["unexpected"]:
    problems.append(f"tensors this model does not have: {_short(keys['unexpected'], 12)}")
  if problems:
    raise interop.CheckpointError(
        f"config.init_from={path} does not fit the MAViL fine-tuning model's encoder: "
        + "; ".join(problems))
  return params, {"loaded": sorted(sd), "dropped": dropped, "initialised": keys["missing"]}


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
