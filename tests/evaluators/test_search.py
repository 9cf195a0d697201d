"""Chunked search (evaluators/search.py): top-k and true-pair ranks against brute-force
float64 counts and sorts, exact ties included; the mesh path against one device; the
errors; memory that does not grow with N x Q; `bench retrieval` at a tiny size."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae_jax.evaluators import metrics
from avmae_jax.evaluators import search
from tests import _helpers


def _cosines(queries, candidates):
  q = np.asarray(queries, np.float64)
  c = np.asarray(candidates, np.float64)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  # Products summed per pair, not a BLAS matmul: that one rounds identical candidate rows
  # differently by their position in the matrix, breaking the ties this file checks.
  return (q[:, None, :] * c[None, :, :]).sum(axis=-1)


def _brute_force(queries, candidates, k, true_index=None):
  """float64: top-k candidate indices by a stable sort (equal scores: lower index first),
  their scores, and the count of candidates scoring strictly above the true one."""
  sim = _cosines(queries, candidates)
  order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  ranks = None
  if true_index is not None:
    true = sim[np.arange(len(sim)), true_index]
    ranks = (sim > true[:, None]).sum(axis=1)
    ranks[np.asarray(true_index) < 0] = -1
  return order, np.take_along_axis(sim, order, axis=1), ranks


def _old_retrieval_metrics(audio, video, ks=(1, 5, 10)):
  """metrics.retrieval_metrics as it was before search.py: float64, the full matrix."""
  audio, video = np.asarray(audio, np.float64), np.asarray(video, np.float64)
  audio = audio / np.maximum(np.linalg.norm(audio, axis=1, keepdims=True), 1e-12)
  video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-12)
  sim = audio @ video.T
  out = {"num_clips": int(len(audio))}
  for name, s in (("a2v", sim), ("v2a", sim.T)):
    ranks = metrics.ranks_of_true_pairs(s)
    for k in ks:
      out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
    out[f"{name}_median_rank"] = float(np.median(ranks) + 1)
  return out


def _grid_vectors(rng, rows, dim=6, scale=True):
  """Vectors with exactly 4 entries of +-1 (norm 2), times a power of two: normalising
  them is exact in float32 and every dot product is a multiple of 1/4, so equal scores
  are exactly equal on any device and in any order of summation. Many exact ties."""
  x = np.zeros((rows, dim), np.float32)
  for i in range(rows):
    where = rng.choice(dim, 4, replace=False)
    x[i, where] = rng.choice([-1.0, 1.0], 4)
  if scale:
    x *= 2.0 ** rng.integers(-3, 4, (rows, 1))
  return x


@pytest.mark.parametrize("chunk", [1, 4, 7, 4096])  # 24 candidates: 4 divides, 7 does not
def test_top_k_matches_brute_force_on_random_vectors(chunk):
  rng = np.random.default_rng(chunk)
  queries, candidates = rng.standard_normal((19, 6)), rng.standard_normal((24, 6)) * 3.0
  true_index = rng.integers(-1, 24, 19)
  true_index[:2] = -1  # queries without a true candidate
  queries[2:] += 0.2 * candidates[true_index[2:]]  # related to theirs: ranks from 0 up
  for k in (1, 5, 24):  # 24 = N: every candidate, in order
    got = search.top_k(queries, candidates, k, true_index=true_index, chunk=chunk)
    order, scores, ranks = _brute_force(queries, candidates, k, true_index)
    assert got.indices.dtype == np.int32 and got.indices.shape == (19, k)
    assert got.scores.dtype == np.float32 and got.ranks.dtype == np.int64
    np.testing.assert_array_equal(got.indices, order)
    np.testing.assert_allclose(got.scores, scores, atol=1e-6)
    np.testing.assert_array_equal(got.ranks, ranks)
  assert (ranks > 0).any() and (ranks[2:] == 0).any()  # not all first, not none first
  assert search.top_k(queries, candidates, 3, chunk=chunk).ranks is None


@pytest.mark.parametrize("chunk", [3, 8, 50, 4096])
def test_exact_ties_count_only_strictly_higher_and_keep_candidate_order(chunk):
  rng = np.random.default_rng(7)
  candidates = _grid_vectors(rng, 50)
  queries = np.concatenate([_grid_vectors(rng, 30), candidates[:10] * 4.0])  # Q != N
  true_index = rng.integers(0, 50, 40)
  got = search.top_k(queries, candidates, 50, true_index=true_index, chunk=chunk)
  order, scores, ranks = _brute_force(queries, candidates, 50, true_index)
  np.testing.assert_array_equal(got.indices, order)
  np.testing.assert_array_equal(got.scores, scores.astype(np.float32))  # exact: quarters
  np.testing.assert_array_equal(got.ranks, ranks)
  # the case has ties to break: within equal scores, ascending candidate rows
  equal = got.scores[:, 1:] == got.scores[:, :-1]
  assert equal.sum() > 500
  assert np.all(got.indices[:, 1:][equal] > got.indices[:, :-1][equal])
  # and other candidates tied with the true one, which a >= count would put above it
  sim = _cosines(queries, candidates)
  tied = (sim == sim[np.arange(40), true_index][:, None]).sum(axis=1) - 1
  assert (tied > 0).sum() > 20


@pytest.mark.parametrize("chunk", [7, 150])
def test_duplicated_rows_of_the_true_candidate_are_ties(chunk):
  """Random float rows, each candidate repeated several times: a copy of the true
  candidate scores exactly as much and is not counted above it, whatever block each copy
  falls in. (A true score from a matmul of another shape than the blocks' can differ in
  the last bit: at D=32, N=150, Q=90 that miscounted 14 of 90 ranks.)"""
  rng = np.random.default_rng(1)
  for dim in (32, 100):
    base = rng.standard_normal((40, dim)).astype(np.float32)
    candidates = base[rng.integers(0, 40, 150)]
    queries = (candidates[rng.integers(0, 150, 90)]
               + 0.8 * rng.standard_normal((90, dim))).astype(np.float32)
    true_index = rng.integers(0, 150, 90)
    got = search.top_k(queries, candidates, 8, true_index=true_index, chunk=chunk)
    order, _, ranks = _brute_force(queries, candidates, 8, true_index)
    copies = (candidates[true_index][:, None] == candidates[None]).all(-1).sum(1)
    assert (copies > 2).sum() > 30  # most true candidates have copies
    np.testing.assert_array_equal(got.ranks, ranks)
    np.testing.assert_array_equal(got.indices, order)  # copies listed in row order


@pytest.mark.parametrize("chunk", [5, 16, 4096])
def test_retrieval_metrics_equal_the_full_matrix_figures(chunk):
  rng = np.random.default_rng(3)
  audio = rng.standard_normal((128, 32)).astype(np.float32)
  video = rng.standard_normal((128, 32)).astype(np.float32) + 0.3 * audio  # weakly paired
  want = _old_retrieval_metrics(audio, video)
  got = search.retrieval_metrics(audio, video, chunk=chunk)
  assert got == want and list(got) == list(want)  # same keys in the same order
  assert metrics.retrieval_metrics(audio, video, chunk=chunk) == want
  assert 0 < want["a2v_r1"] < 100 and want["a2v_median_rank"] > 1  # not a degenerate case
  # exact ties: grid vectors, some clips duplicated in both modalities
  audio, video = _grid_vectors(rng, 40), _grid_vectors(rng, 40)
  audio[20:30], video[20:30] = audio[10:20], video[10:20]
  got = search.retrieval_metrics(audio, video, ks=(1, 2, 40), chunk=chunk)
  assert got == _old_retrieval_metrics(audio, video, ks=(1, 2, 40))


def test_jax_and_low_precision_inputs():
  rng = np.random.default_rng(4)
  queries = rng.standard_normal((9, 8)).astype(np.float32)
  candidates = rng.standard_normal((14, 8)).astype(np.float32)
  want = search.top_k(queries, candidates, 4, true_index=np.arange(9), chunk=5)
  got = search.top_k(jnp.asarray(queries), jnp.asarray(candidates), 4,
                     true_index=jnp.arange(9), chunk=5)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  half = search.top_k(queries.astype(np.float16), jnp.asarray(candidates, jnp.bfloat16), 4,
                      chunk=5)
  assert half.scores.dtype == np.float32 and half.indices.shape == (9, 4)
  grid = _grid_vectors(rng, 12, scale=False).astype(np.int8)  # integers are fine too
  assert search.top_k(grid, grid, 1).indices[:, 0].tolist() == list(range(12))


def test_errors_name_the_bad_input():
  x = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"k must be .*\[1, 4\].*got 5"):
    search.top_k(x, x, 5)
  with pytest.raises(ValueError, match="k must be"):
    search.top_k(x, x, 0)
  with pytest.raises(ValueError, match="differ in D"):
    search.top_k(x, np.ones((4, 2)), 1)
  with pytest.raises(ValueError, match="candidates is empty"):
    search.top_k(x, np.ones((0, 3)), 1)
  with pytest.raises(ValueError, match="queries is empty"):
    search.top_k(np.ones((2, 0)), np.ones((2, 0)), 1)
  with pytest.raises(ValueError, match=r"queries must be \[rows, D\]"):
    search.top_k(np.ones(3), x, 1)
  bad = x.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="queries contain NaN"):
    search.top_k(bad, x, 1)
  with pytest.raises(ValueError, match="candidates contain NaN"):
    search.top_k(x, jnp.asarray(bad), 1)
  with pytest.raises(ValueError, match="video contain NaN"):
    search.retrieval_metrics(x, bad)
  with pytest.raises(ValueError, match="paired"):
    metrics.retrieval_metrics(x, np.ones((5, 3)))
  with pytest.raises(ValueError, match=r"true_index must be \[Q\]"):
    search.top_k(x, x, 1, true_index=[0, 1])
  with pytest.raises(ValueError, match=r"true_index must lie in \[-1, N\)"):
    search.top_k(x, x, 1, true_index=[0, 1, 2, 4])
  with pytest.raises(ValueError, match="chunk must be"):
    search.top_k(x, x, 1, chunk=0)
  with pytest.raises(ValueError, match="real numbers"):
    search.top_k(x.astype(bool), x, 1)


def test_memory_does_not_grow_with_the_number_of_candidates():
  """The compiled search of one query chunk needs the same scratch memory for 8x the
  candidates: no [chunk, N] array exists (a dense version needs 64 x 8192 x 4 bytes)."""
  temps = []
  for n in (1024, 8192):
    fn = search._program(64, 64, n, n, 16, 5, True, None)  # pylint: disable=protected-access
    shapes = (jax.ShapeDtypeStruct((64, 16), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.int32),
              jax.ShapeDtypeStruct((n, 16), jnp.float32))
    analysis = fn.lower(*shapes).compile().memory_analysis()
    if analysis is None:
      pytest.skip("this backend reports no memory analysis")
    temps.append(analysis.temp_size_in_bytes)
  assert temps[1] <= temps[0] + 4096, temps
  assert temps[1] < 64 * 8192 * 4 // 2, temps


MESH_PROBE = """
import json, sys
import numpy as np
from avmae_jax.evaluators import search
heavy = sorted(m for m in ("tensorflow", "torch") if m in sys.modules)
import jax
from tests.evaluators.test_search import _grid_vectors
assert jax.device_count() == 4, jax.devices()
meshes = {"x4": jax.sharding.Mesh(np.array(jax.devices()), ("x",)),
          "explicit_2x2": jax.make_mesh((2, 2), ("a", "b"))}
rng = np.random.default_rng(5)
cases = {"random": (rng.standard_normal((21, 12)), rng.standard_normal((37, 12))),
         "ties": (_grid_vectors(rng, 21), _grid_vectors(rng, 37))}
mismatches = []
for case, (queries, candidates) in cases.items():
  true_index = rng.integers(-1, 37, 21)
  for k, chunk in ((1, 4), (7, 3), (37, 16)):  # 37 rows: 10 per device, 3 of them padding
    want = search.top_k(queries, candidates, k, true_index=true_index, chunk=chunk)
    for name, mesh in meshes.items():
      got = search.top_k(queries, candidates, k, true_index=true_index, chunk=chunk, mesh=mesh)
      same = (np.array_equal(got.indices, want.indices) and np.array_equal(got.ranks, want.ranks)
              and np.allclose(got.scores, want.scores, atol=1e-6))
      if not same:
        mismatches.append([case, name, k, chunk])
audio, video = cases["random"][1], cases["random"][1] + rng.standard_normal((37, 12))
same_metrics = (search.retrieval_metrics(audio, video, chunk=8, mesh=meshes["x4"])
                == search.retrieval_metrics(audio, video, chunk=8))
print(json.dumps({"heavy": heavy, "mismatches": mismatches, "same_metrics": same_metrics}))
"""


@pytest.mark.slow
def test_candidates_split_over_four_devices_give_the_one_device_result():
  """In a process of its own with 4 CPU devices: a 1-axis mesh and an explicit 2x2 mesh,
  37 candidates (not a multiple of 4), k up to N, exact ties. The process first imports
  search.py alone: no TensorFlow or torch comes with it."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", MESH_PROBE], cwd=_helpers.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report == {"heavy": [], "mismatches": [], "same_metrics": True}


def test_bench_retrieval_command(capsys):
  from avmae_jax import bench  # pylint: disable=import-outside-toplevel
  assert bench.main(["retrieval", "--num", "300", "--dim", "16", "--chunk", "128"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("retrieval of 300 x 16 (chunk 128, top 10)")
  report = json.loads(lines[-1])
  assert report["bench"] == "retrieval" and (report["num"], report["dim"]) == (300, 16)
  assert report["seconds"] > 0 and report["warmup_s"] > 0
  assert 0 < report["rss_before_gib"] <= report["peak_rss_gib"] < 64
  # the figures are retrieval_metrics' on the vectors the command drew
  rng = np.random.default_rng(0)
  draw = bench._unit_vectors  # pylint: disable=protected-access
  audio, video = draw(rng, 300, 16), draw(rng, 300, 16)
  want = metrics.retrieval_metrics(audio, video)
  assert {key: report[key] for key in want if key != "num_clips"} == {
      key: value for key, value in want.items() if key != "num_clips"}
  assert 100 < report["a2v_median_rank"] < 200  # unrelated vectors: about N / 2
  with pytest.raises(SystemExit):
    bench.main(["retrieval", "--num", "5", "--dim", "4", "--k", "6"])
