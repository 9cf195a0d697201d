"""Metrics: classification figures against sklearn called directly and a hand-worked case;
retrieval R@K and median rank against a brute-force count."""

import math

import numpy as np
import pytest

from avmae_jax.evaluators import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def test_classification_matches_sklearn_per_class_on_random_multilabel():
  rng = np.random.default_rng(0)
  n, c = 60, 7
  targets = (rng.random((n, c)) < 0.3).astype(np.float32)
  targets[:, 3] = 0  # a class without positives: skipped from mAP and mAUC
  targets[:, 5] = 1  # a class with only positives: AP 1, no AUC
  scores = rng.standard_normal((n, c)) + 1.5 * targets  # informative but imperfect
  got = metrics.classification_metrics(scores, targets, multilabel=True)

  aps, aucs = [], []
  for k in range(c):
    if targets[:, k].sum() == 0:
      continue
    aps.append(sklearn_metrics.average_precision_score(targets[:, k], scores[:, k]))
    if targets[:, k].min() == 0:
      aucs.append(sklearn_metrics.roc_auc_score(targets[:, k], scores[:, k]))
  assert got["num_classes_scored"] == 6 == len(aps)
  assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
  assert got["mAUC"] == pytest.approx(np.mean(aucs), abs=1e-12)
  assert got["d_prime"] == pytest.approx(math.sqrt(2) * stats.norm.ppf(np.mean(aucs)))
  assert math.isnan(got["per_class_ap"][3])
  assert got["per_class_ap"][5] == pytest.approx(1.0)
  assert got["accuracy"] == pytest.approx(
      np.mean(np.argmax(scores, 1) == np.argmax(targets, 1)))
  assert got["primary"] == "mAP"
  # sigmoid is monotone: probabilities give the same ranking figures as logits
  probs = metrics.classification_metrics(1 / (1 + np.exp(-scores)), targets, multilabel=True)
  assert probs["mAP"] == pytest.approx(got["mAP"]) and probs["mAUC"] == pytest.approx(got["mAUC"])


def test_classification_hand_worked_case():
  # 4 clips, 2 classes. Class 0: positives are clips 0 and 2; scores rank them 1st and
  # 3rd -> precision at the two hits 1/1 and 2/3, AP = (1 + 2/3) / 2 = 5/6;
  # AUC: of the 4 (pos, neg) pairs, 3 are ordered correctly -> 0.75.
  # Class 1: its single positive (clip 1) scores highest -> AP 1, AUC 1.
  scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.3], [0.7, 0.2]])
  targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], np.float32)
  got = metrics.classification_metrics(scores, targets, multilabel=True)
  assert got["per_class_ap"] == pytest.approx([5 / 6, 1.0])
  assert got["mAP"] == pytest.approx(11 / 12)
  assert got["mAUC"] == pytest.approx(0.875)
  assert got["d_prime"] == pytest.approx(math.sqrt(2) * 1.1503493803760079)  # Phi^-1(0.875)
  # argmax: clip 0 -> 0 (true 0), 1 -> 1 (1), 2 -> 0 (0), 3 -> 0 (target all-zero: argmax 0)
  assert got["accuracy"] == 1.0


def test_single_label_uses_the_argmax_class_and_reports_accuracy():
  scores = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.1, 0.2]])
  smoothed = np.full((4, 3), 0.05)  # soft single-label targets: the argmax is the class
  smoothed[[0, 1, 2, 3], [0, 1, 2, 2]] = 0.9
  got = metrics.classification_metrics(scores, smoothed, multilabel=False)
  assert got["primary"] == "accuracy"
  assert got["accuracy"] == pytest.approx(3 / 4)  # clip 2 is called class 0
  hard = np.eye(3)[[0, 1, 2, 2]]
  want = [sklearn_metrics.average_precision_score(hard[:, k], scores[:, k]) for k in range(3)]
  assert got["per_class_ap"] == pytest.approx(want)


def test_classification_rejects_bad_shapes_and_nan():
  with pytest.raises(ValueError, match="same shape|one shape"):
    metrics.classification_metrics(np.zeros((3, 2)), np.zeros((3, 4)), multilabel=True)
  with pytest.raises(ValueError, match="NaN"):
    metrics.classification_metrics(np.full((2, 2), np.nan), np.eye(2), multilabel=True)


def _brute_force_retrieval(audio, video, ks=(1, 5, 10)):
  """Loops: cosine similarity, 1-based rank of the true pair counting strictly better."""
  n = len(audio)
  cos = lambda x, y: float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))
  out = {}
  for name, queries, candidates in (("a2v", audio, video), ("v2a", video, audio)):
    ranks = []
    for i in range(n):
      true = cos(queries[i], candidates[i])
      better = 0
      for j in range(n):
        if cos(queries[i], candidates[j]) > true:
          better += 1
      ranks.append(better + 1)
    for k in ks:
      out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / n
    ranks.sort()
    mid = n // 2
    out[f"{name}_median_rank"] = ranks[mid] if n % 2 else (ranks[mid - 1] + ranks[mid]) / 2
  return out


@pytest.mark.parametrize("n", [12, 13])
def test_retrieval_matches_brute_force_count(n):
  rng = np.random.default_rng(n)
  audio = rng.standard_normal((n, 5))
  video = audio + 1.2 * rng.standard_normal((n, 5))  # correlated, so ranks vary
  video *= rng.uniform(0.5, 3.0, (n, 1))  # cosine ignores scale
  got = metrics.retrieval_metrics(audio, video)
  want = _brute_force_retrieval(audio, video)
  assert got["num_clips"] == n
  for key, value in want.items():
    assert got[key] == pytest.approx(value), key
  assert 0 < got["a2v_r1"] < 100  # the case is not degenerate
  assert got["a2v_r1"] != got["v2a_r1"] or got["a2v_median_rank"] != got["v2a_median_rank"]


def test_retrieval_perfect_and_reversed():
  eye = np.eye(6)
  got = metrics.retrieval_metrics(eye, eye)
  assert got["a2v_r1"] == got["v2a_r1"] == 100.0 and got["a2v_median_rank"] == 1.0
  shifted = metrics.retrieval_metrics(eye, np.roll(eye, 1, axis=0))
  assert shifted["a2v_r1"] == 0.0 and shifted["a2v_r10"] == 100.0
