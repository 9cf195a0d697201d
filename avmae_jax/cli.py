"""What the evaluate, extract and inpaint commands share: the model flags, opening the model
and the data, the mesh to evaluate on, and main()'s error exit.

  def _define_flags():
    cli.define_model_flags("configs/FILE.py[:args]; ...", "Model directory, ...")
    ...                                   # the command's own flags

  def main(argv):
    with cli.command(argv, MyError, evaluators.common.EvaluationError) as f:
      result = run(f.config, f.checkpoint, ..., f.step)
    print(result)

Importing this module defines no flags. The flags `define_model_flags` defines belong to
the command that calls it (this module disclaims them, as ml_collections' config_flags
does), so `--help` lists them with the command's own.
"""

import contextlib
import os
import sys
from typing import Iterator, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from avmae_jax import api
from avmae_jax.checkpoints import model_dir
from avmae_jax.evaluators.common import EvaluationError
from avmae_jax.parallel import mesh as mesh_lib

flags.disclaim_key_flags()

# What every command reports as `error: ...` with exit status 1, besides its own errors.
COMMAND_ERRORS = (ValueError, FileNotFoundError)


def define_model_flags(config_help: str, checkpoint_help: str,
                       checkpoint_default: Optional[str] = None) -> None:
  """--config (a config file, unlocked), --checkpoint and --step."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=False)
  flags.DEFINE_string("checkpoint", checkpoint_default, checkpoint_help)
  flags.DEFINE_integer("step", None, "A training checkpoint step instead of the latest.")


@contextlib.contextmanager
def command(argv: list[str], *errors: type[Exception]) -> Iterator[flags.FlagValues]:
  """main()'s preamble and error exit, around the command's work; yields the flags.

  Refuses positional arguments; absl logs warnings and up unless --verbosity is given.
  `errors` (and ValueError, FileNotFoundError) raised in the block print `error: ...` to
  stderr and exit with status 1, without a traceback; anything else propagates.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    yield flags.FLAGS
  except (*errors, *COMMAND_ERRORS) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def load_model(path: str, step: Optional[int] = None) -> tuple[api.LoadedModel, str]:
  """Opens a model directory, training workdir (latest or `step`) or reference `.pth`.

  Returns the model and a one-line description of where it came from.
  """
  if not path:
    raise EvaluationError("no checkpoint given")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise EvaluationError(f"checkpoint {path} does not exist")
  if os.path.isdir(path) and not model_dir.is_model_dir(path):
    raise EvaluationError(
        f"{path} is not a model checkpoint: expected {model_dir.MODEL_JSON} with "
        f"{model_dir.PARAMS_DIR}/ (an exported model) or {model_dir.TRAIN_CHECKPOINT_DIR}/ "
        "(a training workdir)")
  model = api.load(path, step=step)  # names a missing step or an unfinished workdir
  where = path
  if os.path.isdir(path) and not os.path.isdir(os.path.join(path, model_dir.PARAMS_DIR)):
    where += f" (step {model_dir.train_steps(path)[-1] if step is None else step})"
  return model, f"{model.kind} from {where}"


def input_iterator(config: ml_collections.ConfigDict, section: str = "eval_data"):
  """The pipeline iterator of `config[section]`, preparing the synthetic dataset if the
  config asks for it (as training does). Imports TensorFlow."""
  from avmae_jax.data import builders  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  if section not in config:
    raise EvaluationError(f"the config has no {section} section")
  builders.prepare_for_config(config)
  return pipeline.create_iterator(config[section])


def evaluation_mesh(config: Optional[ml_collections.ConfigDict]) -> jax.sharding.Mesh:
  """The config's mesh (as training uses it), else every device on the data axis."""
  shape = config.get("mesh") if config is not None else None
  return mesh_lib.make_mesh(shape or {"data": -1})
