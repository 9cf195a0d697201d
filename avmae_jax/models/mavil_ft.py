"""MAViL fine-tuning in Flax: `MAViLFT`, the encoders of models/mavil.py with classifier heads.

Its parameter names are those of the authors' inference code (mavil spec), so the released
fine-tuned checkpoint loads strictly; what a pretraining checkpoint gives it is its
`init_rules`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from avmae_jax.models import common
from avmae_jax.models import flops
from avmae_jax.models import layers
from avmae_jax.models.mavil import ENCODER_POS_EMBED_NAMES
from avmae_jax.models.mavil import MAViLEncoder

FT_MODES = common.TRAIN_MODES
FT_HEADS = ("multimodal", "unimodal", "all")
HEAD_MODES = {"multimodal": FT_MODES[:1], "unimodal": FT_MODES[1:], "all": FT_MODES}


class MAViLFT(MAViLEncoder):
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

  kind = "mavil_ft"
  is_classifier = True

  @classmethod
  def size_fields(cls, size: str) -> dict[str, Any]:
    fields = super().size_fields(size)
    fields["fusion_depth"] += 1  # the released fine-tuned model adds a fusion layer
    return fields

  @property
  def _fusion_layers(self) -> int:
    return 0 if self.heads == "unimodal" else self.fusion_depth

  def frozen_param_names(self) -> tuple[str, ...]:
    return () if self.trainable_pos_embed else ENCODER_POS_EMBED_NAMES

  def init_rules(self) -> common.InitRules:
    """From a MAViL checkpoint (stage 1 or 2, or fine-tuned) every encoder tensor (patch
    embeddings, cls tokens, position tables, both ViTs); dropped: the pretraining-only
    decoders, mask tokens and final `norm`, and fusion blocks this model does not have
    (unimodal heads have none); the heads are taken only when they all fit (class count,
    head set); fusion blocks the checkpoint lacks (the fine-tuning model has one more than
    pretraining, as the released one) keep their fresh values."""
    return common.InitRules(drop=(r"^decoder_", r"^mask_token", r"^norm/"),
                            optional=(r"^blocks_av_",),
                            replaceable=(r"^(fc_norm_|head_)",))

  def forward_flops(self, mode: str = "multimodal") -> float:
    """Unmasked ViTs, fusion for the multimodal head, the head."""
    d, r = self.embed_dim, self.mlp_ratio
    la, lv = self.num_audio_tokens, self.num_video_tokens
    use_a, use_v = mode != "videoonly", mode != "audioonly"
    n_a, n_v = (la + 1) * use_a, (lv + 1) * use_v
    total = self._patch_embed_flops(use_a, use_v)
    total += self.encoder_depth * (flops.block_flops(n_a, d, r) + flops.block_flops(n_v, d, r))
    if mode == "multimodal":
      total += self.fusion_depth * flops.block_flops(n_a + n_v, d, r)
      return float(total + 2 * 2 * d * self.num_classes)
    return float(total + 2 * d * self.num_classes)

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
