"""A training run's checkpoints: the train state and the input iterator's state, via orbax.

  WORKDIR/checkpoints/<step>/state/   orbax checkpoint of the train state
  WORKDIR/checkpoints/<step>/data/    the input iterator's state (JSON)

Saved asynchronously (the next steps run while it is written), the last
`config.keep_checkpoints` kept. `restore_latest` puts the state back onto whatever
shardings it is given, so a run resumes onto another mesh. checkpoints/model_dir.py reads
the parameters alone from the same layout.
"""

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from avmae_jax.checkpoints import model_dir


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3), create=True,
      enable_async_checkpointing=config.get("async_checkpointing", True))
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), model_dir.TRAIN_CHECKPOINT_DIR), options=options,
      item_names=model_dir.TRAIN_ITEM_NAMES)


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         force: bool = False) -> None:
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore_latest(checkpoints: ocp.CheckpointManager, abstract_state: Any,
                   shardings: Any) -> Optional[tuple[Any, Any]]:
  """(train state placed on `shardings`, input-iterator state) of the latest step, or None
  when the run has no checkpoint yet."""
  latest = checkpoints.latest_step()
  if latest is None:
    return None
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_state, shardings)
  restored = checkpoints.restore(latest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored.state, restored.data
