"""Training workdirs as models, and the evaluate command (retrieval against the PyTorch port).

A tiny training run (in-memory batches, 3 steps, checkpoints at steps 2 and 3: conftest's
`tiny_pretrain_workdir`) is shared by the tests of this module.
"""

import json
import os

import jax
import numpy as np
import pytest

from tests import _helpers

ROOT = _helpers.ROOT
AUDIO_LENGTH, IMG_SIZE = _helpers.AUDIO_LENGTH, _helpers.IMG_SIZE


def _saved_state(workdir, step):
  """The whole saved train state of a step, read without any target: the reference."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                       "state"))


@pytest.mark.slow
def test_training_workdir_loads_as_a_model(tiny_pretrain_workdir):
  import avmae_jax  # pylint: disable=import-outside-toplevel
  from avmae_jax import api  # pylint: disable=import-outside-toplevel
  from avmae_jax.checkpoints import model_dir as checkpoint  # pylint: disable=import-outside-toplevel
  workdir = tiny_pretrain_workdir
  assert checkpoint.is_model_dir(workdir)
  assert checkpoint.train_steps(workdir) == [2, 3]
  model = avmae_jax.load(workdir)
  assert model.kind == "cav_mae" and model.module.audio_length == AUDIO_LENGTH
  latest, earlier = _saved_state(workdir, 3), _saved_state(workdir, 2)
  assert {"step", "params", "opt_state"} <= set(latest) and int(latest["step"]) == 3
  got = jax.tree.leaves_with_path(model.params)
  assert len(got) == len(jax.tree.leaves(latest["params"]))
  for path, value in got:
    want = latest["params"]
    for key in path:
      want = want[key.key]
    np.testing.assert_array_equal(np.asarray(value), want, err_msg=jax.tree_util.keystr(path))
  # the latest step, not the first: step 2's parameters differ, and step= picks them
  qkv = lambda p: np.asarray(p["blocks_a_0"]["attn"]["qkv"]["kernel"])
  assert not np.array_equal(qkv(model.params), qkv(earlier["params"]))
  step2 = checkpoint.load_params(workdir, api.abstract_params(model.module), step=2)
  np.testing.assert_array_equal(qkv(step2), qkv(earlier["params"]))
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
    checkpoint.load_params(workdir, api.abstract_params(model.module), step=7)
  feats = model.features(np.zeros((1, AUDIO_LENGTH, 128)), np.zeros((1, IMG_SIZE, IMG_SIZE, 3)))
  assert feats["audio"].shape == (1, 128, 128) and np.isfinite(feats["video"]).all()


@pytest.mark.slow
def test_trainer_init_from_a_training_workdir(tiny_pretrain_workdir):
  from avmae_jax.checkpoints import interop  # pylint: disable=import-outside-toplevel
  from avmae_jax.parallel import mesh as sharding  # pylint: disable=import-outside-toplevel
  from avmae_jax.training import steps  # pylint: disable=import-outside-toplevel
  workdir = tiny_pretrain_workdir
  config = _helpers.tiny_pretrain_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  trainer = steps.from_config(config, mesh, steps_per_epoch=10)
  with jax.set_mesh(mesh):
    state, _ = trainer.init_from(trainer.init(), workdir)
  got = interop.flax_to_torch(trainer.native_params(state.params))
  want = interop.flax_to_torch(_saved_state(workdir, 3)["params"])
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_workdir_without_a_finished_checkpoint_says_so(tmp_path):
  from avmae_jax import api, models  # pylint: disable=import-outside-toplevel
  from avmae_jax.checkpoints import model_dir as checkpoint  # pylint: disable=import-outside-toplevel
  module = models.build(_helpers.tiny_pretrain_config().model)
  path = str(tmp_path / "fresh")
  os.makedirs(os.path.join(path, "checkpoints"))
  checkpoint.write_model_config(path, models.model_config(module))
  assert checkpoint.is_model_dir(path)
  with pytest.raises(FileNotFoundError, match="without a finished checkpoint"):
    checkpoint.load_params(path, api.abstract_params(module))
  assert not checkpoint.is_model_dir(str(tmp_path))


# -- evaluate: retrieval and classification against the PyTorch port --------------------------

TINY_SHAPES = dict(audio_length=AUDIO_LENGTH, img_size=IMG_SIZE)


def _batches(n, batch_size, num_classes=0, num_frames=0, seed=0):
  """Pipeline-like eval batches: the last one padded with garbage rows of mask 0."""
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((n, AUDIO_LENGTH, 128)).astype(np.float32)
  frame_shape = (num_frames,) if num_frames else ()
  frames = rng.standard_normal((n, *frame_shape, IMG_SIZE, IMG_SIZE, 3)).astype(np.float32)
  labels = (rng.random((n, max(num_classes, 1))) < 0.4).astype(np.float32)
  labels[np.arange(n), rng.integers(0, max(num_classes, 1), n)] = 1  # every clip has one
  out = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch = {"audio": audio[start:stop], "frames": frames[start:stop],
             "mask": np.r_[np.ones(stop - start), np.zeros(pad)].astype(np.float32)}
    if num_classes:
      batch["labels"] = labels[start:stop]
    if pad:  # padding rows: large garbage, so that counting them would change every figure
      for key in list(batch):
        if key != "mask":
          filler = np.full((pad, *batch[key].shape[1:]), 7.0, np.float32)
          batch[key] = np.concatenate([batch[key], filler])
    out.append(batch)
  return out, audio, frames, labels


@pytest.fixture(scope="module")
def torch_pretrained(tmp_path_factory):
  torch = pytest.importorskip("torch")
  from avmae_jax import models, torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(**models.size_fields("tiny"), **TINY_SHAPES).eval()
  path = str(tmp_path_factory.mktemp("pth") / "pretrained.pth")
  torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)
  return path, ref


def test_retrieval_of_an_imported_pth_matches_the_pytorch_port(torch_pretrained, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from avmae_jax import cli, evaluate  # pylint: disable=import-outside-toplevel
  from avmae_jax.evaluators import metrics  # pylint: disable=import-outside-toplevel
  path, ref = torch_pretrained
  batches, audio, frames, _ = _batches(10, 4)
  # the reference: the port's forward_feat, mean over tokens, on the 10 real clips only
  with torch.no_grad():
    a, v = ref.forward_feat(torch.from_numpy(audio),
                            torch.from_numpy(frames.transpose(0, 3, 1, 2)))
  want_a, want_v = a.mean(1).numpy(), v.mean(1).numpy()
  want = metrics.retrieval_metrics(want_a, want_v)

  model, _ = cli.load_model(path)
  got_a, got_v = evaluate.pooled_features(model, batches)
  assert got_a.shape == want_a.shape == (10, 128)
  np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-4, atol=1e-5)

  workdir = str(tmp_path / "eval")
  results = evaluate.run(None, workdir, "retrieval", checkpoint_path=path, batches=batches)
  for key, value in want.items():
    assert results[key] == value, key
  assert results["num_clips"] == 10 and results["chance_r1"] == 10.0
  with open(os.path.join(workdir, "eval_retrieval.json")) as f:
    saved = json.load(f)
  assert saved["a2v_r5"] == want["a2v_r5"] and saved["model"].startswith("cav_mae from")
  table = evaluate.format_table(results)
  assert "audio->video" in table and "median rank" in table


@pytest.mark.slow
def test_retrieval_from_a_training_workdir_uses_its_latest_step(tiny_pretrain_workdir):
  from avmae_jax import api, evaluate  # pylint: disable=import-outside-toplevel
  from avmae_jax.checkpoints import model_dir as checkpoint  # pylint: disable=import-outside-toplevel
  from avmae_jax.evaluators import metrics  # pylint: disable=import-outside-toplevel
  workdir = tiny_pretrain_workdir
  batches, audio, frames, _ = _batches(6, 4, seed=1)
  results = evaluate.run(None, workdir, "retrieval", batches=batches)
  assert results["model"].endswith("(step 3)")
  model = api.load(workdir)
  # independent of evaluate's loop: token features of the real clips, pooled here
  feats = model.features(audio, frames)
  want = metrics.retrieval_metrics(feats["audio"].mean(1), feats["video"].mean(1))
  assert {k: results[k] for k in want} == want
  earlier = evaluate.run(None, workdir, "retrieval", step=2, batches=batches)
  assert earlier["model"].endswith("(step 2)")
  assert checkpoint.train_steps(workdir) == [2, 3]


@pytest.fixture(scope="module")
def torch_finetuned(tmp_path_factory):
  torch = pytest.importorskip("torch")
  from avmae_jax import models, torch_port  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  ref = torch_port.CAVMAEFT(num_classes=5, **models.size_fields("tiny", kind="cav_mae_ft"),
                            **TINY_SHAPES).eval()
  with torch.no_grad():  # a head with some spread, so the scores are not all ~0.5
    ref.mlp_head[1].weight.mul_(3.0)
  path = str(tmp_path_factory.mktemp("pth") / "finetuned.pth")
  torch.save(ref.state_dict(), path)
  return path, ref


@pytest.mark.parametrize("mode,activation", [("multimodal", "sigmoid"),
                                             ("audioonly", "softmax"),
                                             ("videoonly", "sigmoid")])
def test_classification_over_ten_frames_matches_the_pytorch_port(torch_finetuned, tmp_path,
                                                                 mode, activation):
  import torch  # pylint: disable=import-outside-toplevel
  from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel
  from avmae_jax import evaluate  # pylint: disable=import-outside-toplevel
  path, ref = torch_finetuned
  batches, audio, frames, labels = _batches(9, 4, num_classes=5, num_frames=10, seed=2)
  # the reference: activation of the port's logits per frame, averaged over the 10 frames
  # (in float64, as evaluate does: float32 sigmoids saturate to ties at 1.0)
  act = torch.sigmoid if activation == "sigmoid" else (lambda x: torch.softmax(x, dim=1))
  with torch.no_grad():
    probs = [act(ref(torch.from_numpy(audio),
                     torch.from_numpy(np.ascontiguousarray(frames[:, i].transpose(0, 3, 1, 2))),
                     mode).double()).numpy() for i in range(10)]
  want_scores = np.mean(probs, axis=0)
  if mode == "audioonly":  # frames unused: every frame gives the same scores
    np.testing.assert_allclose(probs[0], probs[9], rtol=1e-6)
  results = evaluate.run(None, str(tmp_path), "classify", checkpoint_path=path, mode=mode,
                         activation=activation, batches=batches)
  assert results["num_clips"] == 9 and results["mode"] == mode
  if activation == "sigmoid":
    positive = labels >= 0.5
    want_map = np.mean([skm.average_precision_score(positive[:, k], want_scores[:, k])
                        for k in range(5) if positive[:, k].any()])
    assert results["mAP"] == pytest.approx(want_map, abs=1e-6)
    assert results["primary"] == "mAP"
  want_acc = np.mean(np.argmax(want_scores, 1) == np.argmax(labels, 1))
  assert results["accuracy"] == pytest.approx(want_acc)
  assert results["frames_averaged"] == (1 if mode == "audioonly" else 10)
  with open(os.path.join(str(tmp_path), f"eval_classify_{mode}.json")) as f:
    assert len(json.load(f)["per_class_ap"]) == 5


def test_clear_errors(torch_pretrained, tmp_path):
  from avmae_jax import evaluate  # pylint: disable=import-outside-toplevel
  path, _ = torch_pretrained
  batches, *_ = _batches(4, 4, num_classes=3)
  with pytest.raises(evaluate.EvaluationError, match=r"needs a fine-tuned model.*cav_mae "
                                                     r"\(pretraining\)"):
    evaluate.run(None, str(tmp_path), "classify", checkpoint_path=path, batches=batches)
  with pytest.raises(evaluate.EvaluationError, match="task must be one of"):
    evaluate.run(None, str(tmp_path), "segment", checkpoint_path=path, batches=batches)
  with pytest.raises(evaluate.EvaluationError, match="does not exist"):
    evaluate.run(None, str(tmp_path), "retrieval", checkpoint_path=str(tmp_path / "no.pth"),
                 batches=batches)
  with pytest.raises(evaluate.EvaluationError, match="holds no model checkpoint"):
    evaluate.run(None, str(tmp_path), "retrieval", batches=batches)
  wrong, *_ = _batches(4, 4)
  wrong[0]["audio"] = wrong[0]["audio"][:, :128]
  with pytest.raises(evaluate.EvaluationError, match="target_length=256"):
    evaluate.run(None, str(tmp_path), "retrieval", checkpoint_path=path, batches=wrong)


@pytest.mark.slow
def test_evaluate_command_end_to_end_matches_the_pytorch_port(tmp_path, synthetic_data_dir):
  torch = pytest.importorskip("torch")
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from avmae_jax import cli, config_args, models, torch_port  # pylint: disable=import-outside-toplevel
  from avmae_jax.evaluators import metrics  # pylint: disable=import-outside-toplevel
  torch.manual_seed(4)
  # the demo config's input geometry (2.56 s of log-mel, 112 px frames)
  ref = torch_port.CAVMAE(**models.size_fields("tiny"), audio_length=256, img_size=112).eval()
  pth = str(tmp_path / "tiny.pth")
  torch.save(ref.state_dict(), pth)
  data_dir, workdir = synthetic_data_dir, str(tmp_path / "eval")
  overrides = list(_helpers.DEMO_DATA_FLAGS)
  cmd = [sys.executable, "-m", "avmae_jax.evaluate", "--config",
         f"configs/demo.py:data_dir={data_dir}", *overrides, "--workdir", workdir]
  out = subprocess.run(cmd + ["--task", "retrieval", "--checkpoint", pth], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "audio->video" in out.stdout and "retrieval on 8 clips" in out.stdout
  with open(os.path.join(workdir, "eval_retrieval.json")) as f:
    got = json.load(f)

  # the same clips through the pipeline here, and the port's forward_feat on them
  config = _helpers.use_demo_data(
      config_args.load_config(_helpers.config_path(f"demo.py:data_dir={data_dir}")))
  audio, video = [], []
  for batch in cli.input_iterator(config):
    keep = batch["mask"] > 0
    with torch.no_grad():
      a, v = ref.forward_feat(torch.from_numpy(batch["audio"][keep]),
                              torch.from_numpy(batch["frames"][keep].transpose(0, 3, 1, 2)))
    audio.append(a.mean(1).numpy())
    video.append(v.mean(1).numpy())
  want = metrics.retrieval_metrics(np.concatenate(audio), np.concatenate(video))
  assert want["num_clips"] == 8
  for key, value in want.items():
    assert got[key] == value, key

  # a pretraining model asked to classify: a clear error before any data is read
  out = subprocess.run(cmd + ["--task", "classify", "--checkpoint", pth], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "needs a fine-tuned model" in out.stderr and "Traceback" not in out.stderr
  out = subprocess.run(cmd + ["--task", "segment"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 1 and "retrieval" in out.stderr  # absl names the choices
