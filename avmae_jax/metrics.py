"""Evaluation metrics shared by training-time evaluation and `python -m avmae_jax.evaluate`.

Retrieval follows the reference protocol (cav-mae spec section 7): mean-pooled
forward_feat tokens, l2-normalised, cosine similarity; audio->video ranks every video
for each audio query, video->audio the reverse; the rank of the true pair decides.
"""

import numpy as np


def ranks_of_true_pairs(similarity: np.ndarray) -> np.ndarray:
  """0-based rank of item i in row i: how many candidates score strictly higher."""
  similarity = np.asarray(similarity)
  true = np.diagonal(similarity)[:, None]
  return (similarity > true).sum(axis=1)


def retrieval_metrics(audio: np.ndarray, video: np.ndarray, ks=(1, 5, 10)) -> dict:
  """R@K (percent) and median rank (1-based) in both directions, from [N, D] vectors."""
  audio, video = np.asarray(audio, np.float64), np.asarray(video, np.float64)
  if audio.shape != video.shape or audio.ndim != 2:
    raise ValueError(f"need paired [N, D] audio and video vectors, got {audio.shape} and "
                     f"{video.shape}")
  audio = audio / np.maximum(np.linalg.norm(audio, axis=1, keepdims=True), 1e-12)
  video = video / np.maximum(np.linalg.norm(video, axis=1, keepdims=True), 1e-12)
  sim = audio @ video.T
  out = {"num_clips": int(len(audio))}
  for name, s in (("a2v", sim), ("v2a", sim.T)):
    ranks = ranks_of_true_pairs(s)
    for k in ks:
      out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
    out[f"{name}_median_rank"] = float(np.median(ranks) + 1)
  return out


def chance_recall(num_clips: int, k: int = 1) -> float:
  """R@K in percent of a random ranking."""
  return 100.0 * min(k, num_clips) / num_clips
