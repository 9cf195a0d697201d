"""Session-wide test setup: a JAX compilation cache, sleeping OpenMP threads, shared runs.

Most of the suite's time is XLA compiling small models. Tests that compile the same program
again (the same tiny train step in several tests, a command run two or three times in
subprocesses) load it from a persistent compilation cache instead. The cache is a fresh
temporary directory, removed when the session ends, so a session never sees another's
executables (results are the same either way; only the time differs).
Every program is cached, however fast it compiled (JAX's default keeps only those over a
second): the eager operations of the reference computations, compiled one by one, are most
of some modules' time, and the other worker and the subprocesses then load them instead.
JAX_COMPILATION_CACHE_DIR, exported here with that setting, also reaches the commands the
tests run as subprocesses; a cache directory set before the session is used as it is and
kept.

Fixtures: `tiny_pretrain_workdir` (a tiny training run that several modules read),
`synthetic_data_dir` (the demo's synthetic dataset at 32 + 8 clips, for the command tests)
and `demo_pretrain_workdir` (the train command's demo run on it, 8 steps).
Each is made once per session, also when pytest-xdist runs the tests in several worker
processes (pyproject.toml): the first worker to ask makes it, the others wait and share it.

Collection order: the files with the most slow tests first, so that the workers start the
long ones early and finish together.
"""

import fcntl
import os
import pathlib
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

os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Read from the environment when jax is first imported; set here too in case it already was.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  slow = {}
  for item in items:
    slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
  items.sort(key=lambda item: -slow[item.path])  # stable: the order within a file stays


def _made_once(request, tmp_path_factory, name, make) -> pathlib.Path:
  """A directory that `make(path)` fills once per session, shared by the xdist workers."""
  if not hasattr(request.config, "workerinput"):  # one process: nothing to share
    path = tmp_path_factory.mktemp(name)
    make(path)
    return path
  root = tmp_path_factory.getbasetemp().parent  # this run's, common to its workers
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      make(path)
      done.touch()
  return path


@pytest.fixture(scope="session")
def tiny_pretrain_workdir(request, tmp_path_factory):
  """A training workdir of `_helpers.tiny_pretrain_config()`: 3 steps of random inputs,
  checkpoints at steps 2 and 3. Shared: tests only read it."""
  from avmae_jax import train  # pylint: disable=import-outside-toplevel
  from tests import _helpers  # pylint: disable=import-outside-toplevel

  def make(path):
    train.train(_helpers.tiny_pretrain_config(), str(path / "workdir"),
                train_iter=_helpers.StandInBatches(_helpers.random_pretrain_batch))

  return str(_made_once(request, tmp_path_factory, "tiny_pretrain", make) / "workdir")


@pytest.fixture(scope="session")
def synthetic_data_dir(request, tmp_path_factory):
  """A TFDS data_dir holding the demo's synthetic dataset at 32 training and 8 held-out
  clips (the settings the command tests use: `--config.synthetic.num_train=32` ...)."""
  from avmae_jax import config_args  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  from tests import _helpers  # pylint: disable=import-outside-toplevel

  def make(path):
    config = config_args.load_config(_helpers.config_path(f"demo.py:data_dir={path}"))
    builders.prepare_for_config(_helpers.use_demo_data(config))

  return str(_made_once(request, tmp_path_factory, "tfds", make))


@pytest.fixture(scope="session")
def demo_pretrain_workdir(request, tmp_path_factory, synthetic_data_dir):
  """The workdir of `python -m avmae_jax.train` on the demo config, 8 steps on
  `synthetic_data_dir` (`_helpers.demo_train_cmd`), evaluated at its last step. Shared:
  tests only read it (the resume test compares against it, the evaluators' test scores
  its checkpoint)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  from tests import _helpers  # pylint: disable=import-outside-toplevel

  def make(path):
    out = subprocess.run(_helpers.demo_train_cmd(str(path / "workdir"), synthetic_data_dir, 8),
                         cwd=_helpers.ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

  return str(_made_once(request, tmp_path_factory, "demo_pretrain", make) / "workdir")
