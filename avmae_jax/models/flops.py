"""Analytic FLOP counts of the models, for throughput and MFU reporting.

Counts matrix-multiply FLOPs only (2 per multiply-add), the convention MFU uses; norms,
softmax and elementwise work are left out. A transformer block of width D, MLP ratio r
over N tokens costs
    (8 + 4r) * N * D^2      (qkv 6ND^2, output projection 2ND^2, MLP 4rND^2)
  + 4 * N^2 * D             (scores QK^T and the weighted sum AV)
A training step costs 3x the forward pass (the backward pass is about twice the forward);
a MAViL stage-2 step adds one forward pass of the teacher (no backward).
"""

from avmae_jax.models import masking
from avmae_jax.models.cav_mae import CAVMAE, CAVMAEFT
from avmae_jax.models.mavil import MAViL, MAViLFT

TRAIN_TO_FORWARD = 3


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
  return (8 + 4 * mlp_ratio) * tokens * width ** 2 + 4 * tokens ** 2 * width


def _patch_embed(model, tokens_a, tokens_v) -> float:
  p2 = model.patch_size ** 2
  return 2 * model.embed_dim * p2 * (tokens_a + model.in_chans * tokens_v)


def _mavil_patch_embed(model, use_a: bool = True, use_v: bool = True) -> float:
  p2 = model.patch_size ** 2
  return 2 * model.embed_dim * p2 * (
      model.num_audio_tokens * use_a
      + model.tubelet_size * model.in_chans * model.num_video_tokens * use_v)


def _mavil_forward(model, mode: str) -> float:
  """MAViL: the patch embeddings once per clip (the views share them), both ViTs on each
  masked view (kept tokens + cls), fusion and the two decoders on view 1; fine-tuning:
  unmasked ViTs, fusion for the multimodal head, the head."""
  d, r = model.embed_dim, model.mlp_ratio
  la, lv = model.num_audio_tokens, model.num_video_tokens
  if isinstance(model, MAViL):
    ka = masking.num_kept(la, model.mask_ratio_a)
    kv = masking.num_kept(lv, model.mask_ratio_v)
    flops = _mavil_patch_embed(model)
    flops += model.num_views * model.encoder_depth * (block_flops(ka + 1, d, r)
                                                      + block_flops(kv + 1, d, r))
    flops += model.fusion_depth * block_flops(ka + kv + 2, d, r)
    dd, p2 = model.decoder_embed_dim, model.patch_size ** 2
    if model.stage == 1:
      out_a, out_v = p2, model.tubelet_size * p2 * model.in_chans
    else:
      out_a = out_v = d
    for kept, length, out in ((ka, la, out_a), (kv, lv, out_v)):
      flops += 2 * (kept + 1) * d * dd  # decoder_embed
      flops += model.decoder_depth * block_flops(length + 1, dd, r)
      flops += 2 * length * dd * out  # decoder_pred (cls dropped first)
    return float(flops)
  use_a, use_v = mode != "videoonly", mode != "audioonly"
  n_a, n_v = (la + 1) * use_a, (lv + 1) * use_v
  flops = _mavil_patch_embed(model, use_a, use_v)
  flops += model.encoder_depth * (block_flops(n_a, d, r) + block_flops(n_v, d, r))
  if mode == "multimodal":
    flops += model.fusion_depth * block_flops(n_a + n_v, d, r)
    return float(flops + 2 * 2 * d * model.num_classes)
  return float(flops + 2 * d * model.num_classes)


def teacher_flops(model) -> float:
  """MAViL stage 2: the teacher's forward (unmasked ViTs and fusion) per sample; else 0."""
  if not (isinstance(model, MAViL) and model.stage == 2):
    return 0.0
  d, r = model.embed_dim, model.mlp_ratio
  la, lv = model.num_audio_tokens + 1, model.num_video_tokens + 1
  flops = _mavil_patch_embed(model)
  flops += model.encoder_depth * (block_flops(la, d, r) + block_flops(lv, d, r))
  return float(flops + model.fusion_depth * block_flops(la + lv, d, r))


def forward_flops(model, mode: str = "multimodal") -> float:
  """Matmul FLOPs of one sample's forward pass (pretraining loss, or fine-tuning logits)."""
  if isinstance(model, (MAViL, MAViLFT)):
    return _mavil_forward(model, mode)
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
  return TRAIN_TO_FORWARD * forward_flops(model, mode) + teacher_flops(model)
