"""What the evaluators share: one ordered pass of host batches through a function jitted on
the mesh, the padding left out, and clear errors for data that does not fit the model.

Batches are mappings of numpy arrays, each host's share of the global batch (a pipeline
iterator, or any iterable: tests pass lists). The last batch of an evaluation pass is
padded; its `mask` (1 real, 0 padding) says which rows count, and a batch without `mask`
is all real. Outputs come back replicated, so every host sees every host's rows, in host
order.
"""

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from avmae_jax.models import common as models_common
from avmae_jax.parallel import mesh as mesh_lib
from avmae_jax.parallel import rules


class EvaluationError(ValueError):
  """A request that cannot be evaluated (wrong model kind, missing checkpoint, bad inputs)."""


def valid_rows(batch: Mapping[str, Any]) -> np.ndarray:
  """Which rows are real clips (the pipeline pads the last evaluation batch, mask 0)."""
  n = np.shape(batch["audio"])[0]
  if "mask" not in batch:
    return np.ones(n, bool)
  return np.asarray(batch["mask"]) > 0


def frames_ndim(module: models_common.AVModel) -> int:
  """Dimensions of one batch of the frames the model takes: 4 ([b, H, W, 3]) or 5 (clips
  [b, N, H, W, 3])."""
  return len(module.input_shapes()[1].shape)


def check_batch(module: models_common.AVModel, batch: Mapping[str, Any], section: str) -> None:
  """Raises naming the config field when the data's shapes do not fit the model."""
  want_audio, want_frames = (s.shape[1:] for s in module.input_shapes())
  audio, frames = np.shape(batch["audio"]), np.shape(batch["frames"])
  if audio[1:] != want_audio:
    raise EvaluationError(
        f"the model takes audio [batch, {want_audio[0]}, {want_audio[1]}], the data gives "
        f"{audio}: set config.{section}.target_length={want_audio[0]}")
  height, width, channels = want_frames[-3:]
  if frames[-3:] != (height, width, channels):
    raise EvaluationError(
        f"the model takes frames of {height}x{width}x{channels}, the data gives {frames}: "
        f"check config.{section}.frame_size and frame_resize")
  if len(want_frames) == 4 and (len(frames) != 5 or frames[1] != want_frames[0]):
    n = want_frames[0]
    raise EvaluationError(
        f"the model takes clips of {n} frames [batch, {n}, H, W, 3], the data gives {frames}: "
        f"set config.{section}.mode='mavil' and num_frames={n}")


class MeshFunction:
  """`fn(params, batch, key, aux) -> dict of arrays` jitted on a mesh: parameters and aux
  (a task's frozen inputs; without `aux_shardings` the function takes none and gets {})
  on their shardings, the batch split over data x fsdp, the outputs (and the batch's
  global `mask`) replicated. Model code runs under the logical-axis rules and the mesh,
  as in training."""

  def __init__(self, fn: Callable[..., dict], mesh: jax.sharding.Mesh, param_shardings: Any,
               aux_shardings: Any = None):
    self.mesh, self.param_shardings = mesh, param_shardings
    self.takes_aux = aux_shardings is not None
    self.batch_sharding = mesh_lib.batch_sharding(mesh)
    replicated = mesh_lib.replicated(mesh)

    def run(params, batch, key, aux):
      with nn.logical_axis_rules(rules.RULES):
        out = fn(params, batch, key, aux)
      return dict(out, mask=batch["mask"])

    self._jitted = jax.jit(
        run, in_shardings=(param_shardings, self.batch_sharding, None,
                           {} if aux_shardings is None else aux_shardings),
        out_shardings=replicated)

  @classmethod
  def for_module(cls, fn: Callable[..., dict], module: models_common.AVModel,
                 mesh: jax.sharding.Mesh) -> "MeshFunction":
    """Parameter shardings from the module's logical axis names (no aux)."""
    boxed = models_common.boxed_abstract_params(module)
    return cls(fn, mesh, mesh_lib.logical_shardings(boxed, mesh))

  def place(self, params: Any) -> Any:
    """The parameters on their shardings (once per pass, not per batch)."""
    with jax.set_mesh(self.mesh):
      return jax.device_put(params, self.param_shardings)

  def __call__(self, params, host_batch: Mapping[str, np.ndarray], key, aux=None) -> dict:
    rows = len(next(iter(host_batch.values())))
    ways = int(np.prod([self.mesh.shape[a] for a in rules.BATCH_AXES])) // jax.process_count()
    if rows % ways:
      raise EvaluationError(
          f"an evaluation batch of {rows} clips per host does not split over the {ways} "
          f"devices of the mesh's data x fsdp axes: make config.eval_data.batch_size a "
          f"multiple of {ways * jax.process_count()}")
    with jax.set_mesh(self.mesh):
      batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
               for k, v in host_batch.items()}
      out = self._jitted(params, batch, key, aux if self.takes_aux and aux is not None else {})
      return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), out)


def passes(fns: Sequence[MeshFunction], params: Any, batches: Iterable[Mapping[str, Any]],
           keys: tuple[str, ...], check: Callable[[Mapping[str, Any]], None],
           key: Optional[jax.Array] = None, aux: Any = None
           ) -> Iterator[tuple[dict, np.ndarray]]:
  """(outputs of every function in `fns`, real-row mask) of each batch in order; `check`
  sees the first batch, `key` is folded with the batch index for each batch."""
  key = jax.random.key(0) if key is None else key
  empty = True
  params = fns[0].place(params)
  for index, batch in enumerate(batches):
    if index == 0:
      check(batch)
    missing = [k for k in keys if k not in batch]
    if missing:
      raise EvaluationError(f"the evaluation batches hold no {' or '.join(missing)}")
    inputs = {k: batch[k] for k in keys}
    inputs["mask"] = valid_rows(batch).astype(np.float32)
    out = {}
    for fn in fns:
      out.update(fn(params, inputs, jax.random.fold_in(key, index), aux))
    empty = False
    yield out, out.pop("mask") > 0
  if empty:
    raise EvaluationError("the evaluation data is empty")
