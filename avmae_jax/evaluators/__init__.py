"""Evaluators, shared by the training loop and `python -m avmae_jax.evaluate`:
`retrieval.Retrieval` (audio<->video R@K) and `classification.Classification` (mAP,
accuracy, with frame averaging), the metrics they compute (`metrics`), and what they share
(`common`: one pass of batches on the mesh, shape checks, `EvaluationError`).
"""
