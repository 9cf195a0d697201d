"""Analytic FLOP counts of the models, for throughput and MFU reporting.

Counts matrix-multiply FLOPs only (2 per multiply-add), the convention MFU uses; norms,
softmax and elementwise work are left out. A transformer block of width D, MLP ratio r
over N tokens costs
    (8 + 4r) * N * D^2      (qkv 6ND^2, output projection 2ND^2, MLP 4rND^2)
  + 4 * N^2 * D             (scores QK^T and the weighted sum AV)
A training step costs 3x the forward pass (the backward pass is about twice the forward).
"""

from avmae_jax.models import masking
from avmae_jax.models.cav_mae import CAVMAE, CAVMAEFT

TRAIN_TO_FORWARD = 3


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
  return (8 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width


def _patch_embed(model, tokens_a, tokens_v) -> float:
  p2 = model.patch_size ** 2
  return 2 * model.embed_dim * p2 * (tokens_a + model.in_chans * tokens_v)


def forward_flops(model, mode: str = "multimodal") -> float:
  """Matmul FLOPs of one sample's forward pass (pretraining loss, or fine-tuning logits)."""
  d, r = model.embed_dim, model.mlp_ratio
  la, lv = model.num_audio_tokens, model.num_video_tokens
  if isinstance(model, CAVMAE):
    ka = masking.num_kept(la, model.mask_ratio_a)
    kv = masking.num_kept(lv, model.mask_ratio_v)
    flops = _patch_embed(model, la, lv)
    flops += model.modality_specific_depth * (block_flops(ka, d, r) + block_flops(kv, d, r))
    flops += model.shared_depth * block_flops(ka + kv, d, r)
    if model.contrast_loss_weight != 0:
      contrast_depth = model.shared_depth if model.chain_shared_blocks_in_contrast else 1
      flops += contrast_depth * (block_flops(ka, d, r) + block_flops(kv, d, r))
    if model.mae_loss_weight != 0:
      dd, p2 = model.decoder_embed_dim, model.patch_size ** 2
      flops += 2 * (ka + kv) * d * dd
      flops += model.decoder_depth * block_flops(la + lv, dd, r)
      flops += 2 * dd * p2 * (la + model.in_chans * lv)
    return float(flops)
  if isinstance(model, CAVMAEFT):
    use_a = mode in ("multimodal", "audioonly", "missingaudioonly")
    use_v = mode in ("multimodal", "videoonly", "missingvideoonly")
    n_a, n_v = la * use_a, lv * use_v
    flops = _patch_embed(model, n_a, n_v)
    flops += model.modality_specific_depth * (block_flops(n_a, d, r) + block_flops(n_v, d, r))
    shared_passes = 2 if mode.startswith("missing") else 1
    flops += shared_passes * model.shared_depth * block_flops(n_a + n_v, d, r)
    return float(flops + 2 * d * model.num_classes)
  raise TypeError(f"no FLOP formula for {type(model).__name__}")


def train_flops(model, mode: str = "multimodal") -> float:
  return TRAIN_TO_FORWARD * forward_flops(model, mode)
