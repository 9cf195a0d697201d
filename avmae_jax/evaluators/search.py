"""Nearest-neighbour search by cosine similarity that scales: `top_k` and `retrieval_metrics`.

The retrieval evaluation (cav-mae spec section 7) ranks every candidate for every query.
As one [Q, N] similarity matrix that is 80 GB in float64 at 100k clips. Here the queries
go `chunk` rows at a time (a Python loop, each chunk one call of one compiled program)
and, inside that program, the candidates go `chunk` rows at a time (a `lax.scan`): per
(query chunk, candidate block) one matmul, the block merged into the query chunk's
running top-k and, when the true match of each query is known, into its count of
candidates scoring strictly higher. Besides one float32 copy of the candidates on the
device, nothing larger than [chunk, chunk] exists.

Ties: a rank counts only strictly higher scores (as `metrics.ranks_of_true_pairs`), and
top-k lists equal scores in candidate order. For exact ties to stay exact, each query's
score with its true candidate comes from a matmul of the blocks' own shape (see
`_true_scores`), and query chunks are never longer than candidate blocks.

With a mesh, the candidates are split by rows over all of its devices (`jax.shard_map`):
each device searches its own rows, then the per-device top-k are merged and the counts
summed.

Vectors are l2-normalised (epsilon 1e-12, as `metrics.retrieval_metrics` always did) and
compared in float32 at full matmul precision (no TF32 on GPUs). TensorFlow- and torch-free.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-12
# Rows per block of the finiteness check: bounds its temporary boolean array.
_CHECK_ROWS = 65536


class TopK(NamedTuple):
  """indices [Q, k] int32 and scores [Q, k] float32 of each query's k best candidates,
  best first, equal scores in candidate order; ranks [Q] int64 (0-based: candidates
  scoring strictly higher than the true match; -1 where true_index is -1) or None."""
  indices: np.ndarray
  scores: np.ndarray
  ranks: Optional[np.ndarray]


def top_k(queries, candidates, k: int, *, true_index=None, chunk: int = 4096,
          mesh: Optional[jax.sharding.Mesh] = None) -> TopK:
  """The k candidates of highest cosine similarity to each query, and optionally the rank
  of each query's true match.

  queries [Q, D], candidates [N, D]: numpy or jax arrays of any real dtype (compared in
  float32). true_index: [Q] ints, the row of `candidates` that is each query's true match,
  -1 for none; its rank counts the candidates that score strictly higher (ties count in
  the query's favour), as `metrics.ranks_of_true_pairs` does on a full matrix.
  chunk: rows of queries and of candidates per block (memory ~ chunk^2 floats per block).
  mesh: split the candidates over all of its devices (default: one device).
  """
  queries = _checked(queries, "queries")
  candidates = _checked(candidates, "candidates")
  return _search(queries, candidates, k, true_index, chunk, mesh)


def retrieval_metrics(audio, video, ks: Sequence[int] = (1, 5, 10), chunk: int = 4096,
                      mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """R@K (percent) and median rank (1-based) in both directions from paired [N, D] audio and
  video vectors (clip i of one is the true match of clip i of the other): the figures of
  `metrics.retrieval_metrics`, without an N x N matrix."""
  if np.ndim(audio) != 2 or np.shape(audio) != np.shape(video):
    raise ValueError(f"need paired [N, D] audio and video vectors, got {np.shape(audio)} and "
                     f"{np.shape(video)}")
  audio, video = _checked(audio, "audio"), _checked(video, "video")
  n = audio.shape[0]
  pairs = np.arange(n)
  out = {"num_clips": int(n)}
  for name, queries, candidates in (("a2v", audio, video), ("v2a", video, audio)):
    out.update(figures(name, _search(queries, candidates, 1, pairs, chunk, mesh).ranks, ks))
  return out


def figures(name: str, ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
  """<name>_r<k> (percent of queries ranked below k) and <name>_median_rank (1-based) from
  0-based ranks of the true matches (r<k>, median_rank for an empty name)."""
  prefix = f"{name}_" if name else ""
  out = {f"{prefix}r{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
  out[f"{prefix}median_rank"] = float(np.median(ranks) + 1)
  return out


def _checked(x, name: str):
  """x as a [rows, D] numpy or jax array of a real dtype, rows and D > 0, all finite."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [rows, D] vectors, got shape {x.shape}")
  if 0 in x.shape:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  floating = jnp.issubdtype(x.dtype, jnp.floating)
  if not floating and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
  if floating:
    if isinstance(x, jax.Array):
      finite = bool(jnp.isfinite(x).all())
    else:  # in blocks: no boolean copy of the whole array
      finite = all(np.isfinite(x[i:i + _CHECK_ROWS]).all()
                   for i in range(0, x.shape[0], _CHECK_ROWS))
    if not finite:
      raise ValueError(f"{name} contain NaN or inf")
  return x


def _search(queries, candidates, k, true_index, chunk, mesh) -> TopK:
  q, d = queries.shape
  n = candidates.shape[0]
  if candidates.shape[1] != d:
    raise ValueError(f"queries and candidates differ in D: {queries.shape} vs "
                     f"{candidates.shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, N] = [1, {n}] (N: the candidates), got {k!r}")
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  k, chunk = int(k), int(chunk)
  if true_index is not None:
    true_index = np.asarray(true_index)
    if true_index.shape != (q,) or true_index.dtype.kind not in "iu":
      raise ValueError(f"true_index must be [Q] = [{q}] ints, got shape {true_index.shape} "
                       f"dtype {true_index.dtype}")
    if q and (true_index.min() < -1 or true_index.max() >= n):
      raise ValueError(f"true_index must lie in [-1, N) = [-1, {n}), got values in "
                       f"[{true_index.min()}, {true_index.max()}]")
    true_index = true_index.astype(np.int32)

  devices = 1 if mesh is None else mesh.size
  n_local = -(-n // devices)  # rows per device; the last device's tail is padding
  # Query chunks no longer than candidate blocks: see _true_scores.
  c_chunk = min(chunk, n_local)
  q_chunk = min(q, c_chunk)
  fn = _program(q_chunk, c_chunk, n_local, n, d, k, true_index is not None, mesh)
  cands, replicated = _place_candidates(candidates, n_local * devices, mesh)

  indices = np.empty((q, k), np.int32)
  scores = np.empty((q, k), np.float32)
  ranks = None if true_index is None else np.empty(q, np.int64)

  def collect(start, out):
    rows = min(q_chunk, q - start)
    scores[start:start + rows] = np.asarray(out[0])[:rows]
    indices[start:start + rows] = np.asarray(out[1])[:rows]
    if ranks is not None:
      ranks[start:start + rows] = np.asarray(out[2])[:rows]

  # Each chunk is queued before the previous one's results are copied out (dispatch is
  # asynchronous), so the device has work while the host copies; at most two chunks'
  # inputs and outputs exist at once.
  pending = None
  for start in range(0, q, q_chunk):
    block = _rows(queries, start, q_chunk)
    truth = np.full(q_chunk, -1, np.int32)
    if true_index is not None:
      part = true_index[start:start + q_chunk]
      truth[:len(part)] = part
    out = fn(jax.device_put(block, replicated), jax.device_put(truth, replicated), cands)
    if pending is not None:
      collect(*pending)
    pending = (start, out)
  collect(*pending)
  if ranks is not None:
    ranks[true_index < 0] = -1
  return TopK(indices, scores, ranks)


def _rows(x, start: int, rows: int):
  """x[start:start + rows] in float32, zero rows appended to make `rows` (static shapes)."""
  part = x[start:start + rows]
  if isinstance(x, jax.Array):
    part = part.astype(jnp.float32)
    return jnp.pad(part, ((0, rows - part.shape[0]), (0, 0))) if part.shape[0] < rows else part
  block = np.zeros((rows, x.shape[1]), np.float32)
  block[:part.shape[0]] = part
  return block


def _place_candidates(candidates, padded: int, mesh):
  """The candidates in float32 on the device (one copy), or split by rows over the mesh
  with zero rows appended to `padded`; and the sharding of the per-chunk inputs."""
  n, d = candidates.shape
  if mesh is None:
    device = jax.devices()[0]
    if isinstance(candidates, jax.Array):
      if len(candidates.devices()) == 1:  # where it is: the query chunks go there too
        device = next(iter(candidates.devices()))
      return jax.device_put(candidates.astype(jnp.float32), device), device
    # device_put copies once; jnp.asarray would stage a second copy on the way
    return jax.device_put(np.asarray(candidates, np.float32), device), device
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if isinstance(candidates, jax.Array):
    x = jnp.pad(candidates.astype(jnp.float32), ((0, padded - n), (0, 0)))
    return jax.device_put(x, sharding), replicated

  def shard(index):
    rows = index[0]
    start, stop = rows.start or 0, padded if rows.stop is None else rows.stop
    block = np.zeros((stop - start, d), np.float32)
    if start < n:
      block[:min(stop, n) - start] = candidates[start:min(stop, n)]
    return block

  return jax.make_array_from_callback((padded, d), sharding, shard), replicated


def _normalise(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), EPSILON)


def _dot(a, b):
  """a @ b.T in float32 at full precision."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)


def _local_search(queries, truth, cands, offset, true_scores, *, c_chunk, n, k, with_ranks):
  """Top-k and strictly-higher counts of normalised `queries` [cq, D] over the local
  candidate rows `cands` [n_local, D], whose first row is global row `offset`.

  The candidate blocks are rows [i * c, i * c + c), except that the last block starts at
  n_local - c instead of running past the end; its columns already seen, and the padding
  rows (global index >= n), are masked out. So n_local need not be a multiple of c and no
  padded copy of the candidates is made.
  """
  n_local = cands.shape[0]
  cq = queries.shape[0]
  steps = -(-n_local // c_chunk)
  columns = jnp.arange(c_chunk, dtype=jnp.int32)

  def step(carry, i):
    best_scores, best_indices, count = carry
    start = jnp.minimum(i * c_chunk, n_local - c_chunk)
    block = _normalise(jax.lax.dynamic_slice_in_dim(cands, start, c_chunk, axis=0))
    sim = _dot(queries, block)  # [cq, c]
    local = start + columns
    valid = (local >= i * c_chunk) & (offset + local < n)
    # Running entries first: they come from lower candidate indices, and lax.top_k puts
    # the lower position first among equal scores, so ties keep candidate order.
    merged = jnp.concatenate([best_scores, jnp.where(valid[None], sim, -jnp.inf)], axis=1)
    best_scores, pos = jax.lax.top_k(merged, k)
    from_block = offset + start + (pos - k)
    best_indices = jnp.where(pos < k, jnp.take_along_axis(best_indices, jnp.minimum(pos, k - 1),
                                                          axis=1), from_block)
    if with_ranks:
      # The true column itself is left out, not compared with its own score: certain not
      # to count, however _true_scores' matmul rounds.
      higher = ((sim > true_scores[:, None]) & valid[None]
                & ((offset + local)[None] != truth[:, None]))
      count = count + higher.sum(axis=1, dtype=jnp.int32)
    return (best_scores, best_indices, count), None

  init = (jnp.full((cq, k), -jnp.inf, jnp.float32), jnp.full((cq, k), -1, jnp.int32),
          jnp.zeros(cq, jnp.int32))
  (best_scores, best_indices, count), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return best_scores, best_indices, count


def _true_scores(queries, truth, cands, offset, c_chunk):
  """Each query's similarity with its true candidate where that row is local, else 0.

  Computed by a matmul of the very shape of the search's blocks ([cq, D] x [D, c], true
  rows padded with zeros to c), so it rounds as the block entries do: a candidate equal to
  the true one scores exactly the same and is not counted as higher. (A matmul of another
  shape may sum in another order and differ in the last bit.)
  """
  n_local = cands.shape[0]
  cq = queries.shape[0]
  local = truth - offset
  here = (truth >= 0) & (local >= 0) & (local < n_local)
  rows = jnp.take(cands, jnp.clip(local, 0, n_local - 1), axis=0)
  rows = _normalise(jnp.pad(rows, ((0, c_chunk - cq), (0, 0))))
  diagonal = jnp.arange(cq)
  return jnp.where(here, _dot(queries, rows)[diagonal, diagonal], 0.0)


@functools.lru_cache(maxsize=32)
def _program(q_chunk, c_chunk, n_local, n, d, k, with_ranks, mesh):
  """fn(query chunk [q_chunk, D], true indices [q_chunk], candidates) -> (scores [q_chunk,
  k], indices [q_chunk, k], counts [q_chunk]), compiled once per shape and mesh."""
  del d  # part of the cache key only
  search = functools.partial(_local_search, c_chunk=c_chunk, n=n, k=k, with_ranks=with_ranks)

  if mesh is None:
    def one_device(queries, truth, cands):
      queries = _normalise(queries)
      true_scores = _true_scores(queries, truth, cands, 0, c_chunk) if with_ranks else None
      return search(queries, truth, cands, 0, true_scores)
    return jax.jit(one_device)

  axes = tuple(mesh.axis_names)
  spec = jax.sharding.PartitionSpec

  def per_device(queries, truth, cands):
    queries = _normalise(queries)
    offset = jax.lax.axis_index(axes) * n_local
    true_scores = None
    if with_ranks:  # exactly one device holds each true row; the others add 0
      true_scores = jax.lax.psum(_true_scores(queries, truth, cands, offset, c_chunk), axes)
    scores, indices, count = search(queries, truth, cands, offset, true_scores)
    # Devices in mesh order hold ascending candidate rows: gathered side by side in that
    # order, equal scores keep candidate order (top_k takes the lower position).
    scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)
    indices = jax.lax.all_gather(indices, axes, axis=1, tiled=True)
    scores, pos = jax.lax.top_k(scores, k)
    return scores, jnp.take_along_axis(indices, pos, axis=1), jax.lax.psum(count, axes)

  # check_vma off: jax marks all_gather's result as varying over the mesh although every
  # device holds the same; the outputs are replicated (out_specs P()) by construction.
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(spec(), spec(), spec(axes)),
                         out_specs=(spec(), spec(), spec()), check_vma=False)
  return jax.jit(mapped)

