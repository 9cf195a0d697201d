"""Audio<->video retrieval, the evaluator of pretraining runs and `evaluate --task retrieval`.

The reference protocol (cav-mae spec section 7): each clip's `forward_feat` tokens
mean-pooled per modality (MAViL: each modality's ViT outputs, no fusion), then
`metrics.retrieval_metrics`: R@1/5/10 and median rank, audio->video and video->audio, over
the real clips of one ordered pass. A task may add batch scalars to the same pass (its
held-out losses): they are averaged over the full batches (padding would bias batch
means) and reported as eval_<name>. They are computed by a function of their own, so the
features, and the figures, are those of `evaluate --task retrieval` exactly.
"""

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from avmae_jax.evaluators import common
from avmae_jax.evaluators import metrics
from avmae_jax.models.common import AVModel
from avmae_jax.parallel import mesh as mesh_lib

# fn(params, batch, key, aux) -> {name: batch scalar}
Scalars = Callable[[Any, Mapping[str, jax.Array], jax.Array, Any], Mapping[str, jax.Array]]


class Retrieval:
  """Retrieval figures of a model's parameters over one pass of evaluation batches.

  module: the model. mesh: where to run. param_shardings / aux_shardings: of the
  parameters and of the task's frozen inputs (default: the module's logical axes, no aux).
  scalars: a task's batch scalars computed in the same pass. key: folded with the batch
  index for `scalars` (their masking noise).
  """

  def __init__(self, module: AVModel, mesh: jax.sharding.Mesh, param_shardings: Any = None,
               aux_shardings: Any = None, scalars: Optional[Scalars] = None,
               key: Optional[jax.Array] = None, section: str = "eval_data"):
    self.module, self.section, self.key = module, section, key

    def pooled(params, batch, key, aux):
      del key, aux
      a, v = module.apply({"params": params}, batch["audio"], batch["frames"],
                          method=module.forward_feat)
      return {"audio_rep": a.mean(axis=1), "video_rep": v.mean(axis=1)}

    if param_shardings is None:
      self.fns = (common.MeshFunction.for_module(pooled, module, mesh),)
    else:
      self.fns = (common.MeshFunction(pooled, mesh, param_shardings),)
    if scalars is not None:
      self.fns += (common.MeshFunction(lambda *args: dict(scalars(*args)), mesh,
                                       self.fns[0].param_shardings, aux_shardings),)

  def _check(self, batch: Mapping[str, Any]) -> None:
    common.check_batch(self.module, batch, self.section)
    if np.ndim(batch["frames"]) != common.frames_ndim(self.module):
      raise common.EvaluationError(
          f"retrieval uses one frame per clip; got frames of shape {np.shape(batch['frames'])} "
          f"(set config.{self.section}.eval_all_frames=False)")

  def features(self, params: Any, batches: Iterable[Mapping[str, Any]], aux: Any = None
               ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(audio [N, D], video [N, D]) pooled vectors of the real clips, and the means of the
    scalars over the full batches."""
    audio, video, sums, full = [], [], {}, 0
    for out, keep in common.passes(self.fns, params, batches, ("audio", "frames"), self._check,
                                   self.key, aux):
      audio.append(out.pop("audio_rep")[keep])
      video.append(out.pop("video_rep")[keep])
      if keep.all():
        full += 1
        for name, value in out.items():
          sums[name] = sums.get(name, 0.0) + float(value)
    return (np.concatenate(audio), np.concatenate(video),
            {name: total / max(full, 1) for name, total in sums.items()})

  def run(self, params: Any, batches: Iterable[Mapping[str, Any]], aux: Any = None
          ) -> dict[str, Any]:
    """eval_<scalar> means, then R@K (percent), median ranks and num_clips."""
    audio, video, scalars = self.features(params, batches, aux)
    results = {f"eval_{name}": value for name, value in scalars.items()}
    # Every host holds every clip's vectors, so each searches them on its own devices
    # (no collective across hosts); the figures are the same on all of them.
    local = mesh_lib.make_mesh({"data": -1}, jax.local_devices())
    results.update(metrics.retrieval_metrics(audio, video, mesh=local))
    return results
