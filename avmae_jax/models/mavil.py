"""MAViL in Flax: `MAViL` (pretraining, stage 1 and stage 2) and the encoder `MAViLFT` shares.

The numerical contract is the project spec mavil.md; where the authors' inference code (the
AV-SUPERB port, `upstream_models/mavil`) fixes something, we follow it, so that its released
fine-tuned checkpoint loads strictly into `MAViLFT`:
  * parameter names are its (AudioMAE / timm) names: the audio encoder is `patch_embed`,
    `cls_token`, `pos_embed`, `blocks_<i>`; the video encoder `patch_embed_v`, `cls_token_v`,
    `pos_embed_v`, `blocks_v_<i>`; the fusion encoder `blocks_av_<i>`; the fine-tuning heads
    `fc_norm_av`/`head_av` (audio+video) and `fc_norm_a`/`head_a`, `fc_norm_v`/`head_v`;
  * a cls token per modality, added after masking with its position row (a zero row first in
    each position table); it attends, is fused, but is never pooled, masked or predicted;
  * audio is AudioMAE's layout: the spectrogram [T, F] is the image (height = time), so tokens
    are TIME-major, k = t*(F/16) + f on a (T/16, F/16) = (64, 8) grid, and reconstruction
    targets have inner order (time, freq) (CAV-MAE is frequency-major; mavil.md's "8x64
    grid" is these 512 tokens, which the inference code orders time-major);
  * video [B, N, H, W, 3] (N frames, NHWC each) goes through 2x16x16 tubelets, tokens
    row-major over (t, h, w), 3-D sin-cos positions (a quarter of the width for time);
  * ViT blocks are timm's (norm1, attn, norm2, mlp), LayerNorm eps 1e-6, no final encoder norm.
What the authors never released (pretraining) follows the spec's "our defaults", each a
field; the decisions this file adds are documented where they are made (MAViL docstring).

Masking is static-shape (masking.py) from noise drawn from the "masking" rng stream or passed
in. Parameters carry logical axis names (layers.py) so `avmae_jax.parallel.rules` applies.

Also here, next to the models: their size presets, what the rest of the code asks of them
(models/common.py; for stage 2 the teacher: which model may teach, which of its parameters
make the targets), and the model config a reference state dict describes (`reference_config`).
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax.models import common
from avmae_jax.models import flops
from avmae_jax.models import layers
from avmae_jax.models import losses
from avmae_jax.models import masking

STAGES = (1, 2)
# The scalars MAViL.__call__ returns that a training run logs.
PRETRAIN_METRICS = ("loss", "loss_rec_a", "loss_rec_v", "loss_inter", "loss_intra_a",
                    "loss_intra_v", "acc_inter", "acc_intra_a", "acc_intra_v")
ENCODER_POS_EMBED_NAMES = ("pos_embed", "pos_embed_v")
DECODER_POS_EMBED_NAMES = ("decoder_pos_embed", "decoder_pos_embed_v")
# A 12-layer ViT per modality, 2 fusion layers (3 when fine-tuning, as in the released
# model: `MAViLFT.size_fields`), decoders 8 x 512. `tiny` keeps the real input sizes
# (1024x128 audio, 8 frames of 224x224); widths are multiples of 16 (3-D sin-cos tables).
SIZES = {
    "base": dict(embed_dim=768, num_heads=12, encoder_depth=12, fusion_depth=2,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=128, num_heads=2, encoder_depth=2, fusion_depth=1,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
}
# Stage 2: what a teacher shares with its student (inputs and feature width), and the
# teacher parameters the targets never touch (decoders and the final norm).
_TEACHER_FIELDS = ("audio_length", "num_mel_bins", "img_size", "num_frames", "tubelet_size",
                   "patch_size", "in_chans", "embed_dim")
_TEACHER_UNUSED = ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred")
_TEACHER_UNUSED_EXACT = ("norm",)


class MAViLEncoder(common.AVModel):
  """Patch embeddings, cls tokens, position tables, per-modality ViTs and the fusion blocks."""
  num_frames: int = 8
  tubelet_size: int = 2
  encoder_depth: int = 12
  fusion_depth: int = 2
  norm_eps: float = 1e-6  # timm's ViT

  # Tables [1, 1 + T * F, D]: a cls row, then time-major (audio_grid); the decoder's too.
  audio_position_tables = ("pos_embed", "decoder_pos_embed")
  position_cls_rows = 1
  audio_time_axis = 0

  sizes = SIZES

  @property
  def _fusion_layers(self) -> int:
    """Fusion blocks this model runs (lr-decay layer ids count them)."""
    return self.fusion_depth

  def lr_layers(self) -> common.LrLayers:
    return common.lr_layers_from_patterns(
        r"^(patch_embed|cls_token|pos_embed)", r"^blocks_(?:v_)?(\d+)/", r"^blocks_av_(\d+)/",
        self.encoder_depth, self._fusion_layers)

  def _patch_embed_flops(self, use_a: bool = True, use_v: bool = True) -> float:
    return flops.patch_embed_flops(
        self.embed_dim, self.patch_size ** 2,
        self.num_audio_tokens * use_a
        + self.tubelet_size * self.in_chans * self.num_video_tokens * use_v)

  def _encoder_flops(self) -> float:
    """Unmasked ViTs (cls included) and the fusion blocks: a teacher's forward pass."""
    d, r = self.embed_dim, self.mlp_ratio
    la, lv = self.num_audio_tokens + 1, self.num_video_tokens + 1
    total = self._patch_embed_flops()
    total += self.encoder_depth * (flops.block_flops(la, d, r) + flops.block_flops(lv, d, r))
    return float(total + self.fusion_depth * flops.block_flops(la + lv, d, r))

  @property
  def audio_grid(self) -> tuple[int, int]:
    """Token grid (time rows, frequency columns) of the spectrogram."""
    return self.audio_length // self.patch_size, self.num_mel_bins // self.patch_size

  @property
  def video_grid(self) -> tuple[int, int, int]:
    """Token grid (time, rows, columns) of the clip."""
    side = self.img_size // self.patch_size
    return self.num_frames // self.tubelet_size, side, side

  @property
  def num_video_tokens(self) -> int:
    t, h, w = self.video_grid
    return t * h * w

  def input_shapes(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Shapes of (audio, frames) this model takes."""
    return (jax.ShapeDtypeStruct((batch, self.audio_length, self.num_mel_bins), jnp.float32),
            jax.ShapeDtypeStruct((batch, self.num_frames, self.img_size, self.img_size,
                                  self.in_chans), jnp.float32))

  def check_geometry(self):
    p = self.patch_size
    for name in ("img_size", "audio_length", "num_mel_bins"):
      if getattr(self, name) % p:
        raise ValueError(f"{name}={getattr(self, name)} is not a multiple of patch_size={p}")
    if self.num_frames % self.tubelet_size:
      raise ValueError(f"num_frames={self.num_frames} is not a multiple of "
                       f"tubelet_size={self.tubelet_size}")
    if self.embed_dim % 16:
      raise ValueError(f"embed_dim={self.embed_dim} must be a multiple of 16 "
                       "(3-D sin-cos positions: a quarter for time, 3/8 per spatial axis)")

  def _block(self, dim, heads, name, drop_path: float = 0.0):
    return self.make_block(dim, heads, name, modality_norms=False, drop_path=drop_path)

  def pos_table(self, name: str, width: int, axis: str, video: bool):
    """A [1, 1 + L, width] fixed sin-cos position parameter with a zero cls row first."""
    if video:
      table = lambda d: layers.sincos_3d(d, *self.video_grid)
      length = self.num_video_tokens
    else:
      table = lambda d: layers.sincos_2d(d, *self.audio_grid)
      length = self.num_audio_tokens
    init = nn.with_logical_partitioning(layers.table_init(table, cls_row=True),
                                        (None, "length", axis))
    return self.param(name, init, (1, 1 + length, width))

  def setup_encoder(self, with_fusion: bool = True, drop_path_rate: float = 0.0):
    """Creates the encoder; stochastic depth rises linearly from 0 at the first block to
    `drop_path_rate` at the last block a token passes (the last fusion block, or the last
    ViT block without fusion), timm's per-depth rule over each modality's path."""
    self.check_geometry()
    d, p = self.embed_dim, self.patch_size
    depth = self.encoder_depth + (self.fusion_depth if with_fusion else 0)
    rates = [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]
    token = nn.with_logical_partitioning(layers.token_init(), (None, None, "embed"))
    self.patch_embed = layers.PatchEmbed(d, p, self.dtype)
    self.cls_token = self.param("cls_token", token, (1, 1, d))
    self.pos_embed = self.pos_table("pos_embed", d, "embed", video=False)
    self.blocks = [self._block(d, self.num_heads, f"blocks_{i}", rates[i])
                   for i in range(self.encoder_depth)]
    self.patch_embed_v = layers.PatchEmbed3D(d, self.tubelet_size, p, self.dtype)
    self.cls_token_v = self.param("cls_token_v", token, (1, 1, d))
    self.pos_embed_v = self.pos_table("pos_embed_v", d, "embed", video=True)
    self.blocks_v = [self._block(d, self.num_heads, f"blocks_v_{i}", rates[i])
                     for i in range(self.encoder_depth)]
    if with_fusion:
      self.blocks_av = [
          self._block(d, self.num_heads, f"blocks_av_{i}", rates[self.encoder_depth + i])
          for i in range(self.fusion_depth)]

  def check_inputs(self, audio: Optional[jax.Array], frames: Optional[jax.Array]):
    self.check_audio(audio)
    want_v = (self.num_frames, self.img_size, self.img_size, self.in_chans)
    if frames is not None and (frames.ndim != 5 or frames.shape[1:] != want_v):
      raise ValueError(f"frames must be [batch, {', '.join(map(str, want_v))}] "
                       f"(frames, height, width, channels), got {tuple(frames.shape)}")
    if audio is not None and frames is not None and audio.shape[0] != frames.shape[0]:
      raise ValueError(f"audio batch {audio.shape[0]} != frames batch {frames.shape[0]}")

  def embed_audio(self, audio: jax.Array) -> jax.Array:
    """[B, T, F] -> [B, La, D] patch tokens (time-major) plus their positions (no cls)."""
    x = self.patch_embed(audio[..., None].astype(self.dtype))
    return x + self._pos(self.pos_embed)[:, 1:]

  def embed_video(self, frames: jax.Array) -> jax.Array:
    """[B, N, H, W, C] -> [B, Lv, D] tubelet tokens plus their positions (no cls)."""
    x = self.patch_embed_v(frames.astype(self.dtype))
    return x + self._pos(self.pos_embed_v)[:, 1:]

  def with_cls(self, tokens: jax.Array, modality: str) -> jax.Array:
    """Prepends the modality's cls token (plus its position row, zero in the sin-cos table)."""
    cls, pos = ((self.cls_token, self.pos_embed) if modality == "a"
                else (self.cls_token_v, self.pos_embed_v))
    cls = (cls + self._pos(pos)[:, :1]).astype(tokens.dtype)
    cls = jnp.broadcast_to(cls, (tokens.shape[0], 1, tokens.shape[-1]))
    return jnp.concatenate([cls, tokens], axis=1)

  def encode_unmasked(self, audio: Optional[jax.Array], frames: Optional[jax.Array]):
    """Each modality's ViT on all its tokens: ([B, 1+La, D] or None, [B, 1+Lv, D] or None)."""
    self.check_inputs(audio, frames)
    a = v = None
    if audio is not None:
      a = self.run(self.blocks, self.with_cls(self.embed_audio(audio), "a"))
    if frames is not None:
      v = self.run(self.blocks_v, self.with_cls(self.embed_video(frames), "v"))
    return a, v

  def fuse(self, a: jax.Array, v: jax.Array) -> jax.Array:
    """The fusion encoder over [audio tokens ; video tokens] (cls tokens included)."""
    return self.run(self.blocks_av, jnp.concatenate([a, v], axis=1))

  def forward_feat(self, audio: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unimodal features: each ViT's output patch tokens (no cls), [B, La, D], [B, Lv, D].

    Neither modality sees the other here (unlike `fusion_feat`), so these are the vectors
    for cross-modal retrieval.
    """
    a, v = self.encode_unmasked(audio, frames)
    return a[:, 1:], v[:, 1:]

  def fusion_feat(self, audio: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The fusion encoder's outputs at the audio and video patch tokens (no cls), unmasked."""
    a, v = self.encode_unmasked(audio, frames)
    x = self.fuse(a, v)
    na = a.shape[1]
    return x[:, 1:na], x[:, na + 1:]


class MAViL(MAViLEncoder):
  """The pretraining model; `stage` 1 (reconstruction + contrast) or 2 (self-training).

  Decisions beyond the spec (the authors' pretraining code is unreleased):
  * encoder outputs for the contrastive terms are the ViT outputs (no norm; the inference
    code has none) mean-pooled over the visible patch tokens (cls excluded);
  * the fusion encoder's output goes through `norm` (affine LayerNorm, as an MAE encoder
    ends) and then into two separate decoders, each AudioMAE-style: `decoder_embed`,
    mask tokens put back by `ids_restore`, fixed sin-cos `decoder_pos_embed` (cls row
    included), blocks, `decoder_norm`, `decoder_pred` (video: the same names with `_v`);
  * intra-modal contrast needs two maskings of each clip: the patch tokens are embedded
    once, stacked twice on the batch axis ([view 1 ; view 2], 2B rows) and masked with
    2B independent noise rows in ONE pass through each ViT. Only view 1 continues through
    the fusion encoder and decoders (reconstruction and the inter-modal term use view 1);
    view 2 costs only the (mostly masked) ViTs. With the intra weight 0 (or the contrastive
    terms off in stage 2) there is one view;
  * stage 2 targets: the teacher's fusion-encoder outputs (before `norm`) at the patch
    tokens, LayerNorm without affine (eps `norm_eps`); the decoders then predict
    `embed_dim` values per token instead of pixels, and the loss is the mean over masked
    tokens of the per-token mean squared error.

  Call: `apply({"params": p}, audio, frames, rngs={"masking": key})` (stage 1) or with
  `teacher_targets=compute_teacher_targets(teacher, teacher_params, audio, frames)`
  (stage 2). Explicit `noise_a` [V*B, La] / `noise_v` [V*B, Lv] (V = `num_views`, rows
  [view 1 ; view 2]) replace the drawn noise, for exact comparisons.
  """
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  stage: int = 1
  norm_pix_loss: bool = True
  mask_ratio_a: float = 0.8
  mask_ratio_v: float = 0.9
  contrast_temperature: float = 0.1
  inter_contrast_weight: float = 0.01
  intra_contrast_weight: float = 0.01
  # Stage 2: also optimise the stage-1 contrastive terms (same weights) next to the MSE.
  stage2_contrastive: bool = True

  kind = "mavil"
  metric_names = PRETRAIN_METRICS

  def frozen_param_names(self) -> tuple[str, ...]:
    if self.trainable_pos_embed:
      return ()
    return ENCODER_POS_EMBED_NAMES + DECODER_POS_EMBED_NAMES

  def forward_flops(self, mode: str = "multimodal") -> float:
    """The patch embeddings once per clip (the views share them), both ViTs on each masked
    view (kept tokens + cls), fusion and the two decoders on view 1."""
    del mode
    d, r = self.embed_dim, self.mlp_ratio
    la, lv = self.num_audio_tokens, self.num_video_tokens
    ka = masking.num_kept(la, self.mask_ratio_a)
    kv = masking.num_kept(lv, self.mask_ratio_v)
    total = self._patch_embed_flops()
    total += self.num_views * self.encoder_depth * (flops.block_flops(ka + 1, d, r)
                                                    + flops.block_flops(kv + 1, d, r))
    total += self.fusion_depth * flops.block_flops(ka + kv + 2, d, r)
    dd, p2 = self.decoder_embed_dim, self.patch_size ** 2
    if self.stage == 1:
      out_a, out_v = p2, self.tubelet_size * p2 * self.in_chans
    else:
      out_a = out_v = d
    for kept, length, out in ((ka, la, out_a), (kv, lv, out_v)):
      total += 2 * (kept + 1) * d * dd  # decoder_embed
      total += self.decoder_depth * flops.block_flops(length + 1, dd, r)
      total += 2 * length * dd * out  # decoder_pred (cls dropped first)
    return float(total)

  # -- Stage 2: the teacher (tasks/self_training.py owns the rest) ------------------------

  @property
  def needs_teacher(self) -> bool:
    return self.stage == 2

  def teacher_flops(self) -> float:
    return self._encoder_flops() if self.needs_teacher else 0.0

  def check_teacher(self, teacher: nn.Module) -> None:
    """Raises ValueError unless `teacher` can make this model's targets: a MAViL
    pretraining model (stage 1 or 2) with the same inputs and feature width."""
    if not isinstance(teacher, MAViL):
      raise ValueError(f"config.teacher must be a MAViL pretraining model (kind 'mavil'), "
                       f"got kind {getattr(teacher, 'kind', type(teacher).__name__)!r}")
    bad = [f"{name} (teacher {getattr(teacher, name)}, student {getattr(self, name)})"
           for name in _TEACHER_FIELDS if getattr(teacher, name) != getattr(self, name)]
    if bad:
      raise ValueError(f"config.teacher does not fit the student: {', '.join(bad)} differ")

  @staticmethod
  def teacher_subset(params: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher parameters the targets use: all but its decoders and final norm (its
    submodules, so absent parameters are never looked up)."""
    return {k: v for k, v in params.items()
            if not k.startswith(_TEACHER_UNUSED) and k not in _TEACHER_UNUSED_EXACT}

  @staticmethod
  def describe_teacher(teacher: "MAViL") -> tuple[str, dict[str, Any]]:
    """(a few words, the fields the run's teacher record keeps) of a teacher."""
    return f"MAViL stage {teacher.stage}", {"teacher_stage": teacher.stage}

  def stand_in_teacher(self) -> "MAViL":
    """A teacher of this model's architecture (stage 1), for benchmarks: a step's cost
    does not depend on the teacher's values."""
    return self.clone(stage=1)

  @staticmethod
  def targets_from(teacher: "MAViL", teacher_params: Any, audio: jax.Array,
                   frames: jax.Array) -> dict[str, jax.Array]:
    """`compute_teacher_targets`: what `__call__` takes as `teacher_targets`."""
    return compute_teacher_targets(teacher, teacher_params, audio, frames)

  @property
  def contrastive(self) -> bool:
    return self.stage == 1 or self.stage2_contrastive

  @property
  def num_views(self) -> int:
    """Maskings per clip in one step: 2 when the intra-modal term is on, else 1."""
    return 2 if self.contrastive and self.intra_contrast_weight != 0 else 1

  def setup(self):
    if self.stage not in STAGES:
      raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
    if self.decoder_embed_dim % 16:
      raise ValueError(f"decoder_embed_dim={self.decoder_embed_dim} must be a multiple of 16 "
                       "(3-D sin-cos positions of the video decoder)")
    self.setup_encoder()
    for field, length in (("mask_ratio_a", self.num_audio_tokens),
                          ("mask_ratio_v", self.num_video_tokens)):
      if masking.num_kept(length, getattr(self, field)) < 1:
        raise ValueError(f"{field}={getattr(self, field)} keeps no token of {length}")
    self.norm = layers.layer_norm("norm", self.norm_eps)
    dd, p = self.decoder_embed_dim, self.patch_size
    if self.stage == 1:
      out_a, out_v = p * p, self.tubelet_size * p * p * self.in_chans
    else:
      out_a = out_v = self.embed_dim
    token = nn.with_logical_partitioning(layers.token_init(), (None, None, "decoder_embed"))
    for suffix, out, video in (("", out_a, False), ("_v", out_v, True)):
      setattr(self, f"decoder_embed{suffix}", layers.dense(
          dd, ("embed", "decoder_embed"), self.dtype, f"decoder_embed{suffix}"))
      setattr(self, f"mask_token{suffix}",
              self.param(f"mask_token{suffix}", token, (1, 1, dd)))
      setattr(self, f"decoder_pos_embed{suffix}", self.pos_table(
          f"decoder_pos_embed{suffix}", dd, "decoder_embed", video=video))
      setattr(self, f"decoder_blocks{suffix}", [
          self._block(dd, self.decoder_num_heads, f"decoder_blocks{suffix}_{i}")
          for i in range(self.decoder_depth)])
      setattr(self, f"decoder_norm{suffix}",
              layers.layer_norm(f"decoder_norm{suffix}", self.norm_eps))
      setattr(self, f"decoder_pred{suffix}", layers.dense(
          out, ("decoder_embed", "patch_out"), self.dtype, f"decoder_pred{suffix}"))

  def draw_noise(self, batch: int) -> tuple[jax.Array, jax.Array]:
    """Masking noise [V*B, La], [V*B, Lv] from the "masking" rng stream; rows independent."""
    key_a, key_v = jax.random.split(self.make_rng("masking"))
    n = self.num_views * batch
    return (jax.random.uniform(key_a, (n, self.num_audio_tokens)),
            jax.random.uniform(key_v, (n, self.num_video_tokens)))

  def encode_masked(self, audio, frames, noise_a, noise_v):
    """Both ViTs on V masked views: (a [V*B, 1+ka, D], v [V*B, 1+kv, D], Masked a, Masked v)."""
    views = self.num_views
    a = jnp.concatenate([self.embed_audio(audio)] * views, axis=0)
    v = jnp.concatenate([self.embed_video(frames)] * views, axis=0)
    for name, noise, tokens in (("noise_a", noise_a, a), ("noise_v", noise_v, v)):
      if noise.shape != tokens.shape[:2]:
        raise ValueError(f"{name} must be [{views} views x batch {audio.shape[0]}, "
                         f"{tokens.shape[1]}] = {tokens.shape[:2]}, got {tuple(noise.shape)}")
    ma = masking.apply_noise_mask(a, noise_a, self.mask_ratio_a)
    mv = masking.apply_noise_mask(v, noise_v, self.mask_ratio_v)
    a = self.run(self.blocks, self.with_cls(ma.kept, "a"))
    v = self.run(self.blocks_v, self.with_cls(mv.kept, "v"))
    return a, v, ma, mv

  def decode(self, x: jax.Array, ids_restore: jax.Array, modality: str) -> jax.Array:
    """One modality's decoder: [B, 1+keep, D] fused tokens -> [B, L, out] per-token outputs."""
    s = "" if modality == "a" else "_v"
    x = getattr(self, f"decoder_embed{s}")(x)
    b, n, dd = x.shape
    total = ids_restore.shape[1]
    fill = jnp.broadcast_to(getattr(self, f"mask_token{s}").astype(x.dtype),
                            (b, total - (n - 1), dd))
    # Kept tokens are in shuffle order; appending mask tokens and gathering by ids_restore
    # puts every token back at its position. The cls token stays in front.
    body = jnp.take_along_axis(jnp.concatenate([x[:, 1:], fill], axis=1),
                               ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], body], axis=1)
    x = x + self._pos(getattr(self, f"decoder_pos_embed{s}"))
    x = self.run(getattr(self, f"decoder_blocks{s}"), x)
    x = getattr(self, f"decoder_norm{s}")(x)
    return getattr(self, f"decoder_pred{s}")(x[:, 1:])

  def teacher_targets(self, audio: jax.Array, frames: jax.Array) -> dict[str, jax.Array]:
    """Stage-2 targets from this model as the teacher (unmasked inputs, no gradient).

    {"audio": [B, La, D], "video": [B, Lv, D]}: the fusion encoder's outputs at the patch
    tokens, each LayerNorm-ed without affine. Use through `compute_teacher_targets`.
    """
    a, v = self.fusion_feat(audio, frames)
    return {"audio": jax.lax.stop_gradient(losses.layer_norm_no_affine(a, self.norm_eps)),
            "video": jax.lax.stop_gradient(losses.layer_norm_no_affine(v, self.norm_eps))}

  def _check_targets(self, targets, batch: int):
    if not isinstance(targets, dict) or set(targets) != {"audio", "video"}:
      raise ValueError("teacher_targets must be {'audio': [B, La, D], 'video': [B, Lv, D]} "
                       "(see compute_teacher_targets)")
    for key, length in (("audio", self.num_audio_tokens), ("video", self.num_video_tokens)):
      want = (batch, length, self.embed_dim)
      if targets[key].shape != want:
        raise ValueError(f"teacher_targets[{key!r}] must be {want}, "
                         f"got {tuple(targets[key].shape)}")

  def __call__(self, audio: jax.Array, frames: jax.Array,
               noise_a: Optional[jax.Array] = None, noise_v: Optional[jax.Array] = None,
               teacher_targets: Optional[dict[str, jax.Array]] = None
               ) -> dict[str, jax.Array]:
    """Pretraining forward: losses (scalars), masks and predictions of view 1.

    Returns loss (the weighted total), loss_rec_a / loss_rec_v (stage 1: MSE to normalised
    patches; stage 2: MSE to the teacher targets), loss_inter, loss_intra_a, loss_intra_v
    (unweighted InfoNCE; 0 when off), acc_inter, acc_intra_a, acc_intra_v (top-1 accuracy of
    the similarity matrix, both directions averaged), mask_a [B, La], mask_v [B, Lv]
    (1 = removed), pred_a, pred_v. Total:
      loss = rec_a + rec_v + w_inter * inter + w_intra * (intra_a + intra_v).
    """
    self.check_inputs(audio, frames)
    b = audio.shape[0]
    if self.stage == 1 and teacher_targets is not None:
      raise ValueError("teacher_targets are for stage 2; this model has stage=1")
    if self.stage == 2:
      if teacher_targets is None:
        if not self.is_initializing():
          raise ValueError("stage 2 needs teacher_targets (see compute_teacher_targets)")
        teacher_targets = {
            "audio": jnp.zeros((b, self.num_audio_tokens, self.embed_dim), jnp.float32),
            "video": jnp.zeros((b, self.num_video_tokens, self.embed_dim), jnp.float32)}
      self._check_targets(teacher_targets, b)
    if noise_a is None or noise_v is None:
      drawn_a, drawn_v = self.draw_noise(b)
      noise_a = drawn_a if noise_a is None else noise_a
      noise_v = drawn_v if noise_v is None else noise_v

    a, v, ma, mv = self.encode_masked(audio, frames, noise_a, noise_v)
    # View 1 (the first B rows) through fusion, `norm` and the two decoders.
    x = self.norm(self.fuse(a[:b], v[:b]))
    na = a.shape[1]
    pred_a = self.decode(x[:, :na], ma.ids_restore[:b], "a")
    pred_v = self.decode(x[:, na:], mv.ids_restore[:b], "v")
    mask_a, mask_v = ma.mask[:b], mv.mask[:b]
    if self.stage == 1:
      target_a = losses.patchify(audio[..., None], self.patch_size)
      target_v = losses.patchify_video(frames, self.tubelet_size, self.patch_size)
      rec_a = losses.mae_loss(pred_a, target_a, mask_a, self.norm_pix_loss)
      rec_v = losses.mae_loss(pred_v, target_v, mask_v, self.norm_pix_loss)
    else:
      target_a = jax.lax.stop_gradient(teacher_targets["audio"])
      target_v = jax.lax.stop_gradient(teacher_targets["video"])
      rec_a = losses.mae_loss(pred_a, target_a, mask_a, norm_pix_loss=False)
      rec_v = losses.mae_loss(pred_v, target_v, mask_v, norm_pix_loss=False)

    zero = jnp.zeros((), jnp.float32)
    out = {"loss_rec_a": rec_a, "loss_rec_v": rec_v, "mask_a": mask_a, "mask_v": mask_v,
           "pred_a": pred_a, "pred_v": pred_v,
           "loss_inter": zero, "acc_inter": zero, "loss_intra_a": zero, "acc_intra_a": zero,
           "loss_intra_v": zero, "acc_intra_v": zero}
    # Mean over visible patch tokens (cls excluded) of each ViT's output, per view.
    rep_a, rep_v = a[:, 1:].mean(axis=1), v[:, 1:].mean(axis=1)
    t = self.contrast_temperature
    if self.contrastive and self.inter_contrast_weight != 0:
      out["loss_inter"], out["acc_inter"] = losses.contrastive_loss(
          rep_a[:b], rep_v[:b], t, bidirectional=True)
    if self.num_views == 2:
      out["loss_intra_a"], out["acc_intra_a"] = losses.contrastive_loss(
          rep_a[:b], rep_a[b:], t, bidirectional=True)
      out["loss_intra_v"], out["acc_intra_v"] = losses.contrastive_loss(
          rep_v[:b], rep_v[b:], t, bidirectional=True)
    out["loss"] = (rec_a + rec_v + self.inter_contrast_weight * out["loss_inter"]
                   + self.intra_contrast_weight * (out["loss_intra_a"] + out["loss_intra_v"]))
    return out


def compute_teacher_targets(teacher: MAViL, teacher_params: Any, audio: jax.Array,
                            frames: jax.Array) -> dict[str, jax.Array]:
  """Stage-2 targets: `teacher` (the module its params were trained as, e.g. the stage-1
  MAViL; same encoder architecture as the student) on unmasked inputs, no gradient flowing
  to `teacher_params`."""
  targets = teacher.apply({"params": jax.lax.stop_gradient(teacher_params)}, audio, frames,
                          method=teacher.teacher_targets)
  return jax.tree.map(jax.lax.stop_gradient, targets)


def reference_config(state_dict: Mapping[str, Any], source: str = "state dict"
                     ) -> Optional[dict[str, Any]]:
  """The model config (kinds mavil and mavil_ft) of a MAViL state dict in the reference
  layout, None if it is not one (no 5-D `patch_embed_v.proj.weight`).

  Shapes give the token counts, not the input sizes; like the reference, we assume 128 mel
  bins (so audio_length = tokens / 8 * 16) and 224x224 frames (so num_frames = video tokens
  / 196 * tubelet). Other input sizes: pass them as overrides. Head counts follow the ViT
  convention (head_dim 64 in the encoder, 32 in the decoder).
  """
  video_patches = state_dict.get("patch_embed_v.proj.weight")
  if video_patches is None or len(video_patches.shape) != 5:
    return None

  def shape(key):
    if key not in state_dict:
      raise common.CheckpointError(f"{source}: not a MAViL state dict (no {key})")
    return tuple(state_dict[key].shape)

  embed_dim, in_chans, tubelet, patch, _ = shape("patch_embed_v.proj.weight")
  n_audio, n_video = shape("pos_embed")[1] - 1, shape("pos_embed_v")[1] - 1
  mel_cols, side = 128 // patch, 224 // patch
  if n_audio % mel_cols or n_video % (side * side):
    raise common.CheckpointError(
        f"{source}: {n_audio} audio / {n_video} video tokens do not fit 128 mel bins and "
        f"224x224 frames with patch {patch}; pass the input sizes as overrides")
  cfg = dict(
      img_size=side * patch, num_frames=n_video // (side * side) * tubelet,
      tubelet_size=tubelet, audio_length=n_audio // mel_cols * patch,
      num_mel_bins=mel_cols * patch, patch_size=patch, in_chans=in_chans,
      embed_dim=embed_dim, num_heads=max(1, embed_dim // 64),
      encoder_depth=common.count_blocks(state_dict, r"blocks\.(\d+)\."),
      mlp_ratio=shape("blocks.0.mlp.fc1.weight")[0] / embed_dim)
  fusion_depth = common.count_blocks(state_dict, r"blocks_av\.(\d+)\.")
  if "head_av.weight" in state_dict or "head_a.weight" in state_dict:
    has_av, has_uni = "head_av.weight" in state_dict, "head_a.weight" in state_dict
    heads = "all" if has_av and has_uni else ("multimodal" if has_av else "unimodal")
    classes = shape("head_av.weight" if has_av else "head_a.weight")[0]
    if has_av:
      cfg["fusion_depth"] = fusion_depth
    return dict(kind="mavil_ft", num_classes=classes, heads=heads, **cfg)
  decoder_dim, _ = shape("decoder_embed.weight")
  out_a, out_v = shape("decoder_pred.weight")[0], shape("decoder_pred_v.weight")[0]
  if out_a == patch * patch and out_v == tubelet * patch * patch * in_chans:
    stage = 1
  elif out_a == out_v == embed_dim:
    stage = 2
  else:
    raise common.CheckpointError(
        f"{source}: decoder_pred / decoder_pred_v output {out_a} / {out_v} values, neither "
        f"pixels (stage 1) nor features {embed_dim} (stage 2)")
  return dict(kind="mavil", stage=stage, fusion_depth=fusion_depth,
              decoder_embed_dim=decoder_dim,
              decoder_depth=common.count_blocks(state_dict, r"decoder_blocks\.(\d+)\."),
              decoder_num_heads=max(1, decoder_dim // 32), **cfg)
