"""PyTorch port of CAV-MAE: `CAVMAE` (pretraining) and `CAVMAEFT` (fine-tuning).

The reference's state_dict layout (cav-mae spec section 5), its arithmetic and its quirks,
documented where they appear. Inputs: audio [B, T, F] (time, freq) log-mel, frames
[B, C, H, W].
"""

import torch
from torch import nn
import torch.nn.functional as F

from avmae_jax.torch_port.common import Attention
from avmae_jax.torch_port.common import Mlp
from avmae_jax.torch_port.common import PatchEmbed
from avmae_jax.torch_port.common import _init_linear_and_norm
from avmae_jax.torch_port.common import patchify
from avmae_jax.torch_port.common import random_masking
from avmae_jax.torch_port.common import sincos_pos_embed_2d

_MASK_MODES = ("unstructured", "time", "freq", "tf")
_FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly",
             "missingvideoonly")


def structured_noise(noise, mask_ratio, mode, f=8, t=64):
  """Returns a copy of `noise` [N, f*t] with whole rows/columns of the (f, t) grid set to 1.1.

  Since uniform noise is < 1, the 1.1 entries sort last and are removed first by
  `random_masking`. 'time' marks int(t*r) columns, 'freq' int(f*r) rows, 'tf' int(t*r*0.7)
  columns plus int(f*r*0.7) rows (chosen uniformly without replacement, per sample).
  For 'time' and 'freq' the marked count equals L - len_keep for the reference ratios, so
  exactly the marked rows/columns go; for 'tf' it can exceed it (388 vs 384 at r=0.75) and the
  stable sort keeps the lowest-index marked tokens.

  Args:
    noise: [N, f*t] float tensor.
    mask_ratio: r.
    mode: 'time', 'freq' or 'tf'.
    f: grid rows (frequency patches).
    t: grid columns (time patches).
  """
  n, length = noise.shape
  if length != f * t:
    raise ValueError(f"noise has {length} tokens, grid is {f}x{t}")
  if mode not in ("time", "freq", "tf"):
    raise ValueError(f"unknown structured mask mode {mode!r}")
  out = noise.clone().reshape(n, f, t)
  if mode == "time":
    n_cols, n_rows = int(t * mask_ratio), 0
  elif mode == "freq":
    n_cols, n_rows = 0, int(f * mask_ratio)
  else:
    n_cols, n_rows = int(t * mask_ratio * 0.7), int(f * mask_ratio * 0.7)
  for i in range(n):
    if n_cols:
      out[i, :, torch.randperm(t)[:n_cols].to(out.device)] = 1.1
    if n_rows:
      out[i, torch.randperm(f)[:n_rows].to(out.device), :] = 1.1
  return out.reshape(n, length)


class Block(nn.Module):
  """Pre-norm transformer block with one norm pair per modality and shared weights.

  `modality` None uses norm1/norm2 (modality-specific stacks, the shared block on the joint
  sequence, the decoder); 'a' / 'v' pick norm1_a/norm2_a or norm1_v/norm2_v (the shared block
  applied to one modality alone).
  """

  def __init__(self, dim, num_heads, mlp_ratio=4.0, norm_eps=1e-5):
    super().__init__()
    # Registration order fixes the state_dict order; kept as in the reference's key layout.
    self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
    self.norm1_a = nn.LayerNorm(dim, eps=norm_eps)
    self.norm1_v = nn.LayerNorm(dim, eps=norm_eps)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
    self.norm2_a = nn.LayerNorm(dim, eps=norm_eps)
    self.norm2_v = nn.LayerNorm(dim, eps=norm_eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x, modality=None):
    if modality is None:
      n1, n2 = self.norm1, self.norm2
    elif modality == "a":
      n1, n2 = self.norm1_a, self.norm2_a
    elif modality == "v":
      n1, n2 = self.norm1_v, self.norm2_v
    else:
      raise ValueError(f"unknown modality {modality!r}")
    x = x + self.attn(n1(x))
    return x + self.mlp(n2(x))


class _EncoderMixin:
  """Embedding, grids, init and the unmasked feature path common to both models."""

  def _setup_geometry(self, img_size, audio_length, num_mel_bins, patch_size,
                      in_chans):
    for name, val in (("img_size", img_size), ("audio_length", audio_length),
                      ("num_mel_bins", num_mel_bins)):
      if val % patch_size:
        raise ValueError(f"{name}={val} is not a multiple of patch_size={patch_size}")
    self.patch_size = patch_size
    self.in_chans = in_chans
    # Audio grid (rows = frequency patches, cols = time patches); (8, 64) for the base model.
    self.grid_a = (num_mel_bins // patch_size, audio_length // patch_size)
    self.grid_v = (img_size // patch_size, img_size // patch_size)
    self.num_patches_a = self.grid_a[0] * self.grid_a[1]
    self.num_patches_v = self.grid_v[0] * self.grid_v[1]

  def _build_encoder(self, embed_dim, modality_specific_depth, shared_depth,
                     num_heads, mlp_ratio, norm_eps, trainable_pos_embed):
    # Creation order fixes the state_dict order; kept as in the reference's key layout.
    self.patch_embed_a = PatchEmbed(1, embed_dim, self.patch_size)
    self.patch_embed_v = PatchEmbed(self.in_chans, embed_dim, self.patch_size)
    self.modality_a = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.modality_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed_a = nn.Parameter(torch.zeros(1, self.num_patches_a, embed_dim),
                                    requires_grad=trainable_pos_embed)
    self.pos_embed_v = nn.Parameter(torch.zeros(1, self.num_patches_v, embed_dim),
                                    requires_grad=trainable_pos_embed)
    def blocks(depth):
      return nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_eps)
                            for _ in range(depth)])
    self.blocks_a = blocks(modality_specific_depth)
    self.blocks_v = blocks(modality_specific_depth)
    self.blocks_u = blocks(shared_depth)
    self.norm_a = nn.LayerNorm(embed_dim, eps=norm_eps)
    self.norm_v = nn.LayerNorm(embed_dim, eps=norm_eps)
    self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

  def _init_common(self, tokens):
    """Spec 'Init': sin-cos tables, xavier conv, N(0, 0.02) tokens, then Linear/LayerNorm."""
    with torch.no_grad():
      self.pos_embed_a.copy_(torch.from_numpy(
          sincos_pos_embed_2d(self.pos_embed_a.shape[-1], *self.grid_a))[None])
      self.pos_embed_v.copy_(torch.from_numpy(
          sincos_pos_embed_2d(self.pos_embed_v.shape[-1], *self.grid_v))[None])
      self._init_decoder_pos()
      # Xavier on the [out, in*k*k] view: fan_in counts the whole receptive field. The conv
      # biases keep torch's default init, which the spec (and the reference) leave untouched.
      for pe in (self.patch_embed_a, self.patch_embed_v):
        w = pe.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
      for tok in tokens:
        nn.init.normal_(tok, std=0.02)
    self.apply(_init_linear_and_norm)

  def _init_decoder_pos(self):
    pass

  def embed_audio(self, audio):
    """[B, T, F] -> [B, L_a, D] tokens (frequency-major) + position + modality embeddings."""
    a = audio.unsqueeze(1).transpose(2, 3)  # [B, 1, F, T]
    a = self.patch_embed_a(a)
    return a + self.pos_embed_a.to(a.dtype) + self.modality_a

  def embed_video(self, frames):
    """[B, C, H, W] -> [B, L_v, D] tokens (row-major) + position + modality embeddings."""
    v = self.patch_embed_v(frames)
    return v + self.pos_embed_v.to(v.dtype) + self.modality_v

  def _specific(self, a, v):
    for blk in self.blocks_a:
      a = blk(a)
    for blk in self.blocks_v:
      v = blk(v)
    return a, v

  def _shared_chain(self, x, modality=None):
    for blk in self.blocks_u:
      x = blk(x, modality)
    return x

  def forward_feat(self, audio, frames):
    """Unmasked token features: a -> blocks_a -> blocks_u('a') -> norm_a; v likewise.

    Unlike the contrastive path of `CAVMAE.forward_encoder`, the shared blocks are chained.

    Returns:
      (audio_tokens [B, L_a, D], video_tokens [B, L_v, D]).
    """
    a, v = self._specific(self.embed_audio(audio), self.embed_video(frames))
    a = self.norm_a(self._shared_chain(a, "a"))
    v = self.norm_v(self._shared_chain(v, "v"))
    return a, v


class CAVMAE(_EncoderMixin, nn.Module):
  """CAV-MAE pretraining model (spec section 4): masked encoder, joint decoder, two losses."""

  def __init__(self, img_size=224, audio_length=1024, num_mel_bins=128, patch_size=16,
               in_chans=3, embed_dim=768, modality_specific_depth=11, shared_depth=1,
               num_heads=12, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, mlp_ratio=4.0, norm_eps=1e-5,
               norm_pix_loss=False, trainable_pos_embed=False):
    super().__init__()
    self._setup_geometry(img_size, audio_length, num_mel_bins, patch_size, in_chans)
    self._build_encoder(embed_dim, modality_specific_depth, shared_depth, num_heads,
                        mlp_ratio, norm_eps, trainable_pos_embed)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed_a = nn.Parameter(
        torch.zeros(1, self.num_patches_a, decoder_embed_dim),
        requires_grad=trainable_pos_embed)
    self.decoder_pos_embed_v = nn.Parameter(
        torch.zeros(1, self.num_patches_v, decoder_embed_dim),
        requires_grad=trainable_pos_embed)
    self.decoder_blocks = nn.ModuleList([
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_eps)
        for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
    self.decoder_pred_a = nn.Linear(decoder_embed_dim, patch_size**2)
    self.decoder_pred_v = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
    self.norm_pix_loss = norm_pix_loss
    self._init_common([self.modality_a, self.modality_v, self.decoder_modality_a,
                       self.decoder_modality_v, self.mask_token])

  def _init_decoder_pos(self):
    d = self.decoder_pos_embed_a.shape[-1]
    self.decoder_pos_embed_a.copy_(
        torch.from_numpy(sincos_pos_embed_2d(d, *self.grid_a))[None])
    self.decoder_pos_embed_v.copy_(
        torch.from_numpy(sincos_pos_embed_2d(d, *self.grid_v))[None])

  def _mask(self, x, mask_ratio, noise, mode, grid):
    if noise is None:
      noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
      if mode != "unstructured":
        noise = structured_noise(noise, mask_ratio, mode, f=grid[0], t=grid[1])
    # A caller-supplied noise is used as is (for structured modes, build it with
    # `structured_noise`), so that equal noise means equal masks across implementations.
    return random_masking(x, noise, mask_ratio)

  def forward_encoder(self, audio, frames, mask_ratio_a, mask_ratio_v,
                      mask_mode="unstructured", noise_a=None, noise_v=None):
    """Masked encoder.

    Returns:
      x: [B, keep_a + keep_v, D] joint sequence after blocks_u (plain norms) and `norm`.
      mask_a, ids_restore_a, mask_v, ids_restore_v: masking outputs (mask 1 = removed).
      ca, cv: modality-only outputs of the shared block(s) after norm_a / norm_v.
    """
    if mask_mode not in _MASK_MODES:
      raise ValueError(f"unknown mask_mode {mask_mode!r}")
    a = self.embed_audio(audio)
    v = self.embed_video(frames)
    a, mask_a, ids_restore_a = self._mask(a, mask_ratio_a, noise_a, mask_mode, self.grid_a)
    # Video is always masked unstructured.
    v, mask_v, ids_restore_v = self._mask(v, mask_ratio_v, noise_v, "unstructured",
                                          self.grid_v)
    a, v = self._specific(a, v)
    x = self.norm(self._shared_chain(torch.cat([a, v], dim=1)))
    # Reference quirk, reproduced on purpose: the contrastive path re-applies each shared block
    # to the modality-specific output instead of chaining, so only the LAST shared block counts
    # (identical to chaining for the released shared_depth=1).
    ca, cv = a, v
    for blk in self.blocks_u:
      ca = blk(a, "a")
    for blk in self.blocks_u:
      cv = blk(v, "v")
    return (x, mask_a, ids_restore_a, mask_v, ids_restore_v, self.norm_a(ca),
            self.norm_v(cv))

  def forward_decoder(self, x, mask_a, ids_restore_a, mask_v, ids_restore_v):
    """Joint decoder; returns (pred_a [B, L_a, p*p], pred_v [B, L_v, p*p*C])."""
    x = self.decoder_embed(x)
    b, _, d = x.shape
    la = self.num_patches_a
    n_masked_a = int(mask_a[0].sum().item())
    n_masked_v = int(mask_v[0].sum().item())
    keep_a = la - n_masked_a
    # Kept tokens are in shuffle order; appending mask tokens and gathering by ids_restore puts
    # every token back at its original position.
    a_ = torch.cat([x[:, :keep_a], self.mask_token.expand(b, n_masked_a, d)], dim=1)
    a_ = torch.gather(a_, 1, ids_restore_a.unsqueeze(-1).expand(-1, -1, d))
    v_ = torch.cat([x[:, keep_a:], self.mask_token.expand(b, n_masked_v, d)], dim=1)
    v_ = torch.gather(v_, 1, ids_restore_v.unsqueeze(-1).expand(-1, -1, d))
    a_ = a_ + self.decoder_pos_embed_a + self.decoder_modality_a
    v_ = v_ + self.decoder_pos_embed_v + self.decoder_modality_v
    x = torch.cat([a_, v_], dim=1)
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    return self.decoder_pred_a(x[:, :la]), self.decoder_pred_v(x[:, la:])

  def forward_mae_loss(self, inputs, pred, mask, modality):
    """Per-patch MSE averaged over masked patches; modality 'a' ([B,T,F]) or 'v' ([B,C,H,W])."""
    p = self.patch_size
    if modality == "a":
      img = inputs.unsqueeze(1).transpose(2, 3)  # [B, 1, F, T]
      target = patchify(img, 1, img.shape[2] // p, img.shape[3] // p, p)
    elif modality == "v":
      target = patchify(inputs, self.in_chans, inputs.shape[2] // p, inputs.shape[3] // p, p)
    else:
      raise ValueError(f"unknown modality {modality!r}")
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
      target = (target - mean) / (var + 1.0e-6)**0.5
    loss = ((pred - target)**2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward_contrastive(self, audio_rep, video_rep, bidirect_contrast=False,
                          temperature=0.05):
    """InfoNCE over the batch on pooled reps [B, D]; returns (nce, c_acc), unweighted.

    Single direction normalises over audios for each video (softmax over axis 0).
    """
    audio_rep = F.normalize(audio_rep, dim=-1)
    video_rep = F.normalize(video_rep, dim=-1)
    sim = audio_rep @ video_rep.t() / temperature
    target = torch.arange(sim.shape[0], device=sim.device)

    def one_way(s):
      nce = -torch.mean(torch.diag(F.log_softmax(s, dim=0)))
      acc = torch.eq(torch.argmax(s, dim=0), target).sum() / s.shape[0]
      return nce, acc

    nce, c_acc = one_way(sim)
    if bidirect_contrast:
      nce_t, c_acc_t = one_way(sim.t())
      nce, c_acc = (nce + nce_t) / 2, (c_acc + c_acc_t) / 2
    return nce, c_acc

  def forward(self, audio, frames, mask_ratio_a=0.75, mask_ratio_v=0.75,
              mae_loss_weight=1.0, contrast_loss_weight=0.01, mask_mode="unstructured",
              bidirect_contrast=False, contrast_temperature=0.05, noise_a=None,
              noise_v=None):
    """Pretraining losses.

    Returns:
      dict with loss, loss_mae (= mae_loss_weight * (loss_mae_a + loss_mae_v)), loss_mae_a,
      loss_mae_v, loss_c (= contrast_loss_weight * nce), nce, c_acc, mask_a, mask_v, pred_a,
      pred_v. With mae_loss_weight == 0 the decoder is skipped (pred_* None, MAE losses 0);
      with contrast_loss_weight == 0 loss_c, nce and c_acc are 0.
    """
    (x, mask_a, ids_restore_a, mask_v, ids_restore_v, ca, cv) = self.forward_encoder(
        audio, frames, mask_ratio_a, mask_ratio_v, mask_mode=mask_mode, noise_a=noise_a,
        noise_v=noise_v)
    zero = torch.zeros((), device=audio.device)
    pred_a = pred_v = None
    if mae_loss_weight != 0:
      pred_a, pred_v = self.forward_decoder(x, mask_a, ids_restore_a, mask_v, ids_restore_v)
      loss_mae_a = self.forward_mae_loss(audio, pred_a, mask_a, "a")
      loss_mae_v = self.forward_mae_loss(frames, pred_v, mask_v, "v")
      loss_mae = mae_loss_weight * (loss_mae_a + loss_mae_v)
    else:
      loss_mae_a = loss_mae_v = loss_mae = zero
    if contrast_loss_weight != 0:
      nce, c_acc = self.forward_contrastive(ca.mean(dim=1), cv.mean(dim=1),
                                            bidirect_contrast, contrast_temperature)
      loss_c = contrast_loss_weight * nce
    else:
      nce = c_acc = loss_c = zero
    return {
        "loss": loss_mae + loss_c, "loss_mae": loss_mae, "loss_mae_a": loss_mae_a,
        "loss_mae_v": loss_mae_v, "loss_c": loss_c, "nce": nce, "c_acc": c_acc,
        "mask_a": mask_a, "mask_v": mask_v, "pred_a": pred_a, "pred_v": pred_v,
    }


class CAVMAEFT(_EncoderMixin, nn.Module):
  """CAV-MAE fine-tuning model (spec section 5): unmasked encoder + LayerNorm/Linear head."""

  def __init__(self, num_classes, img_size=224, audio_length=1024, num_mel_bins=128,
               patch_size=16, in_chans=3, embed_dim=768, modality_specific_depth=11,
               shared_depth=1, num_heads=12, mlp_ratio=4.0, norm_eps=1e-5,
               trainable_pos_embed=True):
    super().__init__()
    self._setup_geometry(img_size, audio_length, num_mel_bins, patch_size, in_chans)
    self._build_encoder(embed_dim, modality_specific_depth, shared_depth, num_heads,
                        mlp_ratio, norm_eps, trainable_pos_embed)
    self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim, eps=norm_eps),
                                  nn.Linear(embed_dim, num_classes))
    self._init_common([self.modality_a, self.modality_v])

  def forward(self, audio, frames, mode="multimodal"):
    """Logits [B, num_classes].

    Modes: 'multimodal' (joint sequence through blocks_u with plain norms -> norm),
    'audioonly' / 'videoonly' (one modality through blocks_u with its own norms -> norm_a/v),
    'missingaudioonly' / 'missingvideoonly' (audio / video only, for a model fine-tuned on
    both: mean of the pooled plain-norm path and the pooled modality-norm path).
    `frames` (resp. `audio`) is ignored, and may be None, when the mode does not use it.
    """
    if mode not in _FT_MODES:
      raise ValueError(f"unknown mode {mode!r}")
    if mode == "multimodal":
      a, v = self._specific(self.embed_audio(audio), self.embed_video(frames))
      x = self.norm(self._shared_chain(torch.cat([a, v], dim=1))).mean(dim=1)
      return self.mlp_head(x)
    if mode in ("audioonly", "missingaudioonly"):
      x = self.embed_audio(audio)
      for blk in self.blocks_a:
        x = blk(x)
      m, norm_m = "a", self.norm_a
    else:
      x = self.embed_video(frames)
      for blk in self.blocks_v:
        x = blk(x)
      m, norm_m = "v", self.norm_v
    pooled = norm_m(self._shared_chain(x, m)).mean(dim=1)
    if mode.startswith("missing"):
      unified = self.norm(self._shared_chain(x)).mean(dim=1)
      pooled = (unified + pooled) / 2
    return self.mlp_head(pooled)
