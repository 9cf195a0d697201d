"""CAV-MAE in Flax: `CAVMAE` (pretraining) and `CAVMAEFT` (fine-tuning), per cav-mae spec 4-5.

Inputs: audio [B, T, F] normalised log-mel (T = audio_length, F = num_mel_bins), frames
[B, H, W, 3] normalised RGB, NHWC. Both models are pure functions of (params, inputs, PRNG
key); the only randomness is the masking noise (rng stream "masking"), which callers may
pass explicitly for exact comparisons.

Parameter names follow the reference state_dict (see layers.py), position embeddings are
parameters in both models: frozen by `stop_gradient` when `trainable_pos_embed` is False
(the optimizer must also leave them alone; `frozen_param_names` lists them).

Also here, next to the models: their size presets, what the rest of the code asks of them
(models/common.py), the model config a reference state dict describes
(`reference_config`) and the ImageNet-MAE initialisation (`CAVMAE.map_imagenet_mae`).
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

POS_EMBED_NAMES = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")
# The scalars CAVMAE.__call__ returns that a training run logs.
PRETRAIN_METRICS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "nce", "c_acc")
# Encoder and decoder widths/depths per size. `base` is the paper's; `tiny` keeps the real
# input sizes (1024x128 audio, 224x224 frames) so it runs on real data, for tests and the demo.
# Head counts keep head_dim 64 (encoder) and 32 (decoder), the convention `.pth` import uses.
SIZES = {
    "base": dict(embed_dim=768, num_heads=12, modality_specific_depth=11, shared_depth=1,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "tiny": dict(embed_dim=128, num_heads=2, modality_specific_depth=2, shared_depth=1,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2),
}


class _Encoder(common.AVModel):
  """Patch embeddings, modality-specific and shared blocks, the three final norms."""
  modality_specific_depth: int = 11
  shared_depth: int = 1

  sizes = SIZES
  # Tables [1, F * T, D], frequency-major (audio_grid); the pretraining decoder's too.
  audio_position_tables = ("pos_embed_a", "decoder_pos_embed_a")
  audio_time_axis = 1

  def input_shapes(self, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    return (jax.ShapeDtypeStruct((batch, self.audio_length, self.num_mel_bins), jnp.float32),
            jax.ShapeDtypeStruct((batch, self.img_size, self.img_size, self.in_chans),
                                 jnp.float32))

  def lr_layers(self) -> common.LrLayers:
    return common.lr_layers_from_patterns(
        r"^(patch_embed_|pos_embed_|modality_)", r"^blocks_[av]_(\d+)/", r"^blocks_u_(\d+)/",
        self.modality_specific_depth, self.shared_depth)

  def _patch_embed_flops(self, tokens_a: int, tokens_v: int) -> float:
    return flops.patch_embed_flops(self.embed_dim, self.patch_size ** 2,
                                   tokens_a + self.in_chans * tokens_v)

  @property
  def audio_grid(self) -> tuple[int, int]:
    """Token grid (frequency rows, time columns) of the spectrogram."""
    return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

  @property
  def video_grid(self) -> tuple[int, int]:
    return self.img_size // self.patch_size, self.img_size // self.patch_size

  @property
  def num_video_tokens(self) -> int:
    return self.video_grid[0] * self.video_grid[1]

  def _block(self, dim, heads, name):
    return self.make_block(dim, heads, name, static_modality=True)

  def run(self, blocks, x, modality=None):
    # Always passed, so that a rematerialised block sees its static argument.
    return super().run(blocks, x, modality)

  def setup_encoder(self):
    d = self.embed_dim
    self.patch_embed_a = layers.PatchEmbed(d, self.patch_size, self.dtype)
    self.patch_embed_v = layers.PatchEmbed(d, self.patch_size, self.dtype)
    token = nn.with_logical_partitioning(layers.token_init(), (None, None, "embed"))
    self.modality_a = self.param("modality_a", token, (1, 1, d))
    self.modality_v = self.param("modality_v", token, (1, 1, d))
    self.pos_embed_a = self.sincos_table("pos_embed_a", self.audio_grid, d, "embed")
    self.pos_embed_v = self.sincos_table("pos_embed_v", self.video_grid, d, "embed")
    n = self.modality_specific_depth
    self.blocks_a = [self._block(d, self.num_heads, f"blocks_a_{i}") for i in range(n)]
    self.blocks_v = [self._block(d, self.num_heads, f"blocks_v_{i}") for i in range(n)]
    self.blocks_u = [self._block(d, self.num_heads, f"blocks_u_{i}")
                     for i in range(self.shared_depth)]
    self.norm_a = layers.layer_norm("norm_a", self.norm_eps)
    self.norm_v = layers.layer_norm("norm_v", self.norm_eps)
    self.norm = layers.layer_norm("norm", self.norm_eps)

  def sincos_table(self, name: str, grid: tuple[int, int], width: int, axis: str):
    """A [1, rows*cols, width] position-table parameter initialised to the 2-D sin-cos."""
    init = nn.with_logical_partitioning(layers.sincos_init(*grid), (None, "length", axis))
    return self.param(name, init, (1, grid[0] * grid[1], width))

  def check_inputs(self, audio: Optional[jax.Array], frames: Optional[jax.Array]):
    self.check_audio(audio)
    want_v = (self.img_size, self.img_size, self.in_chans)
    if frames is not None and (frames.ndim != 4 or frames.shape[1:] != want_v):
      raise ValueError(f"frames must be [batch, {want_v[0]}, {want_v[1]}, {want_v[2]}] (NHWC), "
                       f"got {tuple(frames.shape)}")

  def embed_audio(self, audio: jax.Array) -> jax.Array:
    x = self.patch_embed_a(losses.spectrogram_image(audio).astype(self.dtype))
    return x + self._pos(self.pos_embed_a) + self.modality_a

  def embed_video(self, frames: jax.Array) -> jax.Array:
    x = self.patch_embed_v(frames.astype(self.dtype))
    return x + self._pos(self.pos_embed_v) + self.modality_v

  def encode_feat(self, audio: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference's forward_feat: unmasked, each modality through its shared-block path."""
    self.check_inputs(audio, frames)
    a = self.run(self.blocks_a, self.embed_audio(audio))
    v = self.run(self.blocks_v, self.embed_video(frames))
    a = self.norm_a(self.run(self.blocks_u, a, "a"))
    v = self.norm_v(self.run(self.blocks_u, v, "v"))
    return a, v


class CAVMAE(_Encoder):
  """The pretraining model: masked encoder, joint decoder, MAE + contrastive losses."""
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  norm_pix_loss: bool = True
  mask_ratio_a: float = 0.75
  mask_ratio_v: float = 0.75
  mask_mode: str = "unstructured"
  mae_loss_weight: float = 1.0
  contrast_loss_weight: float = 0.01
  bidirect_contrast: bool = False
  contrast_temperature: float = 0.05
  # The reference computes the contrastive path as `for blk in blocks_u: ca = blk(a, 'a')`,
  # so with several shared blocks only the last one counts; True chains them instead.
  chain_shared_blocks_in_contrast: bool = False
  # 1: negatives from the whole (global) batch. G > 1: the reference's DataParallel setup
  # on G GPUs, where each GPU contrasts its own B/G clips and the optimised loss is the SUM
  # of the G per-GPU losses; the returned losses are then G x the per-group means.
  contrastive_groups: int = 1

  kind = "cav_mae"
  metric_names = PRETRAIN_METRICS

  def frozen_param_names(self) -> tuple[str, ...]:
    return () if self.trainable_pos_embed else POS_EMBED_NAMES

  def forward_flops(self, mode: str = "multimodal") -> float:
    """The pretraining loss: the patch embeddings, the modality-specific blocks on the kept
    tokens, the shared blocks on their concatenation, the contrastive path's shared
    block(s) per modality, the decoder over all tokens and the prediction heads."""
    del mode
    d, r = self.embed_dim, self.mlp_ratio
    la, lv = self.num_audio_tokens, self.num_video_tokens
    ka = masking.num_kept(la, self.mask_ratio_a)
    kv = masking.num_kept(lv, self.mask_ratio_v)
    total = self._patch_embed_flops(la, lv)
    total += self.modality_specific_depth * (flops.block_flops(ka, d, r)
                                             + flops.block_flops(kv, d, r))
    total += self.shared_depth * flops.block_flops(ka + kv, d, r)
    if self.contrast_loss_weight != 0:
      contrast_depth = self.shared_depth if self.chain_shared_blocks_in_contrast else 1
      total += contrast_depth * (flops.block_flops(ka, d, r) + flops.block_flops(kv, d, r))
    if self.mae_loss_weight != 0:
      dd, p2 = self.decoder_embed_dim, self.patch_size ** 2
      total += 2 * (ka + kv) * d * dd
      total += self.decoder_depth * flops.block_flops(la + lv, dd, r)
      total += 2 * dd * p2 * (la + self.in_chans * lv)
    return float(total)

  # -- Inpainting (python -m avmae_jax.inpaint) ---------------------------------------------

  def check_inpainting(self) -> None:
    if self.mae_loss_weight == 0:
      raise ValueError("this model has mae_loss_weight=0 (CAV, contrastive only): its "
                       "decoder was never trained and does not run")

  def reconstruction_targets(self, audio: jax.Array, frames: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
    """What the decoder predicts: patches [B, La, p*p] of the spectrogram image
    (frequency-major) and [B, Lv, p*p*C] of the frame."""
    return (losses.patchify(losses.spectrogram_image(audio), self.patch_size),
            losses.patchify(frames, self.patch_size))

  def patches_to_images(self, patches_a: jax.Array, patches_v: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """`reconstruction_targets` inverted: spectrograms [B, F, T] (frequency first, as the
    patches lie) and frames [B, H, W, C]."""
    p = self.patch_size
    audio = losses.unpatchify(patches_a, p, self.audio_grid, 1)[..., 0]
    return audio, losses.unpatchify(patches_v, p, self.video_grid, self.in_chans)

  # -- Checkpoint surgery -----------------------------------------------------------------

  def map_imagenet_mae(self, mae: Mapping[str, Any], target: Mapping[str, np.ndarray]
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps an ImageNet MAE ViT state dict onto this model (the reference's initialisation).

    Both dicts are in the reference (PyTorch) key layout; `target` is this model's state
    dict to start from. MAE blocks 0..d-1 go to blocks_a.i and blocks_v.i, the rest to
    blocks_u (their norms also into the _a/_v norms); MAE `norm` to norm, norm_a and norm_v;
    the RGB patch conv to patch_embed_v and, summed over RGB, to patch_embed_a; the decoder
    by name; decoder_pred to decoder_pred_v and its first p*p rows to decoder_pred_a; the MAE
    position tables without their cls row to pos_embed_v / decoder_pos_embed_v. Returns the
    mapped state dict (`target`'s values where MAE has nothing) and the keys that kept them.
    """
    if "blocks.0.attn.qkv.weight" not in mae:
      raise common.CheckpointError("not an MAE ViT state dict (no blocks.0.attn.qkv.weight)")
    out = dict(target)
    mapped = {}

    def put(key, value):
      if key not in out:
        return
      value = np.asarray(value, np.float32)
      if value.shape != out[key].shape:
        raise common.CheckpointError(f"MAE checkpoint: {key} would get shape {value.shape}, "
                                     f"the model expects {out[key].shape}")
      mapped[key] = value

    d = self.modality_specific_depth
    for key, value in mae.items():
      if key.startswith("blocks."):
        _, idx, rest = key.split(".", 2)
        idx = int(idx)
        if idx < d:
          put(f"blocks_a.{idx}.{rest}", value)
          put(f"blocks_v.{idx}.{rest}", value)
        else:
          put(f"blocks_u.{idx - d}.{rest}", value)
          if rest.startswith(("norm1.", "norm2.")):
            for m in ("a", "v"):
              put(f"blocks_u.{idx - d}.{rest[:5]}_{m}.{rest[6:]}", value)
      elif key.startswith("norm."):
        for name in ("norm", "norm_a", "norm_v"):
          put(f"{name}.{key[5:]}", value)
      elif key == "patch_embed.proj.weight":
        put("patch_embed_v.proj.weight", value)
        put("patch_embed_a.proj.weight", np.asarray(value).sum(axis=1, keepdims=True))
      elif key == "patch_embed.proj.bias":
        put("patch_embed_v.proj.bias", value)
        put("patch_embed_a.proj.bias", value)
      elif key in ("pos_embed", "decoder_pos_embed"):
        put(f"{key}_v", np.asarray(value)[:, 1:])
      elif key.startswith("decoder_pred."):
        leaf = key.split(".", 1)[1]
        put(f"decoder_pred_v.{leaf}", value)
        rows = out[f"decoder_pred_a.{leaf}"].shape[0]
        put(f"decoder_pred_a.{leaf}", np.asarray(value)[:rows])
      else:  # decoder_embed, decoder_blocks, decoder_norm, mask_token: same names
        put(key, value)
    out.update(mapped)
    return out, sorted(set(out) - set(mapped))

  def setup(self):
    self.setup_encoder()
    dd = self.decoder_embed_dim
    self.decoder_embed = layers.dense(dd, ("embed", "decoder_embed"), self.dtype,
                                      "decoder_embed")
    token = nn.with_logical_partitioning(layers.token_init(), (None, None, "decoder_embed"))
    self.mask_token = self.param("mask_token", token, (1, 1, dd))
    self.decoder_modality_a = self.param("decoder_modality_a", token, (1, 1, dd))
    self.decoder_modality_v = self.param("decoder_modality_v", token, (1, 1, dd))
    self.decoder_pos_embed_a = self.sincos_table("decoder_pos_embed_a", self.audio_grid, dd,
                                                 "decoder_embed")
    self.decoder_pos_embed_v = self.sincos_table("decoder_pos_embed_v", self.video_grid, dd,
                                                 "decoder_embed")
    self.decoder_blocks = [self._block(dd, self.decoder_num_heads, f"decoder_blocks_{i}")
                           for i in range(self.decoder_depth)]
    self.decoder_norm = layers.layer_norm("decoder_norm", self.norm_eps)
    p2 = self.patch_size ** 2
    self.decoder_pred_a = layers.dense(p2, ("decoder_embed", "patch_out"), self.dtype,
                                       "decoder_pred_a")
    self.decoder_pred_v = layers.dense(p2 * self.in_chans, ("decoder_embed", "patch_out"),
                                       self.dtype, "decoder_pred_v")

  def draw_noise(self, batch: int) -> tuple[jax.Array, jax.Array]:
    """The masking noise for one batch from the "masking" rng stream (video: unstructured)."""
    key_a, key_v = jax.random.split(self.make_rng("masking"))
    noise_a = masking.draw_noise(key_a, batch, self.num_audio_tokens, self.mask_ratio_a,
                                 self.mask_mode, self.audio_grid)
    noise_v = masking.draw_noise(key_v, batch, self.num_video_tokens, self.mask_ratio_v)
    return noise_a, noise_v

  def encode(self, audio, frames, noise_a, noise_v):
    """Masked encoder: (joint latent, contrast latents, audio Masked, video Masked)."""
    self.check_inputs(audio, frames)
    ma = masking.apply_noise_mask(self.embed_audio(audio), noise_a, self.mask_ratio_a)
    mv = masking.apply_noise_mask(self.embed_video(frames), noise_v, self.mask_ratio_v)
    a = self.run(self.blocks_a, ma.kept)
    v = self.run(self.blocks_v, mv.kept)
    x = self.norm(self.run(self.blocks_u, jnp.concatenate([a, v], axis=1)))
    shared = self.blocks_u if self.chain_shared_blocks_in_contrast else self.blocks_u[-1:]
    ca = self.norm_a(self.run(shared, a, "a"))
    cv = self.norm_v(self.run(shared, v, "v"))
    return x, ca, cv, ma, mv

  def decode(self, latent, ids_restore_a, ids_restore_v):
    """Joint decoder over all audio and video positions -> (pred_a, pred_v) patches."""
    x = self.decoder_embed(latent)
    b, _, dd = x.shape
    la, lv = self.num_audio_tokens, self.num_video_tokens
    ka = masking.num_kept(la, self.mask_ratio_a)
    kv = masking.num_kept(lv, self.mask_ratio_v)

    def unshuffle(kept, total, ids_restore):
      fill = jnp.broadcast_to(self.mask_token.astype(kept.dtype), (b, total - kept.shape[1], dd))
      full = jnp.concatenate([kept, fill], axis=1)
      return jnp.take_along_axis(full, ids_restore[:, :, None], axis=1)

    a = unshuffle(x[:, :ka], la, ids_restore_a)
    v = unshuffle(x[:, ka:ka + kv], lv, ids_restore_v)
    a = a + self._pos(self.decoder_pos_embed_a) + self.decoder_modality_a
    v = v + self._pos(self.decoder_pos_embed_v) + self.decoder_modality_v
    x = self.run(self.decoder_blocks, jnp.concatenate([a, v], axis=1))
    x = self.decoder_norm(x)
    return self.decoder_pred_a(x[:, :la]), self.decoder_pred_v(x[:, la:])

  def __call__(self, audio: jax.Array, frames: jax.Array,
               noise_a: Optional[jax.Array] = None, noise_v: Optional[jax.Array] = None
               ) -> dict[str, jax.Array]:
    """Pretraining forward: losses and masks (the reference's `forward`).

    Returns loss, loss_mae, loss_mae_a, loss_mae_v, loss_c (weighted, as the reference
    reports it), nce (unweighted), c_acc, mask_a, mask_v and, when the decoder runs,
    pred_a / pred_v. A zero loss weight skips that branch, as in the reference.
    """
    if noise_a is None or noise_v is None:
      drawn_a, drawn_v = self.draw_noise(audio.shape[0])
      noise_a = drawn_a if noise_a is None else noise_a
      noise_v = drawn_v if noise_v is None else noise_v
    latent, ca, cv, ma, mv = self.encode(audio, frames, noise_a, noise_v)
    zero = jnp.zeros((), jnp.float32)
    out = {"mask_a": ma.mask, "mask_v": mv.mask}
    # At init every branch runs so that every parameter exists whatever the loss weights.
    if self.mae_loss_weight != 0 or self.is_initializing():
      pred_a, pred_v = self.decode(latent, ma.ids_restore, mv.ids_restore)
      target_a, target_v = self.reconstruction_targets(audio, frames)
      loss_a = losses.mae_loss(pred_a, target_a, ma.mask, self.norm_pix_loss)
      loss_v = losses.mae_loss(pred_v, target_v, mv.mask, self.norm_pix_loss)
      out.update(pred_a=pred_a, pred_v=pred_v, loss_mae_a=loss_a, loss_mae_v=loss_v,
                 loss_mae=self.mae_loss_weight * (loss_a + loss_v))
    else:
      out.update(loss_mae_a=zero, loss_mae_v=zero, loss_mae=zero)
    if self.contrast_loss_weight != 0 or self.is_initializing():
      nce, c_acc = losses.contrastive_loss(ca.mean(axis=1), cv.mean(axis=1),
                                           self.contrast_temperature, self.bidirect_contrast,
                                           self.contrastive_groups)
      out.update(nce=nce, c_acc=c_acc, loss_c=self.contrast_loss_weight * nce)
    else:
      out.update(nce=zero, c_acc=zero, loss_c=zero)
    out["loss"] = out["loss_mae"] + out["loss_c"]
    if self.contrastive_groups > 1:  # per-GPU means, summed over the G "GPUs"
      for key in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "nce"):
        out[key] = out[key] * self.contrastive_groups
    return out

  def forward_feat(self, audio: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_feat(audio, frames)


class CAVMAEFT(_Encoder):
  """The fine-tuning model: unmasked encoder, mean pooling, LayerNorm + Linear head."""
  num_classes: int = 527
  trainable_pos_embed: bool = True

  kind = "cav_mae_ft"
  is_classifier = True

  def modes(self) -> tuple[str, ...]:
    return common.MODES

  def frozen_param_names(self) -> tuple[str, ...]:
    return () if self.trainable_pos_embed else POS_EMBED_NAMES[:2]

  def init_rules(self) -> common.InitRules:
    """From a pretraining checkpoint the encoder (every tensor); its decoder and mask
    token are dropped; the head is taken from a fine-tuned checkpoint of the same class
    count, else it starts fresh (another label set)."""
    return common.InitRules(drop=(r"^decoder_", r"^mask_token"), replaceable=(r"^mlp_head_",))

  def forward_flops(self, mode: str = "multimodal") -> float:
    d, r = self.embed_dim, self.mlp_ratio
    la, lv = self.num_audio_tokens, self.num_video_tokens
    n_a, n_v = la * common.uses_audio(mode), lv * common.uses_video(mode)
    total = self._patch_embed_flops(n_a, n_v)
    total += self.modality_specific_depth * (flops.block_flops(n_a, d, r)
                                             + flops.block_flops(n_v, d, r))
    shared_passes = 2 if mode.startswith("missing") else 1
    total += shared_passes * self.shared_depth * flops.block_flops(n_a + n_v, d, r)
    return float(total + 2 * d * self.num_classes)

  def setup(self):
    self.setup_encoder()
    self.mlp_head_0 = layers.layer_norm("mlp_head_0", self.norm_eps)
    self.mlp_head_1 = layers.dense(self.num_classes, ("embed", "classes"), jnp.float32,
                                   "mlp_head_1")

  def head(self, pooled: jax.Array) -> jax.Array:
    return self.mlp_head_1(self.mlp_head_0(pooled))

  def pooled(self, audio: Optional[jax.Array], frames: Optional[jax.Array], mode: str
             ) -> jax.Array:
    """The pooled clip vector that `mode` feeds the head."""
    if mode not in common.MODES:
      raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}")
    needs_audio, needs_video = common.uses_audio(mode), common.uses_video(mode)
    if (needs_audio and audio is None) or (needs_video and frames is None):
      raise ValueError(f"mode {mode!r} needs {'audio' if needs_audio else ''}"
                       f"{' and ' if needs_audio and needs_video else ''}"
                       f"{'frames' if needs_video else ''}")
    self.check_inputs(audio if needs_audio else None, frames if needs_video else None)
    a = self.run(self.blocks_a, self.embed_audio(audio)) if needs_audio else None
    v = self.run(self.blocks_v, self.embed_video(frames)) if needs_video else None
    if mode == "multimodal":
      return self.norm(self.run(self.blocks_u, jnp.concatenate([a, v], axis=1))).mean(axis=1)
    tokens, modality, norm = (a, "a", self.norm_a) if needs_audio else (v, "v", self.norm_v)
    own = norm(self.run(self.blocks_u, tokens, modality)).mean(axis=1)
    if mode in ("audioonly", "videoonly"):
      return own
    # missing*: one modality given to a model tuned on both: average the unified-norm path
    # and the modality-norm path.
    unified = self.norm(self.run(self.blocks_u, tokens)).mean(axis=1)
    return (unified + own) / 2

  def __call__(self, audio: Optional[jax.Array], frames: Optional[jax.Array],
               mode: str = "multimodal") -> jax.Array:
    """Logits [B, num_classes] (the reference's `forward(a, v, mode)`)."""
    if self.is_initializing():  # run every path once so that every parameter exists
      for other in ("multimodal", "audioonly", "videoonly"):
        self.pooled(audio, frames, other)
    return self.head(self.pooled(audio, frames, mode))

  def forward_feat(self, audio: jax.Array, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_feat(audio, frames)



def reference_config(state_dict: Mapping[str, Any], source: str = "state dict"
                     ) -> Optional[dict[str, Any]]:
  """The model config (see models.build) of a reference CAV-MAE state dict, None if it is
  not one (no `modality_a`).

  Shapes fix widths, depths, grid sizes and the class count; head counts cannot be read
  from shapes, so they follow the ViT convention (head_dim 64 in the encoder, 32 in the
  decoder) unless the caller overrides them.
  """
  if "modality_a" not in state_dict:
    return None

  def shape(key):
    if key not in state_dict:
      raise common.CheckpointError(f"{source}: not a CAV-MAE state dict (no {key})")
    return tuple(state_dict[key].shape)

  embed_dim = shape("modality_a")[-1]
  patch = shape("patch_embed_a.proj.weight")[-1]
  n_audio, n_video = shape("pos_embed_a")[1], shape("pos_embed_v")[1]
  mel_rows = 128 // patch  # the reference fixes 128 mel bins; its audio grid is (8, T/16)
  side = int(round(n_video ** 0.5))
  cfg = dict(
      img_size=side * patch, audio_length=(n_audio // mel_rows) * patch,
      num_mel_bins=mel_rows * patch, patch_size=patch,
      in_chans=shape("patch_embed_v.proj.weight")[1], embed_dim=embed_dim,
      num_heads=max(1, embed_dim // 64),
      modality_specific_depth=common.count_blocks(state_dict, r"blocks_a\.(\d+)\."),
      shared_depth=common.count_blocks(state_dict, r"blocks_u\.(\d+)\."),
      mlp_ratio=shape("blocks_a.0.mlp.fc1.weight")[0] / embed_dim)
  if "mlp_head.1.weight" in state_dict:
    return dict(kind="cav_mae_ft", num_classes=shape("mlp_head.1.weight")[0], **cfg)
  decoder_dim = shape("decoder_embed.weight")[0]
  return dict(kind="cav_mae", decoder_embed_dim=decoder_dim,
              decoder_depth=common.count_blocks(state_dict, r"decoder_blocks\.(\d+)\."),
              decoder_num_heads=max(1, decoder_dim // 32), **cfg)
