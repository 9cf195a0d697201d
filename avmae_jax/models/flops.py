"""Analytic FLOP counts of the models, for throughput and MFU reporting.

Counts matrix-multiply FLOPs only (2 per multiply-add), the convention MFU uses; norms,
softmax and elementwise work are left out. A transformer block of width D, MLP ratio r
over N tokens costs
    (8 + 4r) * N * D^2      (qkv 6ND^2, output projection 2ND^2, MLP 4rND^2)
  + 4 * N^2 * D             (scores QK^T and the weighted sum AV)
A training step costs 3x the forward pass (the backward pass is about twice the forward);
a self-training step (MAViL stage 2) adds one forward pass of the teacher (no backward).
Each model counts its own forward pass (`forward_flops`, `teacher_flops`) with the
helpers here.
"""

TRAIN_TO_FORWARD = 3


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
  return (8 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width


def patch_embed_flops(width: int, values_per_token: int, tokens: int) -> int:
  """A patch projection: `tokens` patches of `values_per_token` inputs -> `width`."""
  return 2 * width * values_per_token * tokens


def forward_flops(model, mode: str = "multimodal") -> float:
  """Matmul FLOPs of one sample's forward pass (pretraining loss, or fine-tuning logits)."""
  return model.forward_flops(mode)


def teacher_flops(model) -> float:
  """The frozen teacher's forward pass per sample in a self-training step; else 0."""
  return model.teacher_flops()


def train_flops(model, mode: str = "multimodal") -> float:
  return TRAIN_TO_FORWARD * forward_flops(model, mode) + teacher_flops(model)
