"""Every config builds its model (shape-checked only), params carry logical axes, bench runs."""

import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from avmae_jax import api
from avmae_jax import config_args
from avmae_jax import models
from avmae_jax.training import optim
from avmae_jax.data import config as data_config
from avmae_jax.models import flops
from tests import _helpers

ROOT = _helpers.ROOT
# Each config file with the argument variants it documents.
VARIANTS = {
    "cav_mae_pretrain.py": ["size=base", "size=tiny", "recipe=scale++",
                            "data=vggsound,recipe=vggsound", "size=tiny,data=synthetic"],
    "cav_mae_finetune.py": ["size=base", "size=tiny,num_classes=309,mode=audioonly",
                            "recipe=as2m,mode=videoonly", "recipe=vggsound,probe=true",
                            "size=tiny,data=synthetic,init_from=/tmp/pretrained"],
    "demo.py": ["", "steps=10"],
    "demo_finetune.py": ["", "init_from=/tmp/avmae_demo,mode=audioonly,steps=32",
                         "mode=videoonly,probe=true", "steps=8"],
    "mavil_pretrain.py": ["size=base", "size=base,stage=2,teacher=/tmp/r0",
                          "size=base,data=vggsound", "size=tiny,data=synthetic",
                          "size=tiny,data=synthetic,stage=2,steps=20"],
    "mavil_finetune.py": ["recipe=as20k", "recipe=as2m,mode=audioonly",
                          "recipe=vggsound,probe=true", "size=tiny,data=synthetic",
                          "size=tiny,data=synthetic,mode=videoonly,probe=true"],
}


def test_every_config_file_is_covered():
  files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert files - {"__init__.py"} <= set(VARIANTS), "add new configs to VARIANTS"


@pytest.mark.parametrize("name,arg", [
    # the base-size variants (most of them) build the paper's model: slow
    pytest.param(n, a, marks=() if "size=tiny" in a or n.startswith("demo") else
                 pytest.mark.slow) for n, args in VARIANTS.items() for a in args])
def test_config_builds_model(name, arg):
  config = config_args.load_config(os.path.join(ROOT, "configs", name) + ":" + arg)
  module = models.build(config.model)
  shapes = api.abstract_params(module)
  if "data" in config:  # training configs: the data and optimizer sections are valid too
    data_config.validate_config(config.data)
    data_config.validate_config(config.eval_data)
    optim.make_optimizer(config, shapes, steps_per_epoch=100,
                         global_batch_size=config.batch_size,
                         lr_layers=module.lr_layers())
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  assert n_params > 0
  if "size=base" in arg and config.model.kind == "cav_mae":
    assert n_params == 191_036_160
  if "size=base" in arg and config.model.kind == "cav_mae_ft":
    assert config.model.num_classes == 527 and n_params == 164_907_023
  assert models.build(models.model_config(module)) == module  # config round trip


def test_bad_config_arguments_name_the_field():
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_pretrain.py:sise=base"))
  with pytest.raises(ValueError, match="model size"):
    config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_pretrain.py:size=huge"))
  with pytest.raises(ValueError, match="mode must be one of"):
    config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_finetune.py:mode=both"))
  with pytest.raises(ValueError, match="recipe must be one of"):
    config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_finetune.py:recipe=as3m"))


def test_mavil_pretraining_config_follows_the_spec():
  config = config_args.load_config(os.path.join(ROOT, "configs", "mavil_pretrain.py:size=base"))
  o, m, d = config.optimizer, config.model, config.data
  assert (o.name, o.b1, o.b2, o.weight_decay, o.lr_scale_by_batch, o.min_lr) == (
      "adamw_cosine", 0.9, 0.95, 0.05, True, 0.0)
  assert (m.kind, m.stage, m.mask_ratio_a, m.mask_ratio_v, m.contrast_temperature,
          m.inter_contrast_weight, m.intra_contrast_weight, m.norm_pix_loss) == (
              "mavil", 1, 0.8, 0.9, 0.1, 0.01, 0.01, True)
  assert (d.mode, d.num_frames, d.mavil_fps, d.norm_std_factor) == ("mavil", 8, 2.0, 2.0)
  assert (m.num_frames, m.img_size, m.audio_length) == (8, 224, 1024)
  # lr = base_lr * batch / 256 at the end of the warmup
  shapes = api.abstract_params(models.build(m))
  _, schedule = optim.make_optimizer(config, shapes, steps_per_epoch=100,
                                     global_batch_size=config.batch_size)
  warmup = int(o.warmup_epochs * 100)
  assert float(schedule(warmup)) == pytest.approx(o.lr * config.batch_size / 256)
  stage2 = config_args.load_config(os.path.join(ROOT, "configs",
                                                "mavil_pretrain.py:size=base,stage=2,teacher=R1"))
  assert stage2.model.stage == 2 and stage2.teacher == "R1"
  with pytest.raises(ValueError, match="stage must be one of"):
    config_args.load_config(os.path.join(ROOT, "configs", "mavil_pretrain.py:stage=3"))
  with pytest.raises(ValueError, match="add stage=2"):
    config_args.load_config(os.path.join(ROOT, "configs", "mavil_pretrain.py:teacher=R0"))


def test_mavil_finetuning_config_follows_the_spec():
  """The authors' fine-tuning defaults: weight decay 0.05, drop_path 0.1, layer decay 0.75
  (no stochastic depth when linear probing)."""
  path = os.path.join(ROOT, "configs", "mavil_finetune.py")
  config = config_args.load_config(path + ":recipe=as20k")
  assert (config.optimizer.weight_decay, config.model.drop_path_rate,
          config.optimizer.layer_decay) == (0.05, 0.1, 0.75)
  probe = config_args.load_config(path + ":recipe=vggsound,probe=true")
  assert probe.model.drop_path_rate == 0.0 and probe.optimizer.frozen


# (loss, batch, lr, head multiplier, lr halving start, epochs, WA epochs, balanced sampling)
# from the reference's egs/audioset/run_cavmae_ft_{bal,full}.sh and egs/vggsound/run_cavmae_ft.sh.
@pytest.mark.parametrize("arg,want", [
    ("recipe=as20k", ("bce", 36, 5e-5, 100, 5, 15, (3, 15), False)),
    ("recipe=as2m", ("bce", 48, 1e-5, 50, 2, 10, (1, 10), True)),
    ("recipe=vggsound", ("ce", 48, 1e-4, 10, 2, 10, (3, 10), True)),
])
def test_finetune_recipes_follow_the_reference_scripts(arg, want):
  config = config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_finetune.py:" + arg))
  o = config.optimizer
  assert (config.loss, config.batch_size, o.lr, o.head_lr_mult, o.lr_step_start,
          config.num_epochs, (config.wa_start, config.wa_end),
          config.data.balanced_sampling) == want
  assert (o.name, o.lr_step_every, o.lr_decay, o.b1, o.b2, o.weight_decay) == (
      "adam_step", 1, 0.5, 0.95, 0.999, 5e-7)
  assert (config.data.mixup, config.data.label_smooth, config.data.freqm, config.data.timem,
          config.data.noise) == (0.5, 0.1, 48, 192, True)
  assert config.optimizer.frozen == [] and config.final_eval_all_frames


def test_linear_probe_config_freezes_all_but_the_head():
  config = config_args.load_config(os.path.join(ROOT, "configs", "cav_mae_finetune.py:"
                                                "size=tiny,probe=true"))
  shapes = api.abstract_params(models.build(config.model))
  mask = optim.frozen_mask(config.optimizer.frozen, shapes)
  for path, frozen in jax.tree_util.tree_leaves_with_path(mask):
    assert frozen != optim.param_path(path).startswith("mlp_head_"), optim.param_path(path)


@pytest.mark.parametrize("kind", ["cav_mae", "cav_mae_ft"])
def test_every_parameter_has_logical_axes(kind):
  module = models.build(dict(kind=kind, **models.size_fields("tiny", kind)))
  audio, frames = api.example_inputs(module)
  boxed = jax.eval_shape(lambda a, v: module.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v), audio, frames)
  specs = nn.get_partition_spec(boxed["params"])
  for path, value in jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(value, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no axes"
    assert len(value.names) == value.value.ndim, jax.tree_util.keystr(path)
  assert jax.tree.leaves(specs)


@pytest.mark.parametrize("config,tolerance", [
    ("configs/cav_mae_pretrain.py:size=tiny", 0.02),
    ("configs/cav_mae_finetune.py:size=tiny,num_classes=10", 0.02),
])
@pytest.mark.slow
def test_bench_model_prints_json_and_flops_agree_with_xla(config, tolerance):
  result = subprocess.run(
      [sys.executable, "-m", "avmae_jax.bench", "model", "--config", config,
       "--batch_size", "2", "--steps", "1"], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["step_ms"] > 0 and report["backend"] == "cpu"
  # XLA also counts elementwise work, so it is a little above the matmul-only formula.
  assert 0 <= report["xla_flops_per_sample"] / report["flops_per_sample"] - 1 < tolerance


def test_flops_formula_on_a_single_block():
  # One block, independent arithmetic: qkv + proj + mlp matmuls, then scores and AV.
  n, d = 10, 16
  want = 2 * n * d * 3 * d + 2 * n * d * d + 2 * (2 * n * d * 4 * d) + 2 * (2 * n * n * d)
  assert flops.block_flops(n, d, 4.0) == want


@pytest.mark.slow
def test_bench_device_runs_at_tiny_size_on_cpu():
  """The accelerator check's command, on CPU at tiny size: CAV-MAE in bf16 at the largest
  batch that fits (MAViL runs the same code), the PyTorch port's step in bf16 and fp16
  (GradScaler)."""
  result = subprocess.run(
      [sys.executable, "-m", "avmae_jax.bench", "device", "--size", "tiny", "--batch_sizes",
       "2", "--steps", "1", "--models", "cav_mae"], cwd=ROOT, capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["bench"] == "device" and report["backend"] == "cpu"
  assert "mavil" not in report
  for name in ("cav_mae",):
    run = report[name]
    assert run["dtype"] == "bfloat16" and run["batch_size"] == 2 and run["scan_layers"]
    assert run["samples_per_s"] > 0 and run["compile_s"] > 0 and run["mfu"] is None
    assert run["out_of_memory_at"] == []
  for precision in ("bf16", "fp16"):
    torch_run = report[f"torch_cav_mae_{precision}"]
    assert torch_run["samples_per_s"] > 0 and np.isfinite(torch_run["loss"])
    assert report[f"speedup_vs_torch_{precision}"] == pytest.approx(
        report["cav_mae"]["samples_per_s"] / torch_run["samples_per_s"], rel=1e-2)
  assert "GradScaler" in report["torch_cav_mae_fp16"]["mode"]


def test_bench_device_takes_the_largest_batch_that_fits():
  from avmae_jax import bench  # pylint: disable=import-outside-toplevel
  tried = []

  def run(batch):
    tried.append(batch)
    if batch > 64:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return {"batch_size": batch}

  assert bench._largest_batch(run, [32, 256, 64, 128]) == ({"batch_size": 64}, [256, 128])
  assert tried == [256, 128, 64]

  def broken(batch):
    raise RuntimeError("INVALID_ARGUMENT: something else")
  with pytest.raises(RuntimeError, match="something else"):  # not a memory error: raised
    bench._largest_batch(broken, [8])


@pytest.mark.slow
def test_bench_embed_times_generated_clips(capsys):
  # Tiny: the demo's model (random parameters) on two short small clips.
  from avmae_jax import bench  # pylint: disable=import-outside-toplevel
  demo = os.path.join(ROOT, "configs", "demo.py")
  assert bench.main(["embed", "--config", demo, "--num_clips", "2",
                     "--seconds", "2", "--width", "160", "--height", "120",
                     "--batch_size", "2"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["bench"] == "embed" and report["num_clips"] == 2
  assert report["clips_per_s"] == pytest.approx(2 / report["total_s"], rel=0.1)
  assert 0 < report["decode_share"] < 1 and report["decode_s"] < report["total_s"]
  with pytest.raises(SystemExit):
    bench.main(["embed", "--config", demo, "--num_clips", "0"])
