"""PyTorch port of MAViL: `MAViL` (pretraining, stage 1 and 2) and `MAViLFT` (fine-tuning).

The key layout is tabulated below; the encoder and fine-tuning names are the authors'
inference code's (mavil spec), so its released checkpoint loads strictly into `MAViLFT`.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from avmae_jax.torch_port.common import Attention
from avmae_jax.torch_port.common import Mlp
from avmae_jax.torch_port.common import PatchEmbed
from avmae_jax.torch_port.common import _init_linear_and_norm
from avmae_jax.torch_port.common import _sincos_1d
from avmae_jax.torch_port.common import patchify
from avmae_jax.torch_port.common import random_masking
from avmae_jax.torch_port.common import sincos_pos_embed_2d

#
# Key layout (base sizes; D = 768, decoder width 512; La = 512 audio tokens on a (64, 8)
# time-major grid, Lv = 784 video tokens on a (4, 14, 14) grid; `.i` a block index, each block
# timm's `norm1.{weight,bias}`, `attn.qkv.{weight,bias}`, `attn.proj.{weight,bias}`,
# `norm2.{weight,bias}`, `mlp.fc1.{weight,bias}`, `mlp.fc2.{weight,bias}`). The encoder and
# fine-tuning names are those of the authors' inference code (AV-SUPERB `upstream_models/
# mavil`), so its released fine-tuned checkpoint loads strictly into `MAViLFT`:
#
#   key                                   shape                 in
#   patch_embed.proj.weight / .bias       [D, 1, 16, 16] / [D]  all   (audio Conv2d)
#   cls_token                             [1, 1, D]             all
#   pos_embed                             [1, 1 + La, D]        all   (fixed sin-cos, row 0 = 0)
#   blocks.{0..11}.*                                            all   (audio ViT)
#   patch_embed_v.proj.weight / .bias     [D, 3, 2, 16, 16]     all   (video Conv3d)
#   cls_token_v                           [1, 1, D]             all
#   pos_embed_v                           [1, 1 + Lv, D]        all   (fixed 3-D sin-cos)
#   blocks_v.{0..11}.*                                          all   (video ViT)
#   blocks_av.{0..F-1}.*                                        MAViL (F=2); MAViLFT with a
#                                                                     multimodal head (F=3)
#   norm.{weight,bias}                    [D]                   MAViL (after fusion)
#   decoder_embed.{weight,bias}           [512, D]              MAViL (audio decoder ...)
#   mask_token                            [1, 1, 512]           MAViL
#   decoder_pos_embed                     [1, 1 + La, 512]      MAViL (fixed sin-cos)
#   decoder_blocks.{0..7}.*                                     MAViL
#   decoder_norm.{weight,bias}            [512]                 MAViL
#   decoder_pred.{weight,bias}            [256, 512]            MAViL stage 1 ([D, 512] stage 2)
#   decoder_embed_v, mask_token_v, decoder_pos_embed_v [1, 1 + Lv, 512], decoder_blocks_v.*,
#   decoder_norm_v, decoder_pred_v [1536, 512] (stage 2: [D, 512])    MAViL (video decoder)
#   fc_norm_av.{weight,bias} [2D]; head_av.{weight [C, 2D], bias}      MAViLFT heads multimodal/all
#   fc_norm_a, head_a [C, D]; fc_norm_v, head_v [C, D]                 MAViLFT heads unimodal/all
#
# Inputs: audio [B, T, F] log-mel (the image [B, 1, T, F]: height = time, so tokens are
# time-major, k = t*(F/16) + f); frames [B, C, N, H, W] (torch video layout, N frames).


def sincos_pos_embed_3d(embed_dim, grid_t, grid_h, grid_w):
  """Fixed 3-D sin-cos table [t*h*w, D], tokens row-major over (t, h, w), no cls row.

  Token (t, r, c) gets concat(1d(t, D/4), 2d(r, c, 3D/4)) where the 2-D part is
  `sincos_pos_embed_2d` of width 3D/4 (column half first). float64, cast once to float32.
  """
  if embed_dim % 16:
    raise ValueError(f"embed_dim must be a multiple of 16, got {embed_dim}")
  d_t, d_s = embed_dim // 4, embed_dim // 4 * 3
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  spatial = np.concatenate([_sincos_1d(d_s // 2, cols), _sincos_1d(d_s // 2, rows)], axis=1)
  temporal = _sincos_1d(d_t, np.arange(grid_t))
  out = np.zeros((grid_t, grid_h * grid_w, embed_dim), dtype=np.float64)
  out[:, :, :d_t] = temporal[:, None, :]
  out[:, :, d_t:] = spatial[None, :, :]
  return out.reshape(-1, embed_dim).astype(np.float32)


def patchify_video(frames, tubelet, p):
  """[N, C, T, H, W] -> [N, t*h*w, u*p*p*C], inner order (u, p, q, c) (MAE-ST's)."""
  n, c, t_, h_, w_ = frames.shape
  t, h, w = t_ // tubelet, h_ // p, w_ // p
  x = frames.reshape(n, c, t, tubelet, h, p, w, p)
  x = torch.einsum("nctuhpwq->nthwupqc", x)
  return x.reshape(n, t * h * w, tubelet * p * p * c)


def symmetric_info_nce(x, y, temperature):
  """Symmetric InfoNCE between paired rows of x and y [B, D]; returns (loss, accuracy)."""
  x = F.normalize(x, dim=-1)
  y = F.normalize(y, dim=-1)
  logits = x @ y.t() / temperature
  target = torch.arange(x.shape[0], device=x.device)
  loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
  acc = ((logits.argmax(dim=1) == target).float().mean()
         + (logits.argmax(dim=0) == target).float().mean()) / 2
  return loss, acc


class PatchEmbed3D(nn.Module):
  """Non-overlapping tubelets (Conv3d, kernel = stride); state_dict keys `proj.{weight,bias}`."""

  def __init__(self, in_chans, embed_dim, tubelet_size, patch_size):
    super().__init__()
    size = (tubelet_size, patch_size, patch_size)
    self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

  def forward(self, x):
    # [B, D, t, h, w] -> [B, t*h*w, D]: tokens row-major over (t, h, w).
    return self.proj(x).flatten(2).transpose(1, 2)


class ViTBlock(nn.Module):
  """timm's pre-norm ViT block: norm1, attn (fused qkv with bias), norm2, mlp."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_eps=1e-6):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _MAViLEncoderMixin:
  """Audio and video ViTs with cls tokens and fixed position tables, and the fusion blocks."""

  def _build_mavil_encoder(self, img_size, num_frames, tubelet_size, audio_length,
                           num_mel_bins, patch_size, in_chans, embed_dim, encoder_depth,
                           num_heads, fusion_depth, mlp_ratio, norm_eps, trainable_pos_embed):
    for name, val in (("img_size", img_size), ("audio_length", audio_length),
                      ("num_mel_bins", num_mel_bins)):
      if val % patch_size:
        raise ValueError(f"{name}={val} is not a multiple of patch_size={patch_size}")
    if num_frames % tubelet_size:
      raise ValueError(f"num_frames={num_frames} is not a multiple of "
                       f"tubelet_size={tubelet_size}")
    self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
    self.norm_eps = norm_eps
    self.grid_a = (audio_length // patch_size, num_mel_bins // patch_size)  # (time, freq)
    side = img_size // patch_size
    self.grid_v = (num_frames // tubelet_size, side, side)
    self.num_patches_a = self.grid_a[0] * self.grid_a[1]
    self.num_patches_v = self.grid_v[0] * side * side

    def blocks(depth):
      return nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio, norm_eps)
                            for _ in range(depth)])

    self.patch_embed = PatchEmbed(1, embed_dim, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches_a, embed_dim),
                                  requires_grad=trainable_pos_embed)
    self.blocks = blocks(encoder_depth)
    self.patch_embed_v = PatchEmbed3D(in_chans, embed_dim, tubelet_size, patch_size)
    self.cls_token_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed_v = nn.Parameter(torch.zeros(1, 1 + self.num_patches_v, embed_dim),
                                    requires_grad=trainable_pos_embed)
    self.blocks_v = blocks(encoder_depth)
    if fusion_depth:
      self.blocks_av = blocks(fusion_depth)
    else:
      self.blocks_av = None

  def _pos_tables(self):
    """(parameter, table without cls row) pairs to fill at init."""
    d = self.pos_embed.shape[-1]
    return [(self.pos_embed, sincos_pos_embed_2d(d, *self.grid_a)),
            (self.pos_embed_v, sincos_pos_embed_3d(d, *self.grid_v))]

  def _init_mavil(self, tokens):
    with torch.no_grad():
      for param, table in self._pos_tables():
        param.zero_()
        param[0, 1:].copy_(torch.from_numpy(table))
      for conv in (self.patch_embed.proj, self.patch_embed_v.proj):
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
      for tok in tokens:
        nn.init.normal_(tok, std=0.02)
    self.apply(_init_linear_and_norm)

  def embed_audio(self, audio):
    """[B, T, F] -> [B, La, D] time-major patch tokens + positions (no cls)."""
    a = self.patch_embed(audio.unsqueeze(1))  # image [B, 1, T, F]
    return a + self.pos_embed[:, 1:]

  def embed_video(self, frames):
    """[B, C, N, H, W] -> [B, Lv, D] tubelet tokens (t, h, w order) + positions (no cls)."""
    return self.patch_embed_v(frames) + self.pos_embed_v[:, 1:]

  def _prepend_cls(self, x, cls_token, pos_embed):
    cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1)

  def encode_audio(self, tokens):
    x = self._prepend_cls(tokens, self.cls_token, self.pos_embed)
    for blk in self.blocks:
      x = blk(x)
    return x

  def encode_video(self, tokens):
    x = self._prepend_cls(tokens, self.cls_token_v, self.pos_embed_v)
    for blk in self.blocks_v:
      x = blk(x)
    return x

  def fuse(self, a, v):
    x = torch.cat([a, v], dim=1)
    for blk in self.blocks_av:
      x = blk(x)
    return x

  def forward_feat(self, audio, frames):
    """Each ViT's unmasked output patch tokens (no cls, no fusion): [B, La, D], [B, Lv, D]."""
    a = self.encode_audio(self.embed_audio(audio))
    v = self.encode_video(self.embed_video(frames))
    return a[:, 1:], v[:, 1:]

  def fusion_feat(self, audio, frames):
    """The fusion blocks' outputs at the audio and video patch tokens (no cls), unmasked."""
    a = self.encode_audio(self.embed_audio(audio))
    v = self.encode_video(self.embed_video(frames))
    x = self.fuse(a, v)
    return x[:, 1:a.shape[1]], x[:, a.shape[1] + 1:]


class MAViL(_MAViLEncoderMixin, nn.Module):
  """MAViL pretraining, stage 1 (reconstruction + contrast) or 2 (predict teacher features).

  Same fields and defaults as the Flax `avmae_jax.models.mavil.MAViL` (see its docstring for
  the decisions the unreleased pretraining code left open). Views are computed one after the
  other here (the Flax model stacks them on the batch axis), which the tests rely on as an
  independent check.
  """

  def __init__(self, img_size=224, num_frames=8, tubelet_size=2, audio_length=1024,
               num_mel_bins=128, patch_size=16, in_chans=3, embed_dim=768, encoder_depth=12,
               num_heads=12, fusion_depth=2, mlp_ratio=4.0, norm_eps=1e-6,
               trainable_pos_embed=False, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, stage=1, norm_pix_loss=True, mask_ratio_a=0.8,
               mask_ratio_v=0.9, contrast_temperature=0.1, inter_contrast_weight=0.01,
               intra_contrast_weight=0.01, stage2_contrastive=True):
    super().__init__()
    if stage not in (1, 2):
      raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    self._build_mavil_encoder(img_size, num_frames, tubelet_size, audio_length, num_mel_bins,
                              patch_size, in_chans, embed_dim, encoder_depth, num_heads,
                              fusion_depth, mlp_ratio, norm_eps, trainable_pos_embed)
    self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
    dd = decoder_embed_dim
    if stage == 1:
      out_a, out_v = patch_size**2, tubelet_size * patch_size**2 * in_chans
    else:
      out_a = out_v = embed_dim
    for s, n_tokens, out in (("", self.num_patches_a, out_a), ("_v", self.num_patches_v, out_v)):
      setattr(self, f"decoder_embed{s}", nn.Linear(embed_dim, dd))
      setattr(self, f"mask_token{s}", nn.Parameter(torch.zeros(1, 1, dd)))
      setattr(self, f"decoder_pos_embed{s}", nn.Parameter(
          torch.zeros(1, 1 + n_tokens, dd), requires_grad=trainable_pos_embed))
      setattr(self, f"decoder_blocks{s}", nn.ModuleList([
          ViTBlock(dd, decoder_num_heads, mlp_ratio, norm_eps) for _ in range(decoder_depth)]))
      setattr(self, f"decoder_norm{s}", nn.LayerNorm(dd, eps=norm_eps))
      setattr(self, f"decoder_pred{s}", nn.Linear(dd, out))
    self.stage = stage
    self.norm_pix_loss = norm_pix_loss
    self.mask_ratio_a, self.mask_ratio_v = mask_ratio_a, mask_ratio_v
    self.contrast_temperature = contrast_temperature
    self.inter_contrast_weight = inter_contrast_weight
    self.intra_contrast_weight = intra_contrast_weight
    self.contrastive = stage == 1 or stage2_contrastive
    self.num_views = 2 if self.contrastive and intra_contrast_weight != 0 else 1
    self._init_mavil([self.cls_token, self.cls_token_v, self.mask_token, self.mask_token_v])

  def _pos_tables(self):
    dd = self.decoder_pos_embed.shape[-1]
    return super()._pos_tables() + [
        (self.decoder_pos_embed, sincos_pos_embed_2d(dd, *self.grid_a)),
        (self.decoder_pos_embed_v, sincos_pos_embed_3d(dd, *self.grid_v))]

  def forward_decoder(self, x, ids_restore, modality):
    """[B, 1+keep, D] fused tokens of one modality -> [B, L, out] (cls dropped)."""
    s = "" if modality == "a" else "_v"
    x = getattr(self, f"decoder_embed{s}")(x)
    b, n, dd = x.shape
    fill = getattr(self, f"mask_token{s}").expand(b, ids_restore.shape[1] + 1 - n, dd)
    body = torch.cat([x[:, 1:], fill], dim=1)
    body = torch.gather(body, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))
    x = torch.cat([x[:, :1], body], dim=1) + getattr(self, f"decoder_pos_embed{s}")
    for blk in getattr(self, f"decoder_blocks{s}"):
      x = blk(x)
    x = getattr(self, f"decoder_norm{s}")(x)
    return getattr(self, f"decoder_pred{s}")(x)[:, 1:]

  def reconstruction_loss(self, pred, target, mask):
    """Mean over removed tokens (mask 1) of the per-token mean squared error."""
    loss = ((pred - target)**2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def normalised_targets(self, audio, frames):
    """Stage-1 targets: patches (per-patch standardised, unbiased variance, if norm_pix_loss)."""
    p = self.patch_size
    img = audio.unsqueeze(1)
    targets = [patchify(img, 1, img.shape[2] // p, img.shape[3] // p, p),
               patchify_video(frames, self.tubelet_size, p)]
    if self.norm_pix_loss:
      targets = [(t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6)**0.5
                 for t in targets]
    return targets

  @torch.no_grad()
  def teacher_targets(self, audio, frames):
    """Stage-2 targets from this model as teacher: fusion outputs, LayerNorm without affine."""
    a, v = self.fusion_feat(audio, frames)
    return {"audio": F.layer_norm(a, a.shape[-1:], eps=self.norm_eps),
            "video": F.layer_norm(v, v.shape[-1:], eps=self.norm_eps)}

  def forward(self, audio, frames, noise_a=None, noise_v=None, teacher_targets=None):
    """Losses as the Flax model returns them; noise rows [view 1 ; view 2] like there."""
    b = audio.shape[0]
    if (self.stage == 2) != (teacher_targets is not None):
      raise ValueError("teacher_targets are needed in stage 2 and only there")
    n = self.num_views * b
    if noise_a is None:
      noise_a = torch.rand(n, self.num_patches_a, device=audio.device)
    if noise_v is None:
      noise_v = torch.rand(n, self.num_patches_v, device=audio.device)
    tokens_a, tokens_v = self.embed_audio(audio), self.embed_video(frames)
    views = []
    for k in range(self.num_views):
      rows = slice(k * b, (k + 1) * b)
      xa, mask_a, ids_a = random_masking(tokens_a, noise_a[rows], self.mask_ratio_a)
      xv, mask_v, ids_v = random_masking(tokens_v, noise_v[rows], self.mask_ratio_v)
      views.append((self.encode_audio(xa), self.encode_video(xv), mask_a, ids_a, mask_v, ids_v))
    a, v, mask_a, ids_a, mask_v, ids_v = views[0]
    x = self.norm(self.fuse(a, v))
    pred_a = self.forward_decoder(x[:, :a.shape[1]], ids_a, "a")
    pred_v = self.forward_decoder(x[:, a.shape[1]:], ids_v, "v")
    if self.stage == 1:
      target_a, target_v = self.normalised_targets(audio, frames)
    else:
      target_a, target_v = teacher_targets["audio"].detach(), teacher_targets["video"].detach()
    out = {"loss_rec_a": self.reconstruction_loss(pred_a, target_a, mask_a),
           "loss_rec_v": self.reconstruction_loss(pred_v, target_v, mask_v),
           "mask_a": mask_a, "mask_v": mask_v, "pred_a": pred_a, "pred_v": pred_v}
    zero = torch.zeros((), device=audio.device)
    for key in ("inter", "intra_a", "intra_v"):
      out[f"loss_{key}"], out[f"acc_{key}"] = zero, zero
    pooled = [(va[:, 1:].mean(dim=1), vv[:, 1:].mean(dim=1)) for va, vv, *_ in views]
    t = self.contrast_temperature
    if self.contrastive and self.inter_contrast_weight != 0:
      out["loss_inter"], out["acc_inter"] = symmetric_info_nce(*pooled[0], t)
    if self.num_views == 2:
      out["loss_intra_a"], out["acc_intra_a"] = symmetric_info_nce(pooled[0][0], pooled[1][0], t)
      out["loss_intra_v"], out["acc_intra_v"] = symmetric_info_nce(pooled[0][1], pooled[1][1], t)
    out["loss"] = (out["loss_rec_a"] + out["loss_rec_v"]
                   + self.inter_contrast_weight * out["loss_inter"]
                   + self.intra_contrast_weight * (out["loss_intra_a"] + out["loss_intra_v"]))
    return out


class MAViLFT(_MAViLEncoderMixin, nn.Module):
  """MAViL fine-tuning: heads 'multimodal' (the released a+v model), 'unimodal' or 'all'.

  forward(audio, frames, mode): 'multimodal' fuses and mean-pools the audio and the video
  patch tokens separately, concat, fc_norm_av, head_av; 'audioonly' / 'videoonly' pool one
  ViT's patch tokens, fc_norm_a/head_a or fc_norm_v/head_v. An unused input may be None.
  """

  def __init__(self, num_classes=527, heads="multimodal", img_size=224, num_frames=8,
               tubelet_size=2, audio_length=1024, num_mel_bins=128, patch_size=16, in_chans=3,
               embed_dim=768, encoder_depth=12, num_heads=12, fusion_depth=3, mlp_ratio=4.0,
               norm_eps=1e-6, trainable_pos_embed=False):
    super().__init__()
    if heads not in ("multimodal", "unimodal", "all"):
      raise ValueError(f"heads must be multimodal, unimodal or all, got {heads!r}")
    self.heads = heads
    fused = heads != "unimodal"
    self._build_mavil_encoder(img_size, num_frames, tubelet_size, audio_length, num_mel_bins,
                              patch_size, in_chans, embed_dim, encoder_depth, num_heads,
                              fusion_depth if fused else 0, mlp_ratio, norm_eps,
                              trainable_pos_embed)
    if fused:
      self.fc_norm_av = nn.LayerNorm(2 * embed_dim, eps=norm_eps)
      self.head_av = nn.Linear(2 * embed_dim, num_classes)
    if heads != "multimodal":
      self.fc_norm_a = nn.LayerNorm(embed_dim, eps=norm_eps)
      self.head_a = nn.Linear(embed_dim, num_classes)
      self.fc_norm_v = nn.LayerNorm(embed_dim, eps=norm_eps)
      self.head_v = nn.Linear(embed_dim, num_classes)
    self._init_mavil([self.cls_token, self.cls_token_v])

  def forward(self, audio, frames, mode="multimodal"):
    allowed = {"multimodal": ("multimodal",), "unimodal": ("audioonly", "videoonly"),
               "all": ("multimodal", "audioonly", "videoonly")}[self.heads]
    if mode not in allowed:
      raise ValueError(f"mode {mode!r} is not available with heads={self.heads!r}")
    if mode == "audioonly":
      a = self.encode_audio(self.embed_audio(audio))
      return self.head_a(self.fc_norm_a(a[:, 1:].mean(dim=1)))
    if mode == "videoonly":
      v = self.encode_video(self.embed_video(frames))
      return self.head_v(self.fc_norm_v(v[:, 1:].mean(dim=1)))
    a = self.encode_audio(self.embed_audio(audio))
    v = self.encode_video(self.embed_video(frames))
    x = self.fuse(a, v)
    na = a.shape[1]
    pooled = torch.cat([x[:, 1:na].mean(dim=1), x[:, na + 1:].mean(dim=1)], dim=1)
    return self.head_av(self.fc_norm_av(pooled))
