"""The retrieval gallery: a static page of queries and what they retrieved, with pictures.

`write(directory, results, index, queries)` writes DIR/index.html and its pictures in
DIR/media (JPEG middle frames, PNG log-mel spectrograms drawn by plots.py: time across in
seconds, low frequencies at the bottom). The page needs no server and no network: open
the file. Each query's row shows its frame and log-mel, then its top-k results with theirs,
rank and cosine score; the true match (where the index knows it) is outlined in green.

Pictures come from each clip's file where the index records its path (embed output), else
from the prepared dataset the index was extracted from (its index.json's eval_data:
`pipeline.lookup_clips`, one pass over the split). Clips with neither are shown as text.
"""

import html
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from avmae_jax.data import schema

_CSS = """
* { box-sizing: border-box; }
body { font-family: sans-serif; font-size: 13px; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; }
.summary { color: #555; margin-bottom: 12px; }
.query { display: flex; gap: 10px; align-items: flex-start; padding: 10px 0;
         border-top: 1px solid #ddd; }
.card { width: 200px; flex: none; border: 3px solid transparent; border-radius: 4px;
        padding: 3px; background: #fafafa; }
.card.q { background: #eef3fb; border-color: #9db4d8; }
.card.true { border-color: #2e9e44; background: #eefaf0; }
.card .top { display: flex; gap: 6px; }
.card img.frame { width: 96px; height: 96px; object-fit: cover; display: block; flex: none; }
.card img.mel { width: 190px; display: block; margin-top: 3px; }
.card .name { font-weight: bold; overflow-wrap: anywhere; }
.card .meta { color: #555; margin-top: 2px; }
.card .score { font-size: 15px; }
.none { width: 96px; height: 96px; background: #ddd; color: #666; display: flex; flex: none;
        align-items: center; justify-content: center; text-align: center; }
.results { display: flex; flex-wrap: wrap; gap: 6px; flex: 1; }
"""


def _from_file(path: str) -> dict[str, Any]:
  from avmae_jax import embed  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import clip  # pylint: disable=import-outside-toplevel
  decoded = clip.extract_clip(path, target_frames=None, with_video=not embed.is_audio_only(path))
  frames = decoded[schema.FRAMES]
  return {"fbank": decoded[schema.FBANK][:schema.TARGET_FRAMES].astype(np.float32),
          "frame": bytes(frames[len(frames) // 2]) if frames is not None else None}


def clip_media(arrays: dict[str, Any], rows, meta: dict[str, Any]) -> dict[int, dict]:
  """{row: {"fbank": [T, F] or None, "frame": JPEG bytes or None, "note": why not}} of some
  rows of an index (or of query arrays)."""
  from avmae_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  rows = sorted({int(r) for r in rows})
  paths = arrays.get("path")
  out, from_dataset = {}, []
  for row in rows:
    path = str(paths[row]) if paths is not None else ""
    if path and os.path.isfile(path):
      try:
        out[row] = _from_file(path)
      except ValueError as e:  # the file changed since it was embedded
        out[row] = {"fbank": None, "frame": None, "note": str(e)}
    else:
      from_dataset.append(row)
  if from_dataset:
    section = meta.get("eval_data")
    found = {}
    if section and (section.get("name") or section.get("builder_dir")):
      found = pipeline.lookup_clips(ml_collections.ConfigDict(section),
                                    [str(arrays["clip_id"][r]) for r in from_dataset])
    for row in from_dataset:
      clip = found.get(str(arrays["clip_id"][row]))
      out[row] = clip or {"fbank": None, "frame": None,
                          "note": "no file or prepared dataset to draw it from"}
  return out


def _card(cls: str, media: Optional[dict], directory: str, stem: str, entry: dict,
          lines: list[str]) -> str:
  """One clip: its middle frame with its name and `lines` beside it, its log-mel below."""
  from avmae_jax import plots  # pylint: disable=import-outside-toplevel
  media = media or {}
  if media.get("frame"):
    with open(os.path.join(directory, "media", f"{stem}.jpg"), "wb") as f:
      f.write(media["frame"])
    frame = f'<img class="frame" src="media/{stem}.jpg" alt="middle frame">'
  else:
    frame = ('<div class="none">no frame' + (" (audio only)" if media.get("fbank")
                                             is not None else "") + "</div>")
  mel = ""
  if media.get("fbank") is not None:
    with open(os.path.join(directory, "media", f"{stem}_mel.png"), "wb") as f:
      f.write(plots.spectrogram_png(np.asarray(media["fbank"]), width_in=1.9,
                                    height_in=1.1))
    mel = f'<img class="mel" src="media/{stem}_mel.png" alt="log-mel">'
  elif media.get("note"):
    mel = f'<div class="meta">{html.escape(media["note"])}</div>'
  name = entry["clip_id"] or os.path.basename(entry["path"])
  title = html.escape(entry["path"] or entry["clip_id"], quote=True)
  text = (f'<div><div class="name" title="{title}">{html.escape(name)}</div>'
          + "".join(f'<div class="meta">{line}</div>' for line in lines) + "</div>")
  return f'<div class="{cls}"><div class="top">{frame}{text}</div>{mel}</div>'


def write(directory: str, results: dict[str, Any], index: dict[str, Any],
          queries: dict[str, Any], max_queries: int = 20) -> str:
  """Writes the gallery of the first `max_queries` queries of `results` (retrieve.py's
  structure) into `directory`; returns the page's path."""
  os.makedirs(os.path.join(directory, "media"), exist_ok=True)
  shown = [e for e in results["queries"] if "skipped" not in e][:max_queries]
  query_media = clip_media(queries, [e["query"]["row"] for e in shown],
                           queries.get("meta", {}))
  index_media = clip_media(index, [r["row"] for e in shown for r in e["results"]],
                           index.get("meta", {}))
  body = []
  for e in shown:
    q = e["query"]
    truth = e["true"]
    where = (f"true match: rank {truth['rank']}" if truth else "no true match in the index")
    cards = [_card("card q", query_media.get(q["row"]), directory, "q%d" % q["row"], q,
                   ["query", where])]
    cards.append('<div class="results">')
    for r in e["results"]:
      true = bool(truth) and r["row"] == truth["row"]
      cards.append(_card("card true" if true else "card", index_media.get(r["row"]),
                         directory, "i%d" % r["row"], r,
                         [f'#{r["rank"]}', f'<span class="score">{r["score"]:.3f}</span>']
                         + (["true match"] if true else [])))
    cards.append("</div>")
    body.append('<section class="query">' + "".join(cards) + "</section>")
  m = results.get("metrics")
  summary = (f"{results['direction']}: top {results['k']} of {results['num_index_rows']} "
             f"index rows for {len(shown)} of {len(results['queries'])} queries; model "
             f"{results.get('model')}")
  if m:
    summary += (f"<br>over all {m['num_queries']} queries: R@1 {m['r1']:.1f}%, R@5 "
                f"{m['r5']:.1f}%, R@10 {m['r10']:.1f}%, median rank {m['median_rank']:g}")
  page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Retrieval: '
          f'{html.escape(results["direction"])}</title><style>{_CSS}</style></head><body>'
          f'<h1>Retrieval {html.escape(results["direction"])}</h1>'
          f'<div class="summary">{html.escape(summary).replace("&lt;br&gt;", "<br>")}</div>'
          + "\n".join(body) + "</body></html>\n")
  path = os.path.join(directory, "index.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
