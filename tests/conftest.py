"""Session-wide test setup: a JAX compilation cache, sleeping OpenMP threads, shared runs.

Most of the suite's time is XLA compiling small models. Tests that compile the same program
again (the same tiny train step in several tests, a command run two or three times in
subprocesses) load it from a persistent compilation cache instead. The cache is a fresh
temporary directory, removed when the session ends, so a session never sees another's
executables (results are the same either way; only the time differs).
JAX_COMPILATION_CACHE_DIR, exported here, also reaches the commands the tests run as
subprocesses; one set before the session is used as it is and kept.

Fixtures: `tiny_pretrain_workdir` (a tiny training run that several modules read) and
`synthetic_data_dir` (the synthetic datasets of the command tests, each built once).
"""

import os
import shutil
import tempfile

import pytest

# OpenMP threads (PyTorch's) that wait by sleeping, not spinning: on a machine whose cores
# are busy, spinning threads keep the one doing the work off a core, and the PyTorch
# references run up to ten times slower. Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="avmae_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Read from the environment when jax is first imported; set here too in case it already was.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_pretrain_workdir(tmp_path_factory):
  """A training workdir of `_helpers.tiny_pretrain_config()`: 3 steps of random inputs,
  checkpoints at steps 2 and 3. Shared: tests only read it."""
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  from tests import _helpers  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("tiny_pretrain") / "workdir")
  train.train(_helpers.tiny_pretrain_config(), path,
              train_iter=_helpers.StandInBatches(_helpers.random_pretrain_batch))
  return path


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the tests that run commands on the synthetic dataset: each
  dataset (named by its settings) is built by the first test that asks for it."""
  return str(tmp_path_factory.mktemp("tfds"))
