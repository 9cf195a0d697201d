r"""Retrieval as a tool: which clips of an index sound (or look) like these?

  python -m avmae_jax.retrieve --index DIR [--direction a2v] [--k 10] [--out results.json] \
      [--html GALLERY_DIR] QUERY_FILE_OR_FOLDER ...
  python -m avmae_jax.retrieve --index DIR --query_index QDIR [--num_queries N] ...

An index is a directory of `extract` or `embed` output (pooled embeddings, index.json).
Queries are video or audio files (or folders of them), embedded on the fly by the index's
own model and input settings (its index.json records the checkpoint and eval_data; pass
--checkpoint if it has moved), or the rows of another index (`--query_index`, which may be
the index itself: the retrieval evaluation of a split).

--direction: query modality, then index modality: a2v (a query's audio against the index's
videos: "which videos sound like this?"), v2a, a2a, v2v. Scores are cosine similarities;
the top --k per query come from `evaluators/search.py` (chunked on the device, the whole
query x index matrix never held). Index rows without that modality (audio-only files' NaN
video) are left out.

A query's true match is the index row of the same file (`path`), or of the same clip_id
where the index has no paths. Where every query has one, R@1/5/10 and the median rank are
reported too (with the query index equal to the index: `evaluate --task retrieval`'s
figures).

Output: the top-k of the first --print queries on stdout, and --out (results.json):
{direction, k, index, model, metrics, failed, queries: [{query: {clip_id, path}, true:
{row, rank} or null, results: [{rank, row, clip_id, path, score}]}]}. --html DIR writes a
static gallery (DIR/index.html, pictures beside it in DIR/media; see gallery.py) of the
first --html_queries queries: each query's middle frame and log-mel, and its results with
their pictures and scores, the true match marked.
"""

import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np

from avmae_jax import api
from avmae_jax import cli
from avmae_jax import extract
from avmae_jax.evaluators import search

DIRECTIONS = ("a2v", "v2a", "a2a", "v2v")
_MODALITY = {"a": "audio", "v": "video"}


class RetrieveError(Exception):
  """A request that cannot be served (bad index, direction or queries)."""


def _keys(arrays: dict[str, Any]) -> list[str]:
  """Each row's identity: its file where the index records paths, else its clip_id."""
  paths = arrays.get("path")
  if paths is not None and all(str(p) for p in paths):
    return [os.path.abspath(str(p)) for p in paths]
  return [str(c) for c in arrays["clip_id"]]


def _vectors(arrays: dict[str, Any], modality: str, where: str) -> np.ndarray:
  x = np.asarray(arrays[_MODALITY[modality]], np.float32)
  if x.ndim != 2:
    raise RetrieveError(f"{where}: {_MODALITY[modality]} embeddings have shape {x.shape}; "
                        "retrieval needs pooled [N, D] vectors (extract or embed without "
                        "--tokens)")
  return x


def _row(arrays: dict[str, Any], row: int) -> dict[str, Any]:
  paths = arrays.get("path")
  return {"row": int(row), "clip_id": str(arrays["clip_id"][row]),
          "path": str(paths[row]) if paths is not None else ""}


def retrieve(index: dict[str, Any], queries: dict[str, Any], direction: str = "a2v",
             k: int = 10, chunk: int = 4096, mesh=None,
             index_name: str = "index") -> dict[str, Any]:
  """Top-k index rows of each query row (both `extract.read_index`-style dicts of arrays).

  Returns the results.json structure (module docstring) without `failed`.
  """
  if direction not in DIRECTIONS:
    raise RetrieveError(f"--direction must be one of {DIRECTIONS}, got {direction!r}")
  query_vectors = _vectors(queries, direction[0], "queries")
  index_vectors = _vectors(index, direction[2], index_name)
  if query_vectors.shape[1] != index_vectors.shape[1]:
    raise RetrieveError(f"queries have {query_vectors.shape[1]}-d embeddings, {index_name} "
                        f"{index_vectors.shape[1]}-d: not the same model")
  usable = np.flatnonzero(np.isfinite(index_vectors).all(axis=1))
  if not len(usable):
    raise RetrieveError(f"{index_name} has no {_MODALITY[direction[2]]} embeddings")
  if not 1 <= k <= len(usable):
    raise RetrieveError(f"--k must be in [1, {len(usable)}] (the index rows with "
                        f"{_MODALITY[direction[2]]}), got {k}")
  ok_queries = np.isfinite(query_vectors).all(axis=1)
  if not ok_queries.any():
    raise RetrieveError(f"no query has a {_MODALITY[direction[0]]} embedding (audio-only "
                        "files have no video)")
  position = {key: i for i, key in reversed(list(enumerate(_keys(index))))}
  usable_position = {int(row): i for i, row in enumerate(usable)}
  truth = np.array([usable_position.get(position.get(key, -1), -1)
                    for key in _keys(queries)], np.int64)
  found = search.top_k(query_vectors[ok_queries], index_vectors[usable], k,
                       true_index=truth[ok_queries], chunk=chunk, mesh=mesh)
  out_queries, ranks = [], []
  rows_done = 0
  for q in range(len(query_vectors)):
    entry = {"query": _row(queries, q), "true": None, "results": []}
    if not ok_queries[q]:
      entry["skipped"] = f"no {_MODALITY[direction[0]]} embedding"
      out_queries.append(entry)
      continue
    i = rows_done
    rows_done += 1
    if truth[q] >= 0:
      rank = int(found.ranks[i])
      entry["true"] = {"row": int(usable[truth[q]]), "rank": rank + 1}
      ranks.append(rank)
    for r, (col, score) in enumerate(zip(found.indices[i], found.scores[i])):
      entry["results"].append({"rank": r + 1, **_row(index, usable[col]),
                               "score": float(score)})
    out_queries.append(entry)
  metrics = None
  if ranks and len(ranks) == int(ok_queries.sum()):
    metrics = {**search.figures("", np.asarray(ranks)), "num_queries": len(ranks)}
  return {"direction": direction, "k": int(k), "index": index_name,
          "model": index["meta"].get("model"), "num_index_rows": int(len(usable)),
          "metrics": metrics, "queries": out_queries}


def embed_queries(index: dict[str, Any], paths: Sequence[str], checkpoint: Optional[str],
                  step: Optional[int] = None) -> tuple[dict[str, Any], api.LoadedModel]:
  """Query files embedded by the index's model and input settings; (arrays + failed, model)."""
  meta = index["meta"]
  checkpoint = checkpoint or meta.get("checkpoint")
  if not checkpoint:
    raise RetrieveError("the index does not record its checkpoint (written by an older "
                        "version): pass --checkpoint")
  if not os.path.exists(checkpoint):
    raise RetrieveError(f"the index's checkpoint {checkpoint} does not exist: pass "
                        "--checkpoint")
  model, _ = cli.load_model(checkpoint, step if step is not None else meta.get("step"))
  config = None
  if meta.get("eval_data"):
    config = ml_collections.ConfigDict({"eval_data": meta["eval_data"]})
  try:
    arrays = model.embed(list(paths), config=config)
  except ValueError as e:
    raise RetrieveError(str(e)) from e
  arrays["meta"] = {"model": meta.get("model")}
  return arrays, model


def _print(results: dict[str, Any], limit: int) -> None:
  shown = results["queries"][:limit]
  for entry in shown:
    q = entry["query"]
    print(f"query {q['clip_id']}" + (f" ({q['path']})" if q["path"] else "")
          + (f": true match at rank {entry['true']['rank']}" if entry["true"] else ""))
    if "skipped" in entry:
      print(f"  skipped: {entry['skipped']}")
    for r in entry["results"]:
      mark = "  <- true match" if entry["true"] and r["row"] == entry["true"]["row"] else ""
      print(f"  {r['rank']:>3}  {r['score']:.4f}  {r['clip_id']}{mark}")
  if len(results["queries"]) > limit:
    print(f"... and {len(results['queries']) - limit} more queries in the results file")
  if results["metrics"]:
    m = results["metrics"]
    print(f"{results['direction']} over {m['num_queries']} queries: R@1 {m['r1']:.1f}%, "
          f"R@5 {m['r5']:.1f}%, R@10 {m['r10']:.1f}%, median rank {m['median_rank']:g}")


def run(index_dir: str, query_paths: Sequence[str], query_index: str = "",
        direction: str = "a2v", k: int = 10, out: str = "results.json", html: str = "",
        num_queries: int = 0, html_queries: int = 20, checkpoint: Optional[str] = None,
        step: Optional[int] = None, chunk: int = 4096, print_queries: int = 10
        ) -> dict[str, Any]:
  """The command: read the index, get the queries, search, write results (and a gallery)."""
  from avmae_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  if bool(query_paths) == bool(query_index):
    raise RetrieveError("give query files/folders or --query_index (one of the two)")
  if direction not in DIRECTIONS:
    raise RetrieveError(f"--direction must be one of {DIRECTIONS}, got {direction!r}")
  try:
    index = extract.read_index(index_dir)
    failed = []
    if query_index and os.path.abspath(query_index) == os.path.abspath(index_dir):
      queries = index  # the index against itself: read once
    elif query_index:
      queries = extract.read_index(query_index)
    else:
      queries, _ = embed_queries(index, query_paths, checkpoint, step)
      failed = queries.pop("failed")
  except extract.ExtractError as e:
    raise RetrieveError(str(e)) from e
  if num_queries:
    queries = {k_: (v[:num_queries] if isinstance(v, np.ndarray) else v)
               for k_, v in queries.items()}
  import jax  # pylint: disable=import-outside-toplevel
  mesh = mesh_lib.make_mesh({"data": -1}, jax.local_devices())
  results = retrieve(index, queries, direction, k, chunk, mesh,
                     index_name=os.path.abspath(index_dir))
  results["failed"] = failed
  for item in failed:
    print(f"SKIPPED {item['reason']}", file=sys.stderr)
  _print(results, print_queries)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"results: {out}")
  if html:
    from avmae_jax import gallery  # pylint: disable=import-outside-toplevel
    page = gallery.write(html, results, index, queries, max_queries=html_queries)
    print(f"gallery: {page}")
  return results


def _define_flags() -> None:
  flags.DEFINE_string("index", None, "Directory of extract/embed output to search.")
  flags.DEFINE_string("query_index", "", "Another such directory whose rows are the queries "
                      "(instead of query files).")
  flags.DEFINE_enum("direction", "a2v", list(DIRECTIONS),
                    "Query modality 2 index modality.")
  flags.DEFINE_integer("k", 10, "Results per query.")
  flags.DEFINE_integer("num_queries", 0, "Only the first N queries (0: all).")
  flags.DEFINE_string("out", "results.json", "Where to write the results ('' for none).")
  flags.DEFINE_string("html", "", "Write a gallery page into this directory.")
  flags.DEFINE_integer("html_queries", 20, "Queries shown in the gallery.")
  flags.DEFINE_integer("print", 10, "Queries printed on stdout.")
  flags.DEFINE_integer("chunk", 4096, "Rows per block of the search (memory ~ chunk^2).")
  flags.DEFINE_string("checkpoint", None, "The model for query files (default: the one the "
                      "index records).")
  flags.DEFINE_integer("step", None, "A training checkpoint step instead of the latest.")
  flags.mark_flags_as_required(["index"])


def main(argv):
  with cli.command(argv[:1], RetrieveError, extract.ExtractError) as f:
    results = run(f.index, argv[1:], f.query_index, f.direction, f.k, f.out, f.html,
                  f.num_queries, f.html_queries, f.checkpoint, f.step, f.chunk, f.print)
  return 1 if results["failed"] else 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
