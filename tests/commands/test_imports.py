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


@pytest.mark.parametrize("module,allowed", [
    ("avmae_jax", set()),
    ("avmae_jax.models", set()),
    ("avmae_jax.models.cav_mae", set()),
    ("avmae_jax.models.mavil", set()),
    ("avmae_jax.tasks", set()),
    ("avmae_jax.evaluators", set()),
    ("avmae_jax.evaluators.metrics", set()),
    ("avmae_jax.checkpoints.model_dir", set()),
    ("avmae_jax.checkpoints.interop", set()),
    ("avmae_jax.checkpoints.train_state", set()),
    ("avmae_jax.parallel.mesh", set()),
    ("avmae_jax.training.steps", set()),
    ("avmae_jax.evaluate", set()),
    ("avmae_jax.inpaint", set()),
    ("avmae_jax.extract", set()),
    ("avmae_jax.api", set()),
    ("avmae_jax.export", set()),
    ("avmae_jax.bench", set()),
    ("avmae_jax.train", set()),
    ("avmae_jax.data.config", set()),
])
@pytest.mark.slow
def test_import_does_not_pull_heavy_frameworks(module, allowed):
  out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  loaded = set(filter(None, out.stdout.strip().split(",")))
  assert loaded <= allowed, f"{module} imports {loaded - allowed}"


@pytest.mark.slow
def test_loading_a_training_config_does_not_import_tensorflow():
  probe = PROBE.format(module="avmae_jax.config_args").replace(
      "heavy =", "avmae_jax.config_args.load_config('configs/cav_mae_pretrain.py')\nheavy =")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120, cwd=__file__.rsplit("/tests/", 1)[0])
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == ""
