"""MAViL in Flax: `MAViL` (pretraining, stage 1 and stage 2) and `MAViLFT` (fine-tuning).

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
in. Parameters carry logical axis names (layers.py) so `avmae_jax.sharding.RULES` applies.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax.models import layers
from avmae_jax.models import losses
from avmae_jax.models import masking

FT_MODES = ("multimodal", "audioonly", "videoonly")
FT_HEADS = ("multimodal", "unimodal", "all")
HEAD_MODES = {"multimodal": FT_MODES[:1], "unimodal": FT_MODES[1:], "all": FT_MODES}
STAGES = (1, 2)
# What the trainer logs from MAViL.__call__ (scalars only).
PRETRAIN_METRICS = ("loss", "loss_rec_a", "loss_rec_v", "loss_inter", "loss_intra_a",
                    "loss_intra_v", "acc_inter", "acc_intra_a", "acc_intra_v")
ENCODER_POS_EMBED_NAMES = ("pos_embed", "pos_embed_v")
DECODER_POS_EMBED_NAMES = ("decoder_pos_embed", "decoder_pos_embed_v")


class _Encoder(layers.TwoTowerEncoder):
  """Patch embeddings, cls tokens, position tables, per-modality ViTs and the fusion blocks."""
  num_frames: int = 8
  tubelet_size: int = 2
  encoder_depth: int = 12
  fusion_depth: int = 2
  norm_eps: float = 1e-6  # timm's ViT

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
    # Rematerialise blocks (recompute activations in the backward pass) to trade compute
    # for memory. MAViL's blocks take no modality argument, so nothing is static.
    cls = nn.remat(layers.Block) if self.remat else layers.Block
    return cls(dim, heads, self.mlp_ratio, self.norm_eps, self.dtype, modality_norms=False,
               drop_path=drop_path, name=name)

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

  @staticmethod
  def run(blocks, x):
    for block in blocks:
      x = block(x)
    return x

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


class MAViL(_Encoder):
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


class MAViLFT(_Encoder):
  """The fine-tuning model: unmasked encoders, mean pooling, LayerNorm + Linear heads.

  `heads` picks the parameters: "multimodal" (the released audio+video model: fusion blocks
  `blocks_av` (3, one more than pretraining), mean-pool audio and video patch tokens of the
  fusion output separately, concat [2D], `fc_norm_av`, `head_av`), "unimodal" (no fusion;
  each ViT's patch tokens mean-pooled, `fc_norm_a`/`head_a` and `fc_norm_v`/`head_v`), or
  "all" (both sets, every mode callable). Call with mode "multimodal", "audioonly" or
  "videoonly"; an unused input may be None.
  """
  num_classes: int = 527
  heads: str = "multimodal"
  fusion_depth: int = 3
  # Stochastic depth in training (see setup_encoder; on when apply gets a "dropout" rng).
  drop_path_rate: float = 0.0

  def setup(self):
    if self.heads not in FT_HEADS:
      raise ValueError(f"heads must be one of {FT_HEADS}, got {self.heads!r}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
    self.setup_encoder(with_fusion=self.heads != "unimodal",
                       drop_path_rate=self.drop_path_rate)
    c = self.num_classes
    if self.heads in ("multimodal", "all"):
      self.fc_norm_av = layers.layer_norm("fc_norm_av", self.norm_eps)
      self.head_av = layers.dense(c, ("embed", "classes"), jnp.float32, "head_av")
    if self.heads in ("unimodal", "all"):
      self.fc_norm_a = layers.layer_norm("fc_norm_a", self.norm_eps)
      self.head_a = layers.dense(c, ("embed", "classes"), jnp.float32, "head_a")
      self.fc_norm_v = layers.layer_norm("fc_norm_v", self.norm_eps)
      self.head_v = layers.dense(c, ("embed", "classes"), jnp.float32, "head_v")

  def modes(self) -> tuple[str, ...]:
    """The call modes this model's heads support."""
    return HEAD_MODES[self.heads]

  def logits(self, audio: Optional[jax.Array], frames: Optional[jax.Array], mode: str
             ) -> jax.Array:
    if mode not in FT_MODES:
      raise ValueError(f"mode must be one of {FT_MODES}, got {mode!r}")
    if mode not in self.modes():
      raise ValueError(f"mode {mode!r} needs heads in "
                       f"{[h for h, modes in HEAD_MODES.items() if mode in modes]}; "
                       f"this model has heads={self.heads!r}")
    needs_audio, needs_video = mode != "videoonly", mode != "audioonly"
    if (needs_audio and audio is None) or (needs_video and frames is None):
      needed = {"multimodal": "audio and frames", "audioonly": "audio",
                "videoonly": "frames"}[mode]
      raise ValueError(f"mode {mode!r} needs {needed}")
    a, v = self.encode_unmasked(audio if needs_audio else None,
                                frames if needs_video else None)
    if mode == "multimodal":
      x = self.fuse(a, v)
      na = a.shape[1]
      pooled = jnp.concatenate([x[:, 1:na].mean(axis=1), x[:, na + 1:].mean(axis=1)], axis=-1)
      return self.head_av(self.fc_norm_av(pooled))
    if mode == "audioonly":
      return self.head_a(self.fc_norm_a(a[:, 1:].mean(axis=1)))
    return self.head_v(self.fc_norm_v(v[:, 1:].mean(axis=1)))

  def __call__(self, audio: Optional[jax.Array], frames: Optional[jax.Array],
               mode: Optional[str] = None) -> jax.Array:
    """Logits [B, num_classes]; mode None is the first the heads support (multimodal, or
    audioonly for unimodal heads)."""
    mode = self.modes()[0] if mode is None else mode
    if self.is_initializing():  # run every head once so that every parameter exists
      for other in self.modes():
        if other != mode:
          self.logits(audio, frames, other)
    return self.logits(audio, frames, mode)


def frozen_param_names(model: nn.Module) -> tuple[str, ...]:
  """Top-level parameters the optimizer must not update (the fixed sin-cos tables)."""
  if not isinstance(model, (MAViL, MAViLFT)):
    raise TypeError(f"not a MAViL model: {type(model).__name__}")
  if model.trainable_pos_embed:
    return ()
  if isinstance(model, MAViL):
    return ENCODER_POS_EMBED_NAMES + DECODER_POS_EMBED_NAMES
  return ENCODER_POS_EMBED_NAMES
