"""Layering: the model, interop and export import without TensorFlow (and mostly without torch)."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import {module}
heavy = sorted(m for m in ("tensorflow", "torch", "tensorflow_datasets") if m in sys.modules)
print(",".join(heavy))
"""
# Every module checked in one process, one after the other: the first that pulls a heavy
# framework in is named. train and export each define the absl flag --config, so export has
# a process of its own.
SEQUENCE = """
import importlib, sys
for module in sys.argv[1:]:
  importlib.import_module(module)
  heavy = sorted(m for m in ("tensorflow", "torch", "tensorflow_datasets", "matplotlib")
                 if m in sys.modules)
  if heavy:
    print(module, "imports", ",".join(heavy))
    break
"""
LIGHT_MODULES = [
    "avmae_jax", "avmae_jax.models", "avmae_jax.models.cav_mae", "avmae_jax.models.mavil",
    "avmae_jax.models.mavil_ft", "avmae_jax.tasks", "avmae_jax.evaluators",
    "avmae_jax.evaluators.metrics", "avmae_jax.checkpoints.model_dir",
    "avmae_jax.checkpoints.interop", "avmae_jax.checkpoints.train_state",
    "avmae_jax.parallel.mesh", "avmae_jax.training.steps", "avmae_jax.evaluate",
    "avmae_jax.inpaint", "avmae_jax.extract", "avmae_jax.api", "avmae_jax.bench",
    "avmae_jax.train", "avmae_jax.data.config", "avmae_jax.embed", "avmae_jax.retrieve",
    "avmae_jax.gallery", "avmae_jax.report", "avmae_jax.plots", "avmae_jax.evaluators.search",
]


@pytest.mark.slow
@pytest.mark.parametrize("modules", [LIGHT_MODULES, ["avmae_jax.export"]])
def test_import_does_not_pull_heavy_frameworks(modules):
  out = subprocess.run([sys.executable, "-c", SEQUENCE, *modules], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == ""


@pytest.mark.slow
def test_the_import_probe_names_a_module_that_imports_a_heavy_framework():
  out = subprocess.run([sys.executable, "-c", SEQUENCE, "avmae_jax", "avmae_jax.torch_port"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "avmae_jax.torch_port imports torch"


@pytest.mark.slow
def test_loading_a_training_config_does_not_import_tensorflow():
  probe = PROBE.format(module="avmae_jax.config_args").replace(
      "heavy =", "avmae_jax.config_args.load_config('configs/cav_mae_pretrain.py')\nheavy =")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120, cwd=__file__.rsplit("/tests/", 1)[0])
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == ""
