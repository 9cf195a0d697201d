"""PyTorch port of the CAV-MAE models (`CAVMAE`, `CAVMAEFT`) and of MAViL (`MAViL`, `MAViLFT`).

Written from the numerical contracts in the project spec (cav-mae.md, sections 4 and 5;
mavil.md), not copied from the authors' repositories, and with no timm/torchvision
dependency. The MAViL key layout is tabulated at the start of its section below. It serves
two purposes:

* users without the authors' code run checkpoints exported by this project with it: the
  state_dict keys and shapes are the reference's (without the DataParallel `module.` prefix),
  so `load_state_dict(strict=True)` works both ways;
* it is the independent reference the Flax models are tested against, so it reproduces the
  reference's arithmetic and its quirks (documented where they appear) rather than improving
  on them.

Layouts are the reference's: audio [B, T, F] (time, freq) log-mel, frames [B, C, H, W]
(CAV-MAE) or clips [B, C, N, H, W] (MAViL).
This module imports torch at top level; nothing else in `avmae_jax` imports it at import time,
so the rest of the package stays torch-free.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

_MASK_MODES = ("unstructured", "time", "freq", "tf")
_FT_MODES = ("multimodal", "audioonly", "videoonly", "missingaudioonly",
             "missingvideoonly")


# ----------------------------------------------------------------------------------------------
# Module-level helpers.
# ----------------------------------------------------------------------------------------------


def _sincos_1d(dim, pos):
  """[len(pos), dim] table [sin(p*w), cos(p*w)], w_i = 1 / 10000^(i / (dim/2)), float64."""
  if dim % 2:
    raise ValueError(f"1-D sin-cos width must be even, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000.0**omega
  out = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim, grid_h, grid_w):
  """Fixed 2-D sin-cos position table, no cls token.

  Token (row, col) sits at index row * grid_w + col and gets
  concat(1d(col, D/2), 1d(row, D/2)): the column (width) half comes first, as in the
  reference. Computed in float64 and cast once, so every implementation that follows the
  same formula agrees to float32 rounding.

  Args:
    embed_dim: D, a multiple of 4.
    grid_h: number of rows (audio: frequency patches; video: image rows).
    grid_w: number of columns (audio: time patches; video: image columns).

  Returns:
    np.ndarray float32 [grid_h * grid_w, embed_dim].
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb_col = _sincos_1d(embed_dim // 2, cols)
  emb_row = _sincos_1d(embed_dim // 2, rows)
  return np.concatenate([emb_col, emb_row], axis=1).astype(np.float32)


def patchify(imgs, c, h, w, p=16):
  """[N, c, h*p, w*p] -> [N, h*w, p*p*c], patches row-major, inner order (p, q, c)."""
  n = imgs.shape[0]
  x = imgs.reshape(n, c, h, p, w, p)
  x = torch.einsum("nchpwq->nhwpqc", x)
  return x.reshape(n, h * w, p * p * c)


def unpatchify(x, c, h, w, p=16):
  """Inverse of `patchify`: [N, h*w, p*p*c] -> [N, c, h*p, w*p]."""
  if x.shape[1] != h * w:
    raise ValueError(f"expected {h * w} patches, got {x.shape[1]}")
  n = x.shape[0]
  x = x.reshape(n, h, w, p, p, c)
  x = torch.einsum("nhwpqc->nchpwq", x)
  return x.reshape(n, c, h * p, w * p)


def random_masking(x, noise, mask_ratio):
  """MAE per-sample masking driven by `noise` (lowest noise is kept).

  The sort is stable, so the mask is a pure function of `noise`: any implementation given
  the same noise removes the same tokens (ties, e.g. the 1.1 entries of structured noise,
  resolve by token index).

  Args:
    x: [N, L, D] tokens.
    noise: [N, L] noise.
    mask_ratio: fraction to remove; len_keep = int(L * (1 - mask_ratio)).

  Returns:
    x_masked [N, len_keep, D] (kept tokens in ascending-noise order), mask [N, L] float32
    with 1 = removed, ids_restore [N, L] (position of each original token in the shuffle).
  """
  n, length, d = x.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1, stable=True)
  ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
  ids_keep = ids_shuffle[:, :len_keep]
  x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
  mask = torch.ones(n, length, device=x.device)
  mask[:, :len_keep] = 0
  mask = torch.gather(mask, 1, ids_restore)
  return x_masked, mask, ids_restore


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


# ----------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection; state_dict keys `proj.{weight,bias}`."""

  def __init__(self, in_chans, embed_dim, patch_size):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size,
                          stride=patch_size)

  def forward(self, x):
    # [B, D, h, w] -> [B, h*w, D]: row-major tokens, i.e. frequency-major for audio.
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  """Multi-head self-attention with the reference's fused qkv layout."""

  def __init__(self, dim, num_heads):
    super().__init__()
    if dim % num_heads:
      raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    # Explicit scaled softmax rather than a fused kernel: this port is the numerical reference.
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="none"))


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


# ----------------------------------------------------------------------------------------------
# Shared encoder plumbing.
# ----------------------------------------------------------------------------------------------


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


def _init_linear_and_norm(m):
  if isinstance(m, nn.Linear):
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
      nn.init.zeros_(m.bias)
  elif isinstance(m, nn.LayerNorm):
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# MAViL (spec mavil.md).
# ----------------------------------------------------------------------------------------------
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
