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
    ("avmae_jax.models.cav_mae", set()),
    ("avmae_jax.api", set()),
    ("avmae_jax.interop", set()),
    ("avmae_jax.export", set()),
    ("avmae_jax.bench", set()),
])
def test_import_does_not_pull_heavy_frameworks(module, allowed):
  out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  loaded = set(filter(None, out.stdout.strip().split(",")))
  assert loaded <= allowed, f"{module} imports {loaded - allowed}"
