"""Training: sharding equivalence, resume after SIGTERM, init from a .pth, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests import _helpers

ROOT = _helpers.ROOT

SHARDING_PROBE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from avmae_jax import config_args
    from avmae_jax.parallel import mesh as sharding
    from avmae_jax.training import steps
    config = config_args.load_config("configs/cav_mae_pretrain.py:size=tiny")
    config.batch_size = 8
    config.model.audio_length = 256
    config.model.img_size = 64
    config.optimizer.lr = 1e-3
    rng = np.random.default_rng(0)
    batches = [{"audio": rng.standard_normal((8, 256, 128)).astype(np.float32),
                "frames": rng.standard_normal((8, 64, 64, 3)).astype(np.float32)}
               for _ in range(3)]
    results = {}
    # One mesh with every axis: the batch split over data x fsdp (4 ways), parameters and
    # optimizer state over fsdp, attention heads and the MLP over tensor.
    # Blocks scanned, as on an accelerator (the stacked train state is sharded too).
    for name, shape, n, scan in (
        ("single", {"data": 1}, 1, True),
        ("data2_fsdp2_tensor2", {"data": 2, "fsdp": 2, "tensor": 2}, 8, True)):
      mesh = sharding.make_mesh(shape, jax.devices()[:n])
      with config.ignore_type():  # the recipe's "auto"
        config.model.scan_layers = scan
      trainer = steps.from_config(config, mesh, steps_per_epoch=10)
      with jax.set_mesh(mesh):
        state = trainer.init()
        if n > 1:  # really split: fc1 [embed, mlp] and its Adam moments over fsdp x tensor
          # (scanned: the stacked [layers, embed, mlp] of blocks_a, layers not split)
          fc1 = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                 if jax.tree_util.keystr(path).endswith(
                     "['blocks_a']['mlp']['fc1']['kernel']")]
          assert len(fc1) == 3, len(fc1)
          for leaf in fc1:
            shard = leaf.addressable_shards[0].data.shape
            assert shard == (leaf.shape[0], leaf.shape[1] // 2, leaf.shape[2] // 2), (
                leaf.shape, shard)
        losses = []
        for batch in batches:
          state, metrics = trainer.train_step(state, trainer.global_batch(batch), {})
          losses.append({k: float(v) for k, v in metrics.items()})
      results[name] = losses
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_meshes_give_the_same_losses():
  """Three steps with scanned blocks on one device and on a data x fsdp x tensor mesh."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDING_PROBE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  reference = results["single"]
  assert len(reference) == 3 and reference[0]["loss"] != reference[2]["loss"]
  for name, tolerance in (("data2_fsdp2_tensor2", 1e-5),):
    for step, (got, want) in enumerate(zip(results[name], reference)):
      for key in ("loss", "loss_mae_a", "loss_mae_v", "nce", "grad_norm"):
        assert abs(got[key] - want[key]) <= tolerance * max(1.0, abs(want[key])), (
            name, step, key, got[key], want[key])


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("samples_per_s", None)  # evaluation records have none
  return records


@pytest.mark.slow
def test_resume_after_sigterm_is_bit_exact(tmp_path, synthetic_data_dir, demo_pretrain_workdir):
  steps = 8  # the shared demo run's: the uninterrupted reference
  want = _records(demo_pretrain_workdir)
  assert [r["step"] for r in want] == list(range(1, steps + 1)) + [steps]  # + its evaluation

  interrupted = str(tmp_path / "interrupted")
  cmd = _helpers.demo_train_cmd(interrupted, synthetic_data_dir, steps)
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = os.path.join(interrupted, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted: saved step" in stdout, stdout
  stopped_at = len(_records(interrupted))
  assert 3 <= stopped_at < steps, "SIGTERM came too late to test a resume"
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _records(interrupted) == want  # every logged figure identical, bit for bit


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_keeps_last_checkpoint(tmp_path):
  from avmae_jax import train  # pylint: disable=import-outside-toplevel

  # The shared tiny run's config (the session's compilation cache may hold its step), with
  # TensorBoard and asynchronous checkpoints (the defaults) on.
  config = _helpers.tiny_pretrain_config(total_steps=3)
  config.tensorboard, config.async_checkpointing = True, True

  def batch(step):  # the stand-in input: the last one (step 3, which ends saving) holds a NaN
    audio = np.zeros((2, 256, 128), np.float32) + step
    if step == 3:
      audio[0, 0, 0] = np.nan
    return {"audio": audio, "frames": np.ones((2, 64, 64, 3), np.float32)}

  workdir = str(tmp_path / "nan")
  with pytest.raises(train.StopTraining, match="at step 3"):
    train.train(config, workdir, train_iter=_helpers.StandInBatches(batch))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


@pytest.mark.slow
def test_init_from_reference_pth(tmp_path):
  torch = pytest.importorskip("torch")
  import jax  # pylint: disable=import-outside-toplevel
  from avmae_jax import models, torch_port  # pylint: disable=import-outside-toplevel
  from avmae_jax.checkpoints import interop  # pylint: disable=import-outside-toplevel
  from avmae_jax.parallel import mesh as sharding  # pylint: disable=import-outside-toplevel
  from avmae_jax.training import steps  # pylint: disable=import-outside-toplevel

  fields = dict(models.size_fields("tiny"), audio_length=256, img_size=64)
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(**fields)
  path = str(tmp_path / "pretrained.pth")
  torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)

  # the shared tiny run's trainer (the session's compilation cache may hold its init and step)
  config = _helpers.tiny_pretrain_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  trainer = steps.from_config(config, mesh, _helpers.STEPS_PER_EPOCH)
  with jax.set_mesh(mesh):
    state, _ = trainer.init_from(trainer.init(), path)
    loaded = interop.flax_to_torch(trainer.native_params(state.params))
    for key, value in ref.state_dict().items():
      np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)
    rng = np.random.default_rng(0)
    batch = {"audio": rng.standard_normal((2, 256, 128)).astype(np.float32),
             "frames": rng.standard_normal((2, 64, 64, 3)).astype(np.float32)}
    state, metrics = trainer.train_step(state, trainer.global_batch(batch), {})
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    moved = interop.flax_to_torch(trainer.native_params(state.params))
    assert not np.array_equal(moved["blocks_a.0.attn.qkv.weight"],
                              ref.state_dict()["blocks_a.0.attn.qkv.weight"].numpy())
    # the fixed sin-cos tables stay fixed under the optimizer
    np.testing.assert_array_equal(moved["pos_embed_a"], ref.state_dict()["pos_embed_a"].numpy())


@pytest.mark.slow
def test_scanned_blocks_train_like_unrolled_ones_and_checkpoint_per_block(tmp_path):
  """Three steps with blocks scanned (stacked train state) and unrolled: the same losses and
  gradient norms within 1e-6 (float32). The scanned run checkpoints after step 1 in the
  per-block layout: an unrolled run restores that as it is, the scanned run gets its state
  back bit for bit and goes on from it."""
  from avmae_jax.checkpoints import train_state  # pylint: disable=import-outside-toplevel
  from avmae_jax.parallel import mesh as sharding  # pylint: disable=import-outside-toplevel
  from avmae_jax.training import steps  # pylint: disable=import-outside-toplevel
  config = _helpers.tiny_pretrain_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  trainers = {}
  for scan in (True, False):
    with config.ignore_type():  # the recipe's "auto"
      config.model.scan_layers = scan
    trainers[scan] = steps.from_config(config, mesh, _helpers.STEPS_PER_EPOCH)
  scanned, unrolled = trainers[True], trainers[False]
  assert scanned.stacks == {"blocks_a": 2, "blocks_v": 2} and unrolled.stacks == {}
  assert scanned.abstract_state.params["blocks_a"]["attn"]["qkv"]["kernel"].shape[0] == 2
  batch = lambda step: scanned.global_batch(_helpers.random_pretrain_batch(step))
  leaves_equal = lambda a, b: all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))
  with jax.set_mesh(mesh):
    state, want = unrolled.init(), []
    for step in (1, 2, 3):
      state, metrics = unrolled.train_step(state, batch(step), {})
      want.append(metrics)
    state, metrics = scanned.train_step(scanned.init(), batch(1), {})
    got = [metrics]
    checkpoints = train_state.manager(str(tmp_path), config)
    train_state.save(checkpoints, 1, scanned.to_checkpoint(state), {"step": 1}, force=True)
    checkpoints.wait_until_finished()
    restored, _ = train_state.restore_latest(checkpoints, unrolled.checkpoint_abstract_state,
                                             unrolled.checkpoint_shardings)
    assert jax.tree.structure(restored) == jax.tree.structure(unrolled.abstract_state)
    assert leaves_equal(restored.params, scanned.native_params(state.params))
    state = scanned.from_checkpoint(restored)
    assert leaves_equal(state, scanned.from_checkpoint(scanned.to_checkpoint(state)))
    for step in (2, 3):
      state, metrics = scanned.train_step(state, batch(step), {})
      got.append(metrics)
  assert float(want[0]["loss"]) != float(want[2]["loss"])
  for step, (g, w) in enumerate(zip(got, want), 1):
    for key in ("loss", "loss_mae_a", "loss_mae_v", "nce", "grad_norm"):
      assert abs(float(g[key]) - float(w[key])) <= 1e-6 * max(1.0, abs(float(w[key]))), (
          step, key, float(g[key]), float(w[key]))
