"""Transformer building blocks shared by CAV-MAE and MAViL, with logical axis names.

Parameter and submodule names mirror the reference PyTorch modules one to one
(`blocks_a_3/attn/qkv/kernel` is `blocks_a.3.attn.qkv.weight`), so checkpoint conversion
is a mechanical rename plus transposes, with no per-key table.

Every parameter carries logical axis names ("embed", "mlp", "heads", ...) and activations
are constrained with ("act_batch", "act_length", "act_embed") (separate names, so that a
parameter's embed axis and an activation's can map to different mesh axes);
`avmae_jax.parallel.rules` maps both onto a mesh with a short rule list. Outside a mesh
(`jax.set_mesh`) the annotations are no-ops.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The reference (PyTorch) defaults, which differ from Flax's: LayerNorm eps 1e-5 (Flax 1e-6),
# exact erf GELU (Flax default is the tanh approximation).
TORCH_LAYERNORM_EPS = 1e-5

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def token_init(stddev: float = 0.02) -> Callable[..., jax.Array]:
  return nn.initializers.normal(stddev)


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """[sin(p*w), cos(p*w)] with w_i = 1/10000^(i/(dim/2)); float64."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding width must be even, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos table [grid_h*grid_w, dim], row-major over (row, col).

  Token (row, col) gets concat(1d(col, dim/2), 1d(row, dim/2)): the column half comes
  first, as in the MAE family of models. Computed in float64, returned as float32.
  """
  return sincos_2d_f64(dim, grid_h, grid_w).astype(np.float32)


def sincos_2d_f64(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """`sincos_2d` in float64 (for composing into larger tables before the one cast)."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  return np.concatenate([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1)


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 3-D sin-cos table [grid_t*grid_h*grid_w, dim], row-major over (t, row, col).

  Token (t, row, col) gets concat(1d(t, dim/4), sincos_2d(3*dim/4)(row, col)): a quarter of
  the width encodes time, three quarters space (the MAE-ST / MAViL layout). Computed in
  float64, returned as float32.
  """
  if dim % 16:
    # dim/4 (time) and 3*dim/8 (each spatial half) must be even.
    raise ValueError(f"3-D sin-cos embedding width must be a multiple of 16, got {dim}")
  spatial = sincos_2d_f64(dim // 4 * 3, grid_h, grid_w)             # [h*w, 3D/4]
  temporal = sincos_1d(np.arange(grid_t), dim // 4)                 # [t, D/4]
  table = np.concatenate([np.repeat(temporal, grid_h * grid_w, axis=0),
                          np.tile(spatial, (grid_t, 1))], axis=1)
  return table.astype(np.float32)


def table_init(table: Callable[[int], np.ndarray], cls_row: bool = False
               ) -> Callable[..., jax.Array]:
  """Initialiser filling a [1, N, dim] parameter with `table(dim)` ([N, dim] numpy).

  With `cls_row`, a zero row for the cls token comes first (N = 1 + table rows), as in the
  MAE family's `get_*_sincos_pos_embed(..., cls_token=True)`.
  """

  def init(key, shape, dtype=jnp.float32):
    del key
    values = np.asarray(table(shape[-1]), np.float32)
    if cls_row:
      values = np.concatenate([np.zeros((1, shape[-1]), np.float32), values], axis=0)
    if (1,) + values.shape != tuple(shape):
      raise ValueError(f"position table has shape {(1,) + values.shape}, parameter {shape}")
    return jnp.asarray(values[None], dtype)

  return init


def sincos_init(grid_h: int, grid_w: int) -> Callable[..., jax.Array]:
  """Initialiser filling a [1, grid_h*grid_w, dim] parameter with the 2-D sin-cos table."""

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(sincos_2d(shape[-1], grid_h, grid_w)[None], dtype)

  return init


def dense(features: int, kernel_axes: tuple[str, str], dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(xavier_uniform, kernel_axes),
      bias_init=nn.with_logical_partitioning(zeros, (kernel_axes[1],)))


def layer_norm(name: str, eps: float, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(zeros, ("norm",)))


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


class _PatchProjection(nn.Module):
  """A stride-p, p x p convolution computed as a matmul on flattened patches.

  Same parameters as a Conv (`kernel` [p, p, C, D], `bias` [D]) and the same result, since
  the patches do not overlap. The matmul form matters on TPU: the weight gradient of the
  strided convolution took XLA 214 s to compile (v5e), the matmul 0.5 s.
  """
  features: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c = self.patch_size, x.shape[-1]
    # The reference initialises the conv like a Linear on its [out, in*p*p] view; xavier
    # on the [p, p, in, out] kernel with in_axis=(0,1,2) is that same fan-in/out.
    kernel_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            kernel_init, ("patch_h", "patch_w", "channels", "embed")),
        (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("embed",)),
                      (self.features,), jnp.float32)
    b, height, width, _ = x.shape
    h, w = height // p, width // p
    # [B, H, W, C] -> [B, h*w, p*p*C] with inner order (row in patch, column, channel),
    # the order of the kernel's first three axes.
    patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, -1)
    out = patches.astype(self.dtype) @ kernel.reshape(-1, self.features).astype(self.dtype)
    return out + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens, parameters under `proj` like the reference's Conv.

  Input NHWC [B, H, W, C]; output [B, (H/p)*(W/p), D] in row-major (H, W) order.
  """
  embed_dim: int
  patch_size: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _PatchProjection(self.embed_dim, self.patch_size, self.dtype, name="proj")(x)


class PatchEmbed3D(nn.Module):
  """Non-overlapping tubelets -> tokens: the reference's Conv3d (kernel = stride) as a matmul.

  Input [B, T, H, W, C] (frames, NHWC per frame); output [B, (T/kt)*(H/p)*(W/p), D] in
  row-major (t, h, w) order, the order of a Conv3d's flattened output. Parameters under
  `proj`: `kernel` [kt, p, p, C, D] (torch Conv3d weight [D, C, kt, p, p]) and `bias` [D].
  """
  embed_dim: int
  tubelet_size: int = 2
  patch_size: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _TubeletProjection(self.embed_dim, self.tubelet_size, self.patch_size, self.dtype,
                              name="proj")(x)


class _TubeletProjection(nn.Module):
  features: int
  tubelet_size: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    u, p, c = self.tubelet_size, self.patch_size, x.shape[-1]
    # Xavier on the torch [out, in*kt*p*p] view, as for the 2-D patch projection.
    kernel_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=-1)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            kernel_init, ("patch_t", "patch_h", "patch_w", "channels", "embed")),
        (u, p, p, c, self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(zeros, ("embed",)),
                      (self.features,), jnp.float32)
    b, frames, height, width, _ = x.shape
    t, h, w = frames // u, height // p, width // p
    # [B, T, H, W, C] -> [B, t*h*w, u*p*p*C], inner order (frame, row, column, channel): the
    # order of the kernel's first four axes.
    tubes = x.reshape(b, t, u, h, p, w, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    tubes = tubes.reshape(b, t * h * w, -1)
    out = tubes.astype(self.dtype) @ kernel.reshape(-1, self.features).astype(self.dtype)
    return out + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (q, k, v order, like timm)."""
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    qkv = dense(3 * d, ("embed", "qkv"), self.dtype, "qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
    q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5)
    out = out.reshape(b, n, d)
    return dense(d, ("heads_merged", "embed"), self.dtype, "proj")(out)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.gelu(h, approximate=False)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return dense(d, ("mlp", "embed"), self.dtype, "fc2")(h)


class Block(nn.Module):
  """Pre-norm transformer block whose modality picks its LayerNorm pair.

  Attention and MLP weights are shared across modalities; `modality=None` uses
  norm1/norm2, 'a' uses norm1_a/norm2_a, 'v' uses norm1_v/norm2_v. All six norms are
  created at init even when a model never calls some of them, because reference
  checkpoints carry them and export must write every tensor the reference has.
  `modality_norms=False` gives the plain timm ViT block (norm1, attn, norm2, mlp only),
  which MAViL uses.

  `drop_path` > 0 is stochastic depth (timm's DropPath): in training each sample skips
  the attention and MLP branches with that probability, survivors scaled by 1/(1 - p).
  It is on exactly when the caller gives a "dropout" rng (the fine-tuning train step
  does; evaluation, feature extraction and export do not), so no flag is threaded.
  """
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = TORCH_LAYERNORM_EPS
  dtype: Dtype = jnp.float32
  modality_norms: bool = True
  drop_path: float = 0.0

  def setup(self):
    self.norm1 = layer_norm("norm1", self.norm_eps)
    if self.modality_norms:
      self.norm1_a = layer_norm("norm1_a", self.norm_eps)
      self.norm1_v = layer_norm("norm1_v", self.norm_eps)
    self.attn = Attention(self.dim, self.num_heads, dtype=self.dtype, name="attn")
    self.norm2 = layer_norm("norm2", self.norm_eps)
    if self.modality_norms:
      self.norm2_a = layer_norm("norm2_a", self.norm_eps)
      self.norm2_v = layer_norm("norm2_v", self.norm_eps)
    self.mlp = Mlp(int(self.dim * self.mlp_ratio), dtype=self.dtype, name="mlp")

  def __call__(self, x: jax.Array, modality: Optional[str] = None) -> jax.Array:
    norms = {None: (self.norm1, self.norm2)}
    if self.modality_norms:
      norms.update(a=(self.norm1_a, self.norm2_a), v=(self.norm1_v, self.norm2_v))
    if modality not in norms:
      raise ValueError(f"modality must be one of {sorted(norms, key=str)}, got {modality!r}")
    if self.is_initializing():
      for pair in norms.values():  # create all six norms (see class docstring)
        pair[0](x), pair[1](x)
    n1, n2 = norms[modality]
    x = x + self.drop_branch(self.attn(n1(x).astype(self.dtype)))
    x = x + self.drop_branch(self.mlp(n2(x).astype(self.dtype)))
    return constrain(x, ("act_batch", "act_length", "act_embed"))

  def drop_branch(self, branch: jax.Array) -> jax.Array:
    """Stochastic depth on a residual branch [B, ...] (identity without a "dropout" rng)."""
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
    if self.drop_path == 0.0 or not self.has_rng("dropout"):
      return branch
    keep = 1.0 - self.drop_path
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return branch * (kept / keep).astype(branch.dtype)
