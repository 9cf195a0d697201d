"""MAViL through the training stack: stage-1 and stage-2 train steps (teacher frozen and
outside the train state), fine-tuning from a pretraining workdir, evaluate / extract /
bench on MAViL models.

Tiny widths, one encoder block and small inputs (audio 128 x 32 -> 16 tokens, clips
4 x 48 x 48 -> 18 tubelets) keep compiles short. Independent references: the PyTorch port
(avmae_jax.torch_port) for features and logits, the saved orbax checkpoints read directly.
"""

import json
import os

import jax
import numpy as np
import pytest

from avmae_jax import api
from avmae_jax.checkpoints import model_dir as checkpoint
from avmae_jax import config_args
from avmae_jax.checkpoints import interop
from avmae_jax.evaluators import metrics as metrics_lib
from avmae_jax import models
from avmae_jax.models.common import flat_params
from tests import _helpers

ROOT = _helpers.ROOT
PRETRAIN = os.path.join(ROOT, "configs", "mavil_pretrain.py")
FINETUNE = os.path.join(ROOT, "configs", "mavil_finetune.py")
AUDIO, MELS, IMAGE, FRAMES, CLASSES = 128, 32, 48, 4, 5
GEOMETRY = dict(audio_length=AUDIO, num_mel_bins=MELS, img_size=IMAGE, num_frames=FRAMES,
                encoder_depth=1)


def tiny_fields(kind):
  return {**models.size_fields("tiny", kind), **GEOMETRY}


def inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, AUDIO, MELS)).astype(np.float32),
          rng.standard_normal((n, FRAMES, IMAGE, IMAGE, 3)).astype(np.float32))


def eval_batches(n, batch_size, seed=0):
  """Pipeline-like evaluation batches; the last one padded with garbage rows of mask 0."""
  audio, frames = inputs(n, seed)
  labels = np.eye(CLASSES, dtype=np.float32)[np.arange(n) % CLASSES]
  out = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch = {"audio": audio[start:stop], "frames": frames[start:stop],
             "labels": labels[start:stop], "clip_id": np.array([f"c{i}" for i in
                                                                range(start, stop)]),
             "mask": np.r_[np.ones(stop - start), np.zeros(pad)].astype(np.float32)}
    if pad:
      for key in ("audio", "frames", "labels"):
        batch[key] = np.concatenate([batch[key], 100 + np.zeros((pad, *batch[key].shape[1:]),
                                                               np.float32)])
      batch["clip_id"] = np.concatenate([batch["clip_id"], ["pad"] * pad])
    out.append(batch)
  return out, audio, frames, labels


def torch_to_model(ref, kind, **fields):
  """The Flax model holding the PyTorch port's weights (strict: every tensor)."""
  module = models.build(dict(kind=kind, **tiny_fields(kind), **fields))
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  params, _ = interop.torch_to_flax(state, api.abstract_params(module), strict=True)
  return api.LoadedModel(module, jax.tree.map(np.asarray, params))


# -- evaluate / extract on MAViL models ------------------------------------------------------


@pytest.fixture(scope="module")
def torch_mavil():
  torch = pytest.importorskip("torch")
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  return torch_port.MAViL(**tiny_fields("mavil")).eval()


def test_mavil_retrieval_and_extract_match_the_pytorch_port(torch_mavil, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from avmae_jax import evaluate, extract  # pylint: disable=import-outside-toplevel
  model = torch_to_model(torch_mavil, "mavil")
  model_dir = model.save(str(tmp_path / "model"))
  batches, audio, frames, _ = eval_batches(10, 4)
  results = evaluate.run(None, str(tmp_path / "eval"), "retrieval", checkpoint_path=model_dir,
                         batches=batches)
  with torch.no_grad():
    a, v = torch_mavil.forward_feat(torch.from_numpy(audio),
                                    torch.from_numpy(frames.transpose(0, 4, 1, 2, 3)))
  want = metrics_lib.retrieval_metrics(a.mean(1).numpy(), v.mean(1).numpy())
  assert results["num_clips"] == 10 and results["model"].startswith("mavil from")
  for key in ("a2v_r1", "a2v_r5", "v2a_r1", "v2a_median_rank"):
    assert results[key] == pytest.approx(want[key]), key
  with open(tmp_path / "eval" / "eval_retrieval.json") as f:
    assert json.load(f)["a2v_r1"] == results["a2v_r1"]

  index = extract.extract(model, batches, str(tmp_path / "feats"), pooled=False)
  # tokens: each ViT's patch outputs (no cls): 8 x 2 audio, 2 x 3 x 3 video tubelets
  assert index["shapes"]["audio"] == [16, 128] and index["shapes"]["video"] == [18, 128]
  shard = np.load(tmp_path / "feats" / index["shards"][0]["file"])
  assert list(shard["clip_id"]) == [f"c{i}" for i in range(10)]
  np.testing.assert_allclose(shard["video"], v.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(shard["audio"], a.numpy(), rtol=1e-4, atol=1e-5)
  # a clip of the wrong length names the config field
  short = [dict(batches[0], frames=batches[0]["frames"][:, :2])]
  with pytest.raises(evaluate.EvaluationError, match="num_frames=4"):
    evaluate.retrieval(model, short)


def test_mavil_classification_matches_the_pytorch_port(tmp_path):
  torch = pytest.importorskip("torch")
  from avmae_jax import evaluate, torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  ref = torch_port.MAViLFT(num_classes=CLASSES, heads="unimodal",
                           **tiny_fields("mavil_ft")).eval()
  model = torch_to_model(ref, "mavil_ft", num_classes=CLASSES, heads="unimodal")
  model_dir = model.save(str(tmp_path / "model"))
  batches, audio, frames, labels = eval_batches(10, 4)
  for mode in ("audioonly", "videoonly"):
    results = evaluate.run(None, str(tmp_path), "classify", checkpoint_path=model_dir,
                           mode=mode, activation="softmax", batches=batches)
    with torch.no_grad():
      logits = ref(torch.from_numpy(audio), torch.from_numpy(frames.transpose(0, 4, 1, 2, 3)),
                   mode=mode).numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    want = metrics_lib.classification_metrics(probs, labels, multilabel=False)
    assert results["num_clips"] == 10 and results["frames_averaged"] == 1
    assert results["accuracy"] == pytest.approx(want["accuracy"])
    assert results["mAP"] == pytest.approx(want["mAP"], rel=1e-5)
  # the default mode of a model with unimodal heads is audioonly
  np.testing.assert_allclose(model.classify(audio[:2], None),
                             model.classify(audio[:2], None, mode="audioonly"))
  with pytest.raises(evaluate.EvaluationError, match="mode must be one of"):
    evaluate.run(None, str(tmp_path), "classify", checkpoint_path=model_dir,
                 mode="multimodal", batches=batches)
  with pytest.raises(evaluate.EvaluationError, match="average_frames"):
    evaluate.run(None, str(tmp_path), "classify", checkpoint_path=model_dir,
                 mode="audioonly", average_frames=True, batches=batches)


# -- training: stage 1, stage 2 with a frozen teacher, fine-tuning -----------------------------


def pretrain_config(stage=1, teacher="", batch=4):
  config = config_args.load_config(f"{PRETRAIN}:size=tiny,stage={stage}")
  config.batch_size, config.teacher = batch, teacher
  config.model.update(GEOMETRY)
  config.optimizer.lr, config.optimizer.lr_scale_by_batch = 1e-3, False
  config.optimizer.warmup_epochs, config.optimizer.warmup_steps = None, 0
  config.optimizer.total_steps = 1000
  config.log_every, config.checkpoint_every, config.eval_every = 1, 1000, 0
  config.tensorboard = False
  config.async_checkpointing = False
  return config


def make_trainer(config):
  from avmae_jax.parallel import mesh as sharding  # pylint: disable=import-outside-toplevel
  from avmae_jax.training import steps  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  return steps.from_config(config, mesh, steps_per_epoch=100), mesh


def random_batch(step, batch=4):
  """A random training batch (labels for fine-tuning), different at every step."""
  audio, frames = inputs(batch, seed=step)
  labels = np.eye(CLASSES, dtype=np.float32)[np.arange(batch) % CLASSES]
  return {"audio": audio, "frames": frames, "labels": labels}


def saved_params(workdir, step):
  """A workdir's saved parameters, read by orbax without any target (the reference)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                        "state"))
  return state["params"]


@pytest.fixture(scope="module")
def stage1_workdir(tmp_path_factory):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("mavil") / "stage1")
  config = pretrain_config()
  config.total_steps = 3
  train.train(config, path, train_iter=_helpers.StandInBatches(random_batch))
  return path


@pytest.mark.slow
def test_stage1_train_step(stage1_workdir):
  from avmae_jax.models import mavil  # pylint: disable=import-outside-toplevel
  with open(os.path.join(stage1_workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert set(mavil.PRETRAIN_METRICS) | {"grad_norm", "lr"} <= set(records[0])
  assert all(np.isfinite(r["loss"]) and r["loss_intra_a"] > 0 for r in records)
  trainer, _ = make_trainer(pretrain_config())
  assert trainer.abstract_aux == {} and trainer.module.kind == "mavil"
  # trained, with the fixed sin-cos tables kept bit for bit
  params = saved_params(stage1_workdir, 3)
  init = api.init_params(trainer.module)
  assert not np.array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"],
                            init["blocks_0"]["attn"]["qkv"]["kernel"])
  for name in ("pos_embed", "pos_embed_v", "decoder_pos_embed", "decoder_pos_embed_v"):
    np.testing.assert_array_equal(params[name], init[name], err_msg=name)


@pytest.mark.slow
def test_stage2_teacher_is_frozen_outside_the_state_and_the_loss_drops(stage1_workdir):
  from avmae_jax.models import mavil  # pylint: disable=import-outside-toplevel
  config = pretrain_config(stage=2, teacher=stage1_workdir)
  trainer, mesh = make_trainer(config)
  assert trainer.task.teacher.stage == 1 and trainer.module.stage == 2
  saved = saved_params(stage1_workdir, 3)
  # The state holds the student only: its leaves are the params and their optimizer state.
  n_params = len(jax.tree.leaves(trainer.abstract_state.params))
  assert len(jax.tree.leaves(trainer.abstract_state)) == 1 + n_params + len(
      jax.tree.leaves(trainer.abstract_state.opt_state))
  batch = dict(zip(("audio", "frames"), inputs(4, seed=7)))
  with jax.set_mesh(mesh):
    teacher = trainer.task.load_aux(trainer.aux_shardings)
    # only the parts that make the targets: encoders and fusion, no decoders
    assert "blocks_av_0" in teacher and "decoder_blocks_0" not in teacher
    for path, value in jax.tree_util.tree_leaves_with_path(teacher):
      want = saved
      for key in path:
        want = want[key.key]
      np.testing.assert_array_equal(np.asarray(value), want)
    before = jax.tree.map(np.array, teacher)
    state = trainer.init()
    student0 = jax.device_get(trainer.native_params(state.params))
    losses = []
    for _ in range(8):
      state, metrics = trainer.train_step(state, trainer.global_batch(batch),
                                          teacher)
      losses.append(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, teacher))
    out, _ = trainer.evaluate(state.params, [dict(batch, mask=np.ones(4, np.float32))],
                              teacher)
  assert losses[-1] < 0.8 * losses[0], losses
  assert out["num_clips"] == 4 and np.isfinite(out["eval_loss_rec_a"])
  # Step 1's loss is the student's against targets of the whole saved teacher, built here
  # from its model.json and the checkpoint read directly, with the step's masking key.
  full_teacher = models.build(checkpoint.read_model_config(stage1_workdir))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), 0)

  @jax.jit  # one program instead of an eager dispatch of every op
  def first_loss(student_params, teacher_params, audio, frames):
    targets = mavil.compute_teacher_targets(full_teacher, teacher_params, audio, frames)
    return trainer.module.apply({"params": student_params}, audio, frames,
                                teacher_targets=targets, rngs={"masking": key})["loss"]

  want = first_loss(student0, saved, *batch.values())
  assert losses[0] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow
def test_stage2_config_errors_name_the_field(stage1_workdir, tmp_path):
  with pytest.raises(ValueError, match="needs config.teacher"):
    make_trainer(pretrain_config(stage=2))
  with pytest.raises(ValueError, match="is for MAViL stage 2"):
    make_trainer(pretrain_config(stage=1, teacher=stage1_workdir))
  config = pretrain_config(stage=2, teacher=stage1_workdir)
  config.model.img_size = 32
  with pytest.raises(ValueError, match=r"img_size \(teacher 48, student 32\)"):
    make_trainer(config)
  with pytest.raises(FileNotFoundError, match="not a training workdir or model"):
    make_trainer(pretrain_config(stage=2, teacher=str(tmp_path)))


@pytest.fixture(scope="module")
def stage2_workdir(stage1_workdir):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(stage1_workdir), "stage2")
  config = pretrain_config(stage=2, teacher=stage1_workdir)
  config.total_steps = 2
  train.train(config, path, train_iter=_helpers.StandInBatches(random_batch))
  return path


@pytest.mark.slow
def test_stage2_run_pins_its_teacher(stage1_workdir, stage2_workdir, tmp_path):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  with open(os.path.join(stage2_workdir, "teacher.json")) as f:
    assert json.load(f) == {"path": os.path.abspath(stage1_workdir), "step": 3,
                            "teacher_stage": 1}
  loaded = api.load(stage2_workdir)
  assert loaded.kind == "mavil" and loaded.module.stage == 2
  # an exported model directory works as a teacher too (the same weights)
  exported = api.load(stage1_workdir).save(str(tmp_path / "exported"))
  config = pretrain_config(stage=2, teacher=exported)
  trainer, mesh = make_trainer(config)
  other, _ = make_trainer(pretrain_config(stage=2, teacher=stage1_workdir))
  with jax.set_mesh(mesh):
    from_dir = trainer.task.load_aux(trainer.aux_shardings)
    from_workdir = other.task.load_aux(other.aux_shardings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_dir),
               jax.device_get(from_workdir))
  # but a resumed run keeps its own teacher: another one is refused
  config.total_steps = 3
  with pytest.raises(ValueError, match="has trained with the teacher"):
    train.train(config, stage2_workdir, train_iter=_helpers.StandInBatches(random_batch))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multimodal", "audioonly"])
def test_finetuning_starts_from_the_stage2_encoder(stage2_workdir, mode):
  config = config_args.load_config(f"{FINETUNE}:size=tiny,num_classes={CLASSES},mode={mode}")
  config.batch_size = 4
  config.model.update(GEOMETRY)
  trainer, mesh = make_trainer(config)
  saved = flat_params(saved_params(stage2_workdir, 2))
  with jax.set_mesh(mesh):
    state, report = trainer.init_from(trainer.init(), stage2_workdir)
    got = flat_params(jax.device_get(trainer.native_params(state.params)))
    assert any(k.startswith("decoder_blocks") for k in report["dropped"])
    assert "norm/scale" in report["dropped"] and "mask_token_v" in report["dropped"]
    if mode == "multimodal":  # one fusion block more than pretraining (the second): fresh
      assert {k.split("/")[0] for k in report["initialised"]} == {
          "blocks_av_1", "fc_norm_av", "head_av"}
    else:  # no fusion at all
      assert any(k.startswith("blocks_av_0/") for k in report["dropped"])
      assert {k.split("/")[0] for k in report["initialised"]} == {
          "fc_norm_a", "head_a", "fc_norm_v", "head_v"}
    for key in report["loaded"]:
      np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    assert "blocks_v_0/attn/qkv/kernel" in report["loaded"]
    batch = trainer.train_inputs(next(_helpers.StandInBatches(random_batch)))
    assert ("frames" in batch) == (mode == "multimodal")
    state, metrics = trainer.train_step(state, trainer.global_batch(batch), {})
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_bench_train_runs_mavil_stage2_with_a_stand_in_teacher(monkeypatch):
  import argparse  # pylint: disable=import-outside-toplevel
  from avmae_jax import bench  # pylint: disable=import-outside-toplevel
  # This file's small stage-2 config at its batch size, without a teacher: the step is the
  # one the stage-2 tests above compile (the session's compilation cache holds it).
  small = pretrain_config(stage=2)
  monkeypatch.setattr(bench.config_args, "load_config", lambda spec: small)
  args = argparse.Namespace(config="small stage 2", batch_size=4, steps=1, dtype=None,
                            mesh=None, remat_policy=None, scan_layers=None,
                            attention=None, torch=False)
  result = bench.bench_train(args)
  assert result["kind"] == "mavil" and result["step_ms"] > 0 and np.isfinite(result["loss"])
  # the step's FLOPs include the teacher's forward pass
  from avmae_jax.models import flops  # pylint: disable=import-outside-toplevel
  module = models.build(small.model)
  assert result["flops_per_sample"] == flops.train_flops(module) > 3 * flops.forward_flops(
      module)
