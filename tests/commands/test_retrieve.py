"""`python -m avmae_jax.retrieve` and its gallery: top-k lists against a brute-force ranking,
true matches by path or clip id, the figures of the retrieval evaluation, queries embedded
from files by the index's model, bad queries skipped, and the gallery's page and pictures.
"""

import json
import os
import re

import numpy as np
import pytest

from avmae_jax import retrieve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arrays(audio, video, clip_ids, paths=None):
  out = {"audio": np.asarray(audio, np.float32), "video": np.asarray(video, np.float32),
         "clip_id": np.array(clip_ids, str), "meta": {"model": "test"}}
  if paths is not None:
    out["path"] = np.array(paths, str)
  return out


def _brute_force(q, c, k):
  """float64 cosine scores, best first, ties to the lower row (a stable sort)."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  c = c / np.linalg.norm(c, axis=1, keepdims=True)
  s = q.astype(np.float64) @ c.T.astype(np.float64)
  return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def test_top_k_truth_by_clip_id_skips_rows_without_the_modality():
  rng = np.random.default_rng(0)
  audio, video = rng.standard_normal((2, 30, 8))
  video[[3, 17]] = np.nan  # audio-only rows: never retrieved in a2v
  index = _arrays(audio, video, [f"c{i}" for i in range(30)])
  # Queries: rows 5, 3 and 9 of the index under their clip ids, and one the index lacks.
  queries = _arrays(audio[[5, 3, 9, 0]], video[[5, 3, 9, 0]], ["c5", "c3", "c9", "other"])
  out = retrieve.retrieve(index, queries, "a2v", k=4)
  usable = [i for i in range(30) if i not in (3, 17)]
  want, scores = _brute_force(audio[[5, 3, 9, 0]], video[usable], 4)
  for q, entry in enumerate(out["queries"]):
    assert [r["row"] for r in entry["results"]] == [usable[j] for j in want[q]]
    np.testing.assert_allclose([r["score"] for r in entry["results"]],
                               scores[q, want[q]], atol=1e-5)
  assert out["num_index_rows"] == 28
  # True matches: c5 and c9 by clip id (rank: 1 + rows scoring strictly higher); c3's video
  # is NaN, so it is not in the index of videos; "other" has none.
  for q, row in ((0, 5), (2, 9)):
    true = scores[q, usable.index(row)]
    assert out["queries"][q]["true"] == {"row": row,
                                         "rank": 1 + int((scores[q] > true).sum())}
  assert out["queries"][1]["true"] is None and out["queries"][3]["true"] is None
  assert out["metrics"] is None  # not every query has a true match


def test_truth_by_path_ties_and_metrics_of_an_index_against_itself():
  rng = np.random.default_rng(1)
  audio = rng.standard_normal((40, 4)).astype(np.float32)
  video = audio + 0.5 * rng.standard_normal((40, 4)).astype(np.float32)
  video[11] = video[10]  # duplicate rows: exactly tied scores, the lower row first
  video[21] = video[20]
  index = _arrays(audio, video, ["x"] * 40, [f"/clips/{i}.mp4" for i in range(40)])
  out = retrieve.retrieve(index, index, "a2v", k=5)
  want, scores = _brute_force(audio, video, 5)
  ranks = []
  for q, entry in enumerate(out["queries"]):
    assert [r["row"] for r in entry["results"]] == list(want[q]), q
    assert entry["true"]["row"] == q  # by path: every clip_id is "x"
    ranks.append(int((scores[q] > scores[q, q] + 1e-9).sum()))
    assert entry["true"]["rank"] == ranks[-1] + 1
  ranks = np.array(ranks)
  assert out["metrics"] == {"r1": 100 * np.mean(ranks < 1), "r5": 100 * np.mean(ranks < 5),
                            "r10": 100 * np.mean(ranks < 10),
                            "median_rank": float(np.median(ranks) + 1), "num_queries": 40}


def test_bad_requests_name_the_problem():
  rng = np.random.default_rng(2)
  index = _arrays(rng.standard_normal((6, 8)), rng.standard_normal((6, 8)), list("abcdef"))
  with pytest.raises(retrieve.RetrieveError, match=r"--k must be in \[1, 6\]"):
    retrieve.retrieve(index, index, "a2v", k=7)
  with pytest.raises(retrieve.RetrieveError, match="--direction must be one of"):
    retrieve.retrieve(index, index, "a2b")
  tokens = dict(index, audio=np.zeros((6, 3, 8), np.float32))
  with pytest.raises(retrieve.RetrieveError, match="needs pooled"):
    retrieve.retrieve(index, tokens, "a2v", k=2)
  narrow = _arrays(np.ones((2, 4)), np.ones((2, 4)), ["a", "b"])
  with pytest.raises(retrieve.RetrieveError, match="not the same model"):
    retrieve.retrieve(index, narrow, "a2v", k=2)
  with pytest.raises(retrieve.RetrieveError, match="one of the two"):
    retrieve.run("somewhere", [], query_index="")
  with pytest.raises(retrieve.RetrieveError, match="no index.json"):
    retrieve.run(ROOT, [], query_index=ROOT)


@pytest.mark.slow
def test_command_gallery_and_file_queries(demo_pretrain_workdir, synthetic_data_dir,
                                          tmp_path):
  from avmae_jax import cli, embed, extract  # pylint: disable=import-outside-toplevel
  from avmae_jax import config_args  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from avmae_jax.evaluators import search  # pylint: disable=import-outside-toplevel
  from tests import _helpers  # pylint: disable=import-outside-toplevel
  config = _helpers.use_demo_data(config_args.load_config(
      _helpers.config_path(f"demo.py:data_dir={synthetic_data_dir}")))
  # An index of the held-out split against itself: the retrieval evaluation's figures.
  extract.run(config, demo_pretrain_workdir, str(tmp_path / "feats"))
  results = retrieve.run(str(tmp_path / "feats"), [], query_index=str(tmp_path / "feats"),
                         direction="v2a", k=3, out=str(tmp_path / "r.json"),
                         html=str(tmp_path / "gallery"), html_queries=4)
  feats = extract.read_index(str(tmp_path / "feats"))
  want = search.retrieval_metrics(feats["audio"], feats["video"])
  saved = json.loads((tmp_path / "r.json").read_text())
  assert saved["metrics"] == results["metrics"]
  for k in (1, 5, 10):
    assert results["metrics"][f"r{k}"] == want[f"v2a_r{k}"]
  assert results["metrics"]["median_rank"] == want["v2a_median_rank"]
  page = (tmp_path / "gallery" / "index.html").read_text()
  assert page.count('class="query"') == 4
  pictures = re.findall(r'src="(media/[^"]+)"', page)
  # Every query and result: its frame and log-mel, from the prepared dataset.
  assert len(pictures) == 2 * 4 * (1 + 3), len(pictures)
  assert all((tmp_path / "gallery" / p).stat().st_size > 500 for p in pictures)
  shown_true = sum(1 for e in results["queries"][:4] if e["true"]["rank"] <= 3)
  assert page.count('class="card true"') == shown_true

  # Files: an embed index of three clips; one of them and a bad file as queries.
  clips = tmp_path / "clips"
  clips.mkdir()
  for i in range(3):
    synthetic.write_video(clips / f"clip{i}.mp4", synthetic.draw_scene(3, "test", i,
                          seconds=3.0), width=96, height=72, fps=5, audio_codec="aac")
  model, where = cli.load_model(demo_pretrain_workdir)
  meta = extract.index_meta(where, demo_pretrain_workdir, None, embed.data_config(model))
  embed.embed(model, None, [str(clips)], str(tmp_path / "files"), progress=False, meta=meta)
  (tmp_path / "notes.mp4").write_text("not a video")
  results = retrieve.run(str(tmp_path / "files"), [str(clips / "clip1.mp4"),
                                                   str(tmp_path / "notes.mp4")],
                         direction="a2a", k=3, out="", html=str(tmp_path / "g2"))
  assert [os.path.basename(f["path"]) for f in results["failed"]] == ["notes.mp4"]
  (entry,) = results["queries"]
  # Embedded on the fly by the index's model: its own row scores 1 and is the true match.
  assert entry["true"] == {"row": 1, "rank": 1}
  assert entry["results"][0]["row"] == 1 and entry["results"][0]["score"] > 0.9999
  assert (tmp_path / "g2" / "media" / "q0.jpg").exists()
