"""Ahead-of-time compile of the real train step for a TPU topology, on a machine without TPUs.

libtpu is kept out of the main environment (with it installed, every JAX process probes for
a TPU and takes libtpu's process-wide lock), so this runs `bench aot` under the Python named
by AVMAE_TPU_PYTHON, an environment with `pip install -e '.[tpu]'`; .ci/run makes one. It
also runs under the current Python where libtpu happens to be installed, and is skipped
otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tests import _helpers

ROOT = _helpers.ROOT


def _tpu_python():
  explicit = os.environ.get("AVMAE_TPU_PYTHON")
  if explicit:
    return explicit
  return sys.executable if importlib.util.find_spec("libtpu") else None


@pytest.mark.slow
def test_demo_train_step_compiles_for_v5e_2x2_with_data_and_fsdp():
  python = _tpu_python()
  if python is None:
    pytest.skip("needs libtpu: set AVMAE_TPU_PYTHON to a Python with avmae_jax[tpu] "
                "installed (.ci/run does)")
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("JAX_PLATFORMS", None)
  out = subprocess.run(
      [python, "-m", "avmae_jax.bench", "aot", "--config", "configs/demo.py",
       "--topology", "v5e:2x2", "--batch_size", "8", "--mesh", "data=2,fsdp=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["topology"] == "v5e:2x2" and result["devices"] == 4
  assert result["device_kind"].startswith("TPU")
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  # Parameters + optimizer state are split over fsdp, so a chip holds less than all of it.
  full_state_bytes = 3 * 4 * result["params"]
  assert 0 < result["per_device_bytes"]
  assert result["argument"] < full_state_bytes, result
