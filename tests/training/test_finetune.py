"""Fine-tuning and linear probing: losses, initialisation, probing, weight averaging, eval.

Tiny models with reduced inputs (audio 256 x 128, frames 64 x 64) keep these fast. The
references are independent: the PyTorch port (avmae_jax.torch_port) with torch's own loss
functions, the reference state dicts and the orbax checkpoints read directly, numpy
averages, and scikit-learn's average precision.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avmae_jax import config_args
from avmae_jax.checkpoints import interop
from avmae_jax import models
from avmae_jax.parallel import mesh as sharding
from avmae_jax.training import steps
from tests import _helpers

ROOT = _helpers.ROOT
FINETUNE = os.path.join(ROOT, "configs", "cav_mae_finetune.py")
AUDIO, IMAGE, CLASSES = 256, 64, 5
SMALL = dict(audio_length=AUDIO, img_size=IMAGE)


def ft_config(arg="", batch=4, **fields):
  config = config_args.load_config(f"{FINETUNE}:size=tiny,num_classes={CLASSES},{arg}")
  config.batch_size = batch
  config.model.audio_length, config.model.img_size = AUDIO, IMAGE
  for key, value in fields.items():
    config[key] = value
  return config


def make_trainer(config, steps_per_epoch=10):
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return steps.from_config(config, mesh, steps_per_epoch), mesh


def make_batch(n=4, seed=0, frames=None):
  rng = np.random.default_rng(seed)
  labels = np.zeros((n, CLASSES), np.float32)
  labels[np.arange(n), np.arange(n) % CLASSES] = 1
  labels[np.arange(n), (np.arange(n) + 2) % CLASSES] = 1 if n > 1 else 0
  shape = (n, IMAGE, IMAGE, 3) if frames is None else (n, frames, IMAGE, IMAGE, 3)
  return {"audio": rng.standard_normal((n, AUDIO, 128)).astype(np.float32),
          "frames": rng.standard_normal(shape).astype(np.float32),
          "labels": labels, "mask": np.ones(n, np.float32)}


def flat(tree):
  return {k: np.asarray(v) for k, v in interop.flax_to_torch(jax.device_get(tree)).items()}


def native(state_dict, keys):
  """Keys of a reference state dict as the model's parameter paths (blocks_a_0/attn/...)."""
  return set(interop.state_dict_to_native({k: state_dict[k] for k in keys}))


def torch_ft(params):
  """The PyTorch port of CAVMAEFT holding `params`."""
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  model = torch_port.CAVMAEFT(num_classes=CLASSES, **models.size_fields("tiny", "cav_mae_ft"),
                              **SMALL)
  model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in flat(params).items()},
                        strict=True)
  return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("loss,mode", [("bce", "multimodal"), ("ce", "audioonly")])
def test_loss_matches_torch_and_decreases_on_a_fixed_batch(loss, mode):
  torch = pytest.importorskip("torch")
  config = ft_config(f"mode={mode}")
  config.loss = loss
  config.optimizer.lr, config.optimizer.head_lr_mult = 3e-4, 3.0
  trainer, mesh = make_trainer(config)
  batch = make_batch()
  # Soft targets, as mixup and label smoothing make them (rows sum to 1 for CE).
  soft = 0.02 + 0.9 * batch["labels"]
  batch["labels"] = (soft / soft.sum(1, keepdims=True) if loss == "ce" else soft)
  batch["labels"] = batch["labels"].astype(np.float32)
  inputs = trainer.train_inputs(batch)
  assert set(inputs) == ({"audio", "labels"} if mode == "audioonly"
                         else {"audio", "frames", "labels"})
  with jax.set_mesh(mesh):
    state = trainer.init()
    params0 = jax.device_get(trainer.native_params(state.params))
    losses = []
    for _ in range(8):
      state, metrics = trainer.train_step(state, trainer.global_batch(inputs), {})
      losses.append(float(metrics["loss"]))
      assert float(metrics["grad_norm"]) > 0 and float(metrics["lr"]) == pytest.approx(3e-4)

  with torch.no_grad():
    logits = torch_ft(params0)(torch.from_numpy(batch["audio"]),
                               torch.from_numpy(batch["frames"]).permute(0, 3, 1, 2), mode)
    target = torch.from_numpy(batch["labels"])
    if loss == "bce":
      want = torch.nn.BCEWithLogitsLoss()(logits, target)
    else:
      want = torch.nn.CrossEntropyLoss()(logits, target)  # probability targets
  assert losses[0] == pytest.approx(float(want), rel=1e-4)
  # Soft targets bound the loss from below by their entropy; the excess must fall.
  t = batch["labels"].astype(np.float64)
  if loss == "bce":
    floor = -np.mean(t * np.log(t) + (1 - t) * np.log(1 - t))
  else:
    floor = -np.mean(np.sum(t * np.log(t), axis=1))
  assert losses[-1] - floor < 0.5 * (losses[0] - floor), (floor, losses)


@pytest.mark.slow
def test_evaluation_averages_scores_over_frames():
  from avmae_jax.evaluators import classification  # pylint: disable=import-outside-toplevel
  config = ft_config("recipe=vggsound")  # ce: softmax scores
  config.eval_modes = ["audioonly"]
  trainer, mesh = make_trainer(config)
  batch = make_batch(n=2, frames=3)
  evaluator = classification.Classification(trainer.module, mesh, trainer.task.eval_modes,
                                            "softmax", trainer.checkpoint_shardings.params)

  def scores(b):  # one batch through the evaluator's jitted function and its scoring
    out = evaluator.fn(params, {k: b[k] for k in evaluator.keys + ("mask",)},
                       jax.random.key(0))
    return evaluator.batch_scores(out)

  with jax.set_mesh(mesh):
    params = trainer.native_params(trainer.init().params)  # what evaluators take
    out = scores(batch)
    one = scores(dict(batch, frames=batch["frames"][:, 1]))
    whole, _ = trainer.evaluate(params, [batch])
  module, host_params = trainer.module, jax.device_get(params)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  # the model's forward, jitted: one program instead of an eager dispatch of every op
  forward = jax.jit(lambda p, a, v, mode: module.apply({"params": p}, a, v, mode),
                    static_argnums=3)
  per_frame = [softmax(np.asarray(forward(host_params, batch["audio"], batch["frames"][:, f],
                                          "multimodal")))
               for f in range(3)]
  np.testing.assert_allclose(out["multimodal"]["scores"], np.mean(per_frame, 0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(one["multimodal"]["scores"], per_frame[1], rtol=1e-5, atol=1e-6)
  audio_only = softmax(np.asarray(forward(host_params, batch["audio"], None, "audioonly")))
  np.testing.assert_allclose(out["audioonly"]["scores"], audio_only, rtol=1e-5, atol=1e-6)
  assert out["multimodal"]["loss"] is None and one["multimodal"]["loss"].shape == (2,)
  assert whole["frames"] == 3 and whole["num_clips"] == 2 and "eval_loss" not in whole


def _pretrain_module_fields():
  return dict(models.size_fields("tiny"), **SMALL)


@pytest.mark.slow
def test_init_from_pretraining_pth_copies_encoder_and_initialises_head(tmp_path):
  torch = pytest.importorskip("torch")
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(**_pretrain_module_fields())
  ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  path = str(tmp_path / "pretrained.pth")
  torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)

  trainer, mesh = make_trainer(ft_config())
  with jax.set_mesh(mesh):
    fresh = trainer.init()
    fresh_sd = flat(trainer.native_params(fresh.params))
    state, report = trainer.init_from(fresh, path)
  got = flat(trainer.native_params(state.params))
  head = {k for k in got if k.startswith("mlp_head.")}
  assert head == {"mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight",
                  "mlp_head.1.bias"}
  for key in set(got) - head:  # every encoder tensor, exactly
    np.testing.assert_array_equal(got[key], ref_sd[key], err_msg=key)
  for key in head:  # the head keeps its fresh initialisation
    np.testing.assert_array_equal(got[key], fresh_sd[key], err_msg=key)
  # the report names parameters as the model does (optimizer patterns' names)
  assert set(report["initialised"]) == native(got, head)
  assert set(report["dropped"]) == native(ref_sd, set(ref_sd) - set(got))
  assert any(k.startswith("decoder_blocks_") for k in report["dropped"])
  assert "mask_token" in report["dropped"]


@pytest.mark.slow
def test_init_from_a_pretraining_workdir(tiny_pretrain_workdir):
  # conftest's shared tiny pretraining run (tiny, audio 256, frames 64: this module's sizes);
  # load_init takes its latest checkpoint, step 3
  workdir = tiny_pretrain_workdir
  saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))
  want = flat(saved["params"])

  trainer, mesh = make_trainer(ft_config())
  with jax.set_mesh(mesh):
    state, report = trainer.init_from(trainer.init(), workdir)
  got = flat(trainer.native_params(state.params))
  encoder = [k for k in got if not k.startswith("mlp_head.")]
  assert len(encoder) > 40
  for key in encoder:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert len(report["initialised"]) == 4 and "mask_token" in report["dropped"]


def test_init_from_a_checkpoint_that_does_not_fit_names_the_problem(tmp_path):
  torch = pytest.importorskip("torch")
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  trainer, mesh = make_trainer(ft_config())
  sd = torch_port.CAVMAE(**_pretrain_module_fields()).state_dict()
  missing = {k: v for k, v in sd.items() if not k.startswith("blocks_a.1.")}
  torch.save(missing, str(tmp_path / "missing.pth"))
  wide = dict(_pretrain_module_fields(), audio_length=2 * AUDIO)
  torch.save(torch_port.CAVMAE(**wide).state_dict(), str(tmp_path / "wide.pth"))
  extra = dict(sd, **{"blocks_a.9.norm1.weight": sd["norm.weight"]})
  torch.save(extra, str(tmp_path / "extra.pth"))
  with jax.set_mesh(mesh):
    state = trainer.init()
    with pytest.raises(interop.CheckpointError, match=r"tensors missing: blocks_a_1/"):
      trainer.init_from(state, str(tmp_path / "missing.pth"))
    with pytest.raises(interop.CheckpointError, match=r"pos_embed_a has shape"):
      trainer.init_from(state, str(tmp_path / "wide.pth"))
    with pytest.raises(interop.CheckpointError, match=r"blocks_a_9/norm1/scale"):
      trainer.init_from(state, str(tmp_path / "extra.pth"))
    with pytest.raises(FileNotFoundError, match="model.json"):
      trainer.init_from(state, str(tmp_path))


def _linear_resample(table, n):
  """float64 numpy reference: half-pixel linear resampling of axis 0 (torch's bilinear)."""
  t = table.shape[0]
  x = np.clip((np.arange(n) + 0.5) * t / n - 0.5, 0, t - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, t - 1)
  w = (x - lo).reshape((-1,) + (1,) * (table.ndim - 1))
  return (1 - w) * table[lo].astype(np.float64) + w * table[hi].astype(np.float64)


@pytest.mark.slow
def test_init_audio_pos_fits_a_longer_checkpoints_audio_positions(tmp_path):
  # A model pretrained on 512 frames (8 x 32 audio patches) fine-tuned at 256 (8 x 16).
  torch = pytest.importorskip("torch")
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  wide = dict(_pretrain_module_fields(), audio_length=2 * AUDIO)
  sd = {k: v.numpy() for k, v in torch_port.CAVMAE(**wide).state_dict().items()}
  trained = np.random.default_rng(0).standard_normal(sd["pos_embed_a"].shape)
  sd["pos_embed_a"] = trained.astype(np.float32)  # as if learned: not a sin-cos table
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(tmp_path / "wide.pth"))
  grid = trained[0].reshape(8, 2 * AUDIO // 16, -1)  # frequency rows x time columns
  want = {"crop": grid[:, :AUDIO // 16],
          "interpolate": np.swapaxes(_linear_resample(np.swapaxes(grid, 0, 1), AUDIO // 16),
                                     0, 1)}
  # One trainer: init_from reads config.init_audio_pos when it is called.
  trainer, mesh = make_trainer(ft_config())
  with jax.set_mesh(mesh):
    fresh = trainer.init()
    for how in ("crop", "interpolate"):
      trainer.config.init_audio_pos = how
      state, _ = trainer.init_from(fresh, str(tmp_path / "wide.pth"))
      got = flat(trainer.native_params(state.params))
      np.testing.assert_allclose(got["pos_embed_a"][0].reshape(8, AUDIO // 16, -1),
                                 want[how], rtol=1e-6, atol=1e-6, err_msg=how)
      np.testing.assert_array_equal(got["pos_embed_v"], sd["pos_embed_v"])
      np.testing.assert_array_equal(got["blocks_a.0.attn.qkv.weight"],
                                    sd["blocks_a.0.attn.qkv.weight"])
    trainer.config.init_audio_pos = ""
    with pytest.raises(interop.CheckpointError, match=r"set config.init_audio_pos to crop"):
      trainer.init_from(fresh, str(tmp_path / "wide.pth"))
    trainer.config.init_audio_pos = "stretch"
    with pytest.raises(ValueError, match=r"config.init_audio_pos must be one of"):
      trainer.init_from(fresh, str(tmp_path / "wide.pth"))


@pytest.mark.parametrize("kind", ["cav_mae", "mavil"])
def test_cropping_fixed_audio_positions_gives_the_shorter_models_tables(kind):
  # Sin-cos tables depend on integer grid positions only, so the first 16 time positions of
  # the 1,024-frame tables are the 256-frame model's tables (cls row included for MAViL).
  fields = dict(models.size_fields("tiny", kind), kind=kind, img_size=IMAGE)
  long_params = models.init_params(models.build(dict(fields, audio_length=1024)))
  short = models.build(dict(fields, audio_length=AUDIO))
  short_params = models.init_params(short)
  loaded = {k: np.asarray(v) for k, v in models.common.flat_params(long_params).items()}
  fitted = short.fit_audio_positions(loaded, "crop")
  for name in short.audio_position_tables:
    np.testing.assert_array_equal(fitted[name], np.asarray(short_params[name]), err_msg=name)
  assert fitted[short.audio_position_tables[0]].shape != loaded[
      short.audio_position_tables[0]].shape
  with pytest.raises(models.CheckpointError, match="use interpolate"):
    models.build(dict(fields, audio_length=2048)).fit_audio_positions(loaded, "crop")


def test_init_from_a_finetuned_pth_keeps_or_replaces_the_head(tmp_path):
  torch = pytest.importorskip("torch")
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  fields = dict(models.size_fields("tiny", "cav_mae_ft"), **SMALL)
  trainer, mesh = make_trainer(ft_config())
  for classes in (CLASSES, 7):
    torch.manual_seed(classes)
    ref = {k: v.numpy() for k, v in torch_port.CAVMAEFT(num_classes=classes, **fields)
           .state_dict().items()}
    path = str(tmp_path / f"ft{classes}.pth")
    torch.save({k: torch.from_numpy(v) for k, v in ref.items()}, path)
    with jax.set_mesh(mesh):
      fresh = trainer.init()
      fresh_sd = flat(trainer.native_params(fresh.params))
      state, report = trainer.init_from(fresh, path)
    got = flat(trainer.native_params(state.params))
    for key, value in got.items():
      if classes == CLASSES or not key.startswith("mlp_head."):
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
      else:  # another label set: the head starts afresh
        np.testing.assert_array_equal(value, fresh_sd[key], err_msg=key)
    assert len(report["dropped"]) == (0 if classes == CLASSES else 4)


@pytest.mark.slow
def test_linear_probe_trains_only_the_head_and_keeps_the_encoder_bit_identical():
  config = ft_config("probe=true")
  config.optimizer.lr = 1e-3
  trainer, mesh = make_trainer(config)
  batch = make_batch()
  with jax.set_mesh(mesh):
    state = trainer.init()
    before = flat(trainer.native_params(state.params))
    for _ in range(3):
      state, metrics = trainer.train_step(
          state, trainer.global_batch(trainer.train_inputs(batch)), {})
  after = flat(trainer.native_params(state.params))
  assert float(metrics["grad_norm"]) > 0
  for key, value in after.items():
    if key.startswith("mlp_head."):
      assert not np.array_equal(value, before[key]), key
    else:
      assert value.dtype == before[key].dtype
      assert value.tobytes() == before[key].tobytes(), key  # bit for bit


def stand_in(steps_per_epoch):
  """A stand-in training input iterator: `steps_per_epoch` batches of random inputs."""
  def batch(step):
    out = make_batch(4, seed=step)
    out.pop("mask")
    return out
  return _helpers.StandInBatches(batch, steps_per_epoch)


class EvalStandIn:
  """A one-pass evaluation iterator of `n` clips, the last batch padded with mask 0."""

  def __init__(self, n, batch=4, frames=None):
    self.n, self.batch, self.frames = n, batch, frames
    full = make_batch(8, seed=100, frames=frames)
    self.clips = {k: v[:n] for k, v in full.items()}
    self.initial_state = {"i": 0}
    self.i = 0

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]

  def __iter__(self):
    return self

  def __next__(self):
    if self.i >= self.n:
      raise StopIteration
    out = {}
    for k, v in self.clips.items():
      part = v[self.i:self.i + self.batch]
      pad = self.batch - len(part)
      out[k] = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
    self.i += self.batch
    return out


@pytest.mark.slow
def test_weight_averaging_and_final_evaluation(tmp_path):
  from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  config = ft_config()
  config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 2
  config.keep_checkpoints, config.eval_every = 5, -1  # -1: evaluate at every epoch's end
  config.wa_start, config.wa_end = 2, 3  # epochs of 2 steps: the models after steps 4 and 6
  config.optimizer.lr = 1e-3
  workdir = str(tmp_path / "ft")
  results = train.train(config, workdir, train_iter=stand_in(2), eval_iter=EvalStandIn(6),
                        final_iter=EvalStandIn(6, frames=10))

  def params_at(step):
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state"))
    return flat(restored["params"])

  p4, p6 = params_at(4), params_at(6)
  host = ocp.StandardCheckpointer().restore(os.path.join(workdir, "averaged", "params"))
  averaged = flat(host)
  assert set(averaged) == set(p6)
  for key in p6:
    want = (p4[key].astype(np.float64) + p6[key]) / 2
    np.testing.assert_allclose(averaged[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
  assert not np.array_equal(averaged["blocks_u.0.attn.qkv.weight"],
                            p6["blocks_u.0.attn.qkv.weight"])
  with open(os.path.join(workdir, "averaged", "model.json")) as f:
    assert json.load(f)["model"]["kind"] == "cav_mae_ft"

  # The final evaluation: the averaged model, sigmoid outputs averaged over 10 frames.
  module = models.build(config.model)
  clips = EvalStandIn(6, frames=10).clips
  forward = jax.jit(lambda p, a, v: module.apply({"params": p}, a, v, "multimodal"))
  per_frame = [1 / (1 + np.exp(-np.asarray(forward(host, clips["audio"], clips["frames"][:, f]),
                                           np.float64)))
               for f in range(10)]
  scores = np.mean(per_frame, 0)
  want_ap = [skm.average_precision_score(clips["labels"][:, k], scores[:, k])
             for k in range(CLASSES)]
  with open(os.path.join(workdir, "final_eval.json")) as f:
    final = json.load(f)
  assert final["model"] == "averaged" and final["frames"] == 10 and final["num_clips"] == 6
  np.testing.assert_allclose(final["per_class_ap"]["multimodal"], want_ap, rtol=1e-4)
  assert final["eval_mAP"] == pytest.approx(np.mean(want_ap), rel=1e-4)
  assert results["eval_mAP"] == final["eval_mAP"]

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r.get("kind") == "eval"]
  assert [r["step"] for r in evals] == [2, 4, 6] and evals[-1]["frames"] == 1
  assert np.isfinite(evals[-1]["eval_loss"]) and evals[-1]["num_clips"] == 6
  assert [r["step"] for r in records if r.get("kind") == "final_eval"] == [6]
  steps = [r for r in records if "kind" not in r]
  assert [r["step"] for r in steps] == list(range(1, 7))
  assert all({"loss", "lr", "grad_norm"} <= set(r) for r in steps)


def test_weight_averaging_beyond_the_run_is_an_error(tmp_path):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  config = ft_config()
  config.total_steps, config.eval_every = 4, 0
  config.wa_start, config.wa_end = 1, 3
  with pytest.raises(ValueError, match=r"config\.wa_end=3 is beyond the run's 2 complete"):
    train.train(config, str(tmp_path / "x"), train_iter=stand_in(2))
