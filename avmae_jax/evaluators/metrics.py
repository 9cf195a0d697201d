"""Evaluation metrics shared by training-time evaluation and `python -m avmae_jax.evaluate`.

Retrieval follows the reference protocol (cav-mae spec section 7): mean-pooled
forward_feat tokens, l2-normalised, cosine similarity; audio->video ranks every video
for each audio query, video->audio the reverse; the rank of the true pair decides.
`retrieval_metrics` computes it with `search.retrieval_metrics` (float32 on the device, in
blocks, never an N x N matrix); `ranks_of_true_pairs` is the same count on a full matrix.

Classification follows the reference's `calculate_stats` (spec section 6): mAP, mAUC,
d-prime and accuracy; scikit-learn and scipy are imported only when those are asked for.
"""

import numpy as np

from avmae_jax.evaluators import search


def ranks_of_true_pairs(similarity: np.ndarray) -> np.ndarray:
  """0-based rank of item i in row i: how many candidates score strictly higher."""
  similarity = np.asarray(similarity)
  true = np.diagonal(similarity)[:, None]
  return (similarity > true).sum(axis=1)


def retrieval_metrics(audio: np.ndarray, video: np.ndarray, ks=(1, 5, 10), chunk: int = 4096,
                      mesh=None) -> dict:
  """R@K (percent) and median rank (1-based) in both directions, from paired [N, D] vectors.

  num_clips, a2v_r<k> and v2a_r<k> for k in ks, a2v_median_rank, v2a_median_rank. chunk and
  mesh: see `search.top_k` (the figures do not depend on them).
  """
  return search.retrieval_metrics(audio, video, ks, chunk=chunk, mesh=mesh)


def chance_recall(num_clips: int, k: int = 1) -> float:
  """R@K in percent of a random ranking."""
  return 100.0 * min(k, num_clips) / num_clips


def classification_metrics(scores, targets, multilabel: bool) -> dict:
  """Clip-classification figures of the reference's `calculate_stats` (cav-mae spec 6).

  scores: [N, C] class scores (sigmoid or softmax outputs, or logits: every figure here
  depends only on the order of scores within a class or within a clip).
  targets: [N, C] multi-hot (multilabel) or one-hot (single-label) targets; soft targets
  count as positive where >= 0.5 (multilabel) or at their argmax (single-label).

  Returns:
    mAP: mean over classes of sklearn's average_precision_score, in [0, 1] (not percent);
      classes with no positive clip are SKIPPED (their AP is undefined; sklearn would
      warn and return 0, which would drag the mean down on small evaluation sets).
    mAUC: mean over classes of sklearn's roc_auc_score, over classes with both positive
      and negative clips (ROC AUC is undefined otherwise).
    d_prime: sqrt(2) * Phi^-1(mAUC), Phi the standard normal CDF.
    accuracy: fraction of clips whose top-scoring class is the target's top class.
    per_class_ap: list of C floats, NaN for classes without positives.
    num_clips, num_classes, num_classes_scored (classes that entered mAP), primary
    ("mAP" for multilabel, "accuracy" otherwise: the figure the paper reports).
  """
  try:
    from scipy import stats  # pylint: disable=import-outside-toplevel
    from sklearn import metrics as skm  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("classification metrics need scikit-learn and scipy "
                      "(pip install '.[data]')") from e
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets, np.float64)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f"need [N, C] scores and targets of one shape, got {scores.shape} and "
                     f"{targets.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  n, c = scores.shape
  if multilabel:
    positive = targets >= 0.5
  else:
    positive = np.zeros_like(targets, bool)
    positive[np.arange(n), np.argmax(targets, axis=1)] = True
  per_class_ap, aucs = [], []
  for k in range(c):
    pos = positive[:, k]
    if not pos.any():
      per_class_ap.append(float("nan"))
      continue
    per_class_ap.append(float(skm.average_precision_score(pos, scores[:, k])))
    if not pos.all():
      aucs.append(float(skm.roc_auc_score(pos, scores[:, k])))
  scored = [ap for ap in per_class_ap if not np.isnan(ap)]
  m_auc = float(np.mean(aucs)) if aucs else float("nan")
  return {
      "mAP": float(np.mean(scored)) if scored else float("nan"),
      "mAUC": m_auc,
      "d_prime": float(np.sqrt(2.0) * stats.norm.ppf(m_auc)) if aucs else float("nan"),
      "accuracy": float(np.mean(np.argmax(scores, 1) == np.argmax(targets, 1))),
      "per_class_ap": per_class_ap,
      "num_clips": int(n),
      "num_classes": int(c),
      "num_classes_scored": len(scored),
      "primary": "mAP" if multilabel else "accuracy",
  }
