"""The part the evaluate, extract and inpaint commands share: the model flags and main().

  def _define_flags():
    cli.define_model_flags("configs/FILE.py[:args]; ...", "Model directory, ...")
    ...                                   # the command's own flags

  def main(argv):
    with cli.command(argv, MyError, evaluate.EvaluationError) as f:
      result = run(f.config, f.checkpoint, ..., f.step)
    print(result)

Importing this module defines no flags. The flags `define_model_flags` defines belong to
the command that calls it (this module disclaims them, as ml_collections' config_flags
does), so `--help` lists them with the command's own.
"""

import contextlib
import sys
from typing import Iterator, Optional

from absl import app
from absl import flags
from absl import logging

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
