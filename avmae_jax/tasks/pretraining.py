"""Pretraining: the model's own losses (CAV-MAE; MAViL stage 1), scored by retrieval.

The loss is what the model's `__call__` returns under masking noise from the step's rng;
the metrics logged are the model's `metric_names`. The held-out evaluation is one pass of
`evaluators.retrieval.Retrieval` that also reports the same losses under fixed masks
(eval_<name>, averaged over full batches).
"""

from typing import Any, Mapping, Optional

import jax

from avmae_jax.evaluators import metrics
from avmae_jax.evaluators import retrieval
from avmae_jax.tasks import base


class Pretraining(base.Task):
  """The model's own losses; retrieval figures as its evaluation."""

  def model_inputs(self, batch: Mapping[str, jax.Array], aux: Any) -> dict[str, Any]:
    """Keyword inputs of the model's `__call__` besides audio and frames (none here)."""
    del batch, aux
    return {}

  def loss(self, params, batch, rng, aux):
    out = self.module.apply({"params": params}, batch["audio"], batch["frames"],
                            **self.model_inputs(batch, aux), rngs={"masking": rng})
    return out["loss"], {k: out[k] for k in self.module.metric_names}

  def evaluator(self, mesh, param_shardings, aux_shardings) -> base.Evaluator:
    scores = retrieval.Retrieval(
        self.module, mesh, param_shardings, aux_shardings,
        scalars=lambda params, batch, key, aux: self.loss(params, batch, key, aux)[1],
        key=jax.random.fold_in(jax.random.key(self.config.seed), 3))
    return lambda params, batches, aux: (scores.run(params, batches, aux), {})

  def summary(self, results: Mapping[str, Any]) -> Optional[str]:
    if "a2v_r1" not in results:
      return None
    chance = metrics.chance_recall(results["num_clips"], 1)
    return (f"retrieval on {results['num_clips']} held-out clips: audio->video R@1 "
            f"{results['a2v_r1']:.1f}%, video->audio R@1 {results['v2a_r1']:.1f}% "
            f"(chance {chance:.1f}%)")
