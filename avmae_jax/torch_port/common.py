"""The PyTorch port's shared pieces: sin-cos tables, patches, masking, attention, the MLP.

Written from the spec (cav-mae.md, mavil.md), like the rest of the port; nothing here
imports the Flax code.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


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


def _init_linear_and_norm(m):
  if isinstance(m, nn.Linear):
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
      nn.init.zeros_(m.bias)
  elif isinstance(m, nn.LayerNorm):
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)
