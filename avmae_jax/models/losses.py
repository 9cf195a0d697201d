"""Patch layout and the losses of CAV-MAE and MAViL: masked reconstruction, InfoNCE, and the
classification losses of their fine-tuning models.

Images are NHWC. For CAV-MAE a spectrogram [B, T, F] is the image [B, F, T, 1] (height =
frequency, width = time), so one patchify serves both modalities and reproduces the
reference's inner patch order (p, q, c): p along height, q along width, channel last.
MAViL (AudioMAE's layout) takes the spectrogram as the image [B, T, F, 1] instead, and
patches video [B, T, H, W, C] into tubelets with inner order (u, p, q, c) (MAE-ST's).
"""

import jax
import jax.numpy as jnp
import optax

# The reference's per-patch normalisation adds this under the square root.
NORM_PIX_EPS = 1e-6


def spectrogram_image(audio: jax.Array) -> jax.Array:
  """[B, T, F] log-mel -> [B, F, T, 1] image with frequency as height."""
  return jnp.swapaxes(audio, 1, 2)[..., None]


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches row-major, inner order (p, q, c)."""
  b, height, width, c = images.shape
  h, w = height // patch, width // patch
  x = images.reshape(b, h, patch, w, patch, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int
               ) -> jax.Array:
  """Inverse of `patchify`: [B, h*w, p*p*C] -> [B, h*p, w*p, C]."""
  b = patches.shape[0]
  h, w = grid
  x = patches.reshape(b, h, w, patch, patch, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, h * patch, w * patch, channels)


def patchify_video(frames: jax.Array, tubelet: int, patch: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, (T/u)*(H/p)*(W/p), u*p*p*C], tubelets row-major over (t, h, w),
  inner order (u, p, q, c): frame within the tubelet, row, column, channel."""
  b, frames_, height, width, c = frames.shape
  t, h, w = frames_ // tubelet, height // patch, width // patch
  x = frames.reshape(b, t, tubelet, h, patch, w, patch, c)
  x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
  return x.reshape(b, t * h * w, tubelet * patch * patch * c)


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis without scale or bias (biased variance, like torch)."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def normalize_patches(target: jax.Array) -> jax.Array:
  """Per-patch standardisation with the UNBIASED variance, as torch's `var` computes it."""
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix_loss: bool
             ) -> jax.Array:
  """Per-patch MSE averaged over removed patches (mask == 1) only."""
  target = target.astype(jnp.float32)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), torch.nn.functional.normalize's definition."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def contrastive_loss(audio_rep: jax.Array, video_rep: jax.Array, temperature: float = 0.05,
                     bidirectional: bool = False, groups: int = 1
                     ) -> tuple[jax.Array, jax.Array]:
  """InfoNCE between paired clip vectors [B, D]; returns (nce, accuracy).

  Single direction (the reference's default) normalises over audios for each video
  (softmax over axis 0 of S = A V^T / temperature); bidirectional averages both ways.
  `groups` > 1 splits the batch into that many consecutive chunks with their own
  negatives, as the reference's DataParallel did per GPU; the result is the mean over
  chunks (the caller decides whether to sum, see CAVMAE.contrastive_groups).
  """
  b = audio_rep.shape[0]
  if b % groups:
    raise ValueError(f"batch {b} does not split into contrastive_groups={groups}")
  a = l2_normalize(audio_rep.astype(jnp.float32)).reshape(groups, b // groups, -1)
  v = l2_normalize(video_rep.astype(jnp.float32)).reshape(groups, b // groups, -1)
  sim = jnp.einsum("gid,gjd->gij", a, v) / temperature
  targets = jnp.arange(b // groups)

  def one_way(s):  # s [G, n, n]; softmax over axis 1 = over audios for each video column
    nce = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(s, axis=1), axis1=1, axis2=2))
    acc = jnp.mean((jnp.argmax(s, axis=1) == targets).astype(jnp.float32))
    return nce, acc

  nce, acc = one_way(sim)
  if bidirectional:
    nce_t, acc_t = one_way(jnp.swapaxes(sim, 1, 2))
    nce, acc = (nce + nce_t) / 2, (acc + acc_t) / 2
  return nce, acc


# Fine-tuning losses: "bce" (multi-label, AudioSet) and "ce" (single-label, VGGSound).
CLASSIFICATION_LOSSES = ("bce", "ce")


def classification_loss(logits: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """Per-clip loss [B]: BCE with logits averaged over classes (so its batch mean is torch's
  BCEWithLogitsLoss), or cross-entropy against soft targets (torch's CrossEntropyLoss with
  probability targets)."""
  logits, targets = logits.astype(jnp.float32), targets.astype(jnp.float32)
  if loss == "bce":
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=-1)
  return optax.softmax_cross_entropy(logits, targets)
