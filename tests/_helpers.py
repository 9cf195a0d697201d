"""Helpers shared by several test modules (imported as `from tests import _helpers`).

Paths are absolute, so that the suite runs from any working directory.
"""

import os
import pathlib

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# Real clips and reference files, beside the repository in CI (../shared); tests that need
# them skip without them, saying so.
SAMPLES = pathlib.Path(ROOT).parent / "shared" / "data" / "official_samples"


def config_path(spec: str) -> str:
  """configs/FILE.py[:args] as an absolute path."""
  return os.path.join(ROOT, "configs", spec)

# The demo's dataset as the command tests use it: 32 training and 8 held-out clips (the
# session's `synthetic_data_dir` fixture prepares it once), held out in batches of 8.
DEMO_DATA = {"synthetic.num_train": 32, "synthetic.num_test": 8, "eval_data.batch_size": 8}
DEMO_DATA_FLAGS = tuple(f"--config.{field}={value}" for field, value in DEMO_DATA.items())


def use_demo_data(config):
  """`config` (configs/demo.py or demo_finetune.py) set to DEMO_DATA, as the flags do."""
  for field, value in DEMO_DATA.items():
    section, name = field.split(".")
    config[section][name] = value
  return config


def demo_train_cmd(workdir: str, data_dir: str, steps: int) -> list:
  """`python -m avmae_jax.train` on configs/demo.py: batch 8, every step logged, no
  checkpoint before the last step, a retrieval evaluation at the last step."""
  import sys  # pylint: disable=import-outside-toplevel
  return [sys.executable, "-m", "avmae_jax.train",
          "--config", config_path(f"demo.py:data_dir={data_dir},steps={steps}"),
          "--workdir", workdir, "--config.batch_size=8", "--config.log_every=1",
          "--config.checkpoint_every=1000", "--config.data.shuffle_buffer=32",
          *DEMO_DATA_FLAGS]


# A tiny CAV-MAE pretraining run: small inputs (audio 256 x 128, frames 64 x 64), batch 2.
AUDIO_LENGTH, IMG_SIZE = 256, 64


def tiny_pretrain_config(total_steps=3):
  """configs/cav_mae_pretrain.py at size tiny on small inputs, batch 2, every step logged,
  a checkpoint every 2 steps, no evaluation, no TensorBoard, synchronous checkpoints.

  Tests that train or build a trainer with it compile the same programs, which the
  session's compilation cache (conftest.py) then compiles once.
  """
  from avmae_jax import config_args  # pylint: disable=import-outside-toplevel
  config = config_args.load_config(config_path("cav_mae_pretrain.py:size=tiny"))
  config.batch_size, config.total_steps = 2, total_steps
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 0
  config.model.audio_length, config.model.img_size = AUDIO_LENGTH, IMG_SIZE
  config.tensorboard = False
  config.async_checkpointing = False
  return config


def random_pretrain_batch(step):
  """Random inputs for `tiny_pretrain_config`, seeded by the step."""
  rng = np.random.default_rng(step)
  return {"audio": rng.standard_normal((2, AUDIO_LENGTH, 128)).astype(np.float32),
          "frames": rng.standard_normal((2, IMG_SIZE, IMG_SIZE, 3)).astype(np.float32)}


STEPS_PER_EPOCH = 100  # StandInBatches' default


class StandInBatches:
  """A stand-in training input iterator: `make(step)` gives the batch of step 1, 2, ...

  It carries the pipeline iterator's interface that `train.train` uses: `__next__`,
  `get_state` / `set_state` (saved with each checkpoint) and `steps_per_epoch`.
  """

  def __init__(self, make, steps_per_epoch=STEPS_PER_EPOCH):
    self.make, self.steps_per_epoch, self.step = make, steps_per_epoch, 0

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]

  def __next__(self):
    self.step += 1
    return self.make(self.step)


# -- Flax against the PyTorch port -------------------------------------------------------------


def rel_err(out, ref):
  """Relative L2 error of `out` against `ref`, in float64."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def perturbed_state_dict(module, seed):
  """Adds N(0, 0.02^2) noise to every parameter of the torch `module`, in place (so that no
  norm or bias is trivially 1 or 0); returns its state dict as numpy arrays."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def mavil_stage2_forward(teacher, teacher_params, student, student_params, audio, frames,
                         noise_a, noise_v):
  """One jitted MAViL stage-2 forward: the teacher's targets of (audio, frames) and the
  student's outputs under the given masking noise -> (targets, outputs)."""
  from avmae_jax.models import mavil  # pylint: disable=import-outside-toplevel

  @jax.jit
  def run(sp, tp):
    targets = mavil.compute_teacher_targets(teacher, tp, audio, frames)
    return targets, student.apply({"params": sp}, audio, frames, noise_a, noise_v,
                                  teacher_targets=targets)

  return run(student_params, teacher_params)
