"""The task interface: what a training run optimises and how it is scored.

A task is built from a training config and the model (`tasks.for_config`). It gives the
generic step builder (training/steps.py) one loss function with one narrow signature,

    loss(params, batch, rng, aux) -> (loss, metrics)

(`batch`: the global batch's arrays, `rng` this step's key, `aux`: inputs the steps take
that are not trained, such as a frozen teacher's parameters; {} for most tasks), and the
training script its evaluation and end of run. Everything a task needs to know about the
model it asks the model's interface (models/common.py).
"""

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import ml_collections
import numpy as np

from avmae_jax.models.common import AVModel

# evaluate(params, batches, aux) -> (record for metrics.jsonl, extras such as per-class AP)
Evaluator = Callable[[Any, Iterable[Mapping[str, np.ndarray]], Any], tuple[dict, dict]]


class Task:
  """The base task: no frozen inputs, nothing to do at the end of a run."""

  def __init__(self, config: ml_collections.ConfigDict, module: AVModel):
    self.config, self.module = config, module

  # -- What the steps compute ---------------------------------------------------------------

  @property
  def train_keys(self) -> tuple[str, ...]:
    """The batch entries the train step takes."""
    return ("audio", "frames")

  def loss(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, aux: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError

  # -- Inputs that are not trained (`aux`) ---------------------------------------------------

  def boxed_aux(self) -> Any:
    """Shapes of `aux` with logical axis names (nn.Partitioned leaves), for shardings."""
    return {}

  def load_aux(self, shardings: Any, workdir: Optional[str] = None) -> Any:
    """`aux` placed on `shardings`, once at the start of a run (in `workdir`: what the run
    must keep using across resumes is recorded there)."""
    del shardings, workdir
    return {}

  def random_aux(self, shardings: Any, seed: int = 1) -> Any:
    """Random `aux` (benchmarks: a step's cost does not depend on its values)."""
    del shardings, seed
    return {}

  # -- Scoring ---------------------------------------------------------------------------

  def evaluator(self, mesh: jax.sharding.Mesh, param_shardings: Any,
                aux_shardings: Any) -> Evaluator:
    raise NotImplementedError

  @property
  def final_eval_all_frames(self) -> bool:
    """Whether the final evaluation reads all the frames of each clip."""
    return False

  def finish(self, trainer, state, workdir: str, final_batches, writer) -> dict:
    """The end of a run (after the last step); returns the results to report, if any."""
    del trainer, state, workdir, final_batches, writer
    return {}

  def summary(self, results: Mapping[str, Any]) -> Optional[str]:
    """The line the training command prints last, from the last results."""
    del results
    return None
