"""Transformer building blocks shared by CAV-MAE and MAViL, with logical axis names.

Parameter and submodule names mirror the reference PyTorch modules one to one
(`blocks_a_3/attn/qkv/kernel` is `blocks_a.3.attn.qkv.weight`), so checkpoint conversion
is a mechanical rename plus transposes, with no per-key table.

Every parameter carries logical axis names ("embed", "mlp", "heads", ...) and activations
are constrained with ("act_batch", "act_length", "act_embed") (separate names, so that a
parameter's embed axis and an activation's can map to different mesh axes);
`avmae_jax.parallel.rules` maps both onto a mesh with a short rule list. Outside a mesh
(`jax.set_mesh`) the annotations are no-ops.

Also here: the compute choices a model config names by string, resolved in one place —
the rematerialisation policies (`REMAT_POLICIES`), the attention implementations
(`ATTENTION_IMPLS`) and `BlockStack`, which runs a list of identical blocks either unrolled
or as one `lax.scan` over their stacked parameters.
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


# Rematerialisation policies by config name: what the backward pass may keep from the
# forward pass of a block instead of recomputing it. "none" keeps everything (no remat),
# "full" keeps nothing but the block's input; the rest are `jax.checkpoint_policies`.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")
# jax.nn.dot_product_attention implementations: "xla" (any backend), "cudnn" (NVIDIA GPU,
# bf16/fp16, the fused flash kernel) and "auto" (cuDNN where it applies, else XLA).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def remat_policy(name: str) -> Optional[Callable[..., bool]]:
  """The `jax.checkpoint` policy a config name stands for (None: save nothing)."""
  if name not in REMAT_POLICIES or name == "none":
    raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES} (here not "
                     f"'none'), got {name!r}")
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


def check_compute_fields(remat: str, attention: str) -> None:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {remat!r}")
  if attention not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention must be one of {ATTENTION_IMPLS}, got {attention!r}")


def _cudnn_applies(q: jax.Array) -> bool:
  """Whether cuDNN's fused attention takes these inputs [B, N, heads, head_dim] here: an
  NVIDIA GPU, half precision, head_dim a multiple of 8 up to 128 (its flash kernel's
  limits)."""
  head_dim = q.shape[-1]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def attention_op(q, k, v, scale: float, impl: str) -> jax.Array:
  """softmax(q k^T * scale) v per head, by `impl` (ATTENTION_IMPLS); [B, N, heads, dim]."""
  if impl == "cudnn" or (impl == "auto" and _cudnn_applies(q)):
    try:
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    except Exception as e:  # noqa: BLE001 - cuDNN reports unsupported inputs in many ways
      if impl == "cudnn":
        raise ValueError(f"model.attention='cudnn' cannot run here ({type(e).__name__}: "
                         f"{e}); use 'auto' or 'xla'") from e
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


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
    patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * h * w, -1)
    return _tokens_matmul(patches, kernel, bias, self.dtype).reshape(b, h * w, self.features)


def _tokens_matmul(rows: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """[N, k] flattened patches (batch and tokens in one axis) @ kernel viewed as [k, D].

  One contracting axis on each side: the weight gradient is then a plain [k, N] @ [N, D]
  matmul. Contracting over (batch, tokens) instead made the TPU compiler lower it as a
  convolution, which took it 2.4 minutes to compile for the base model (v5e, float32).
  """
  features = kernel.shape[-1]
  return rows.astype(dtype) @ kernel.reshape(-1, features).astype(dtype) + bias.astype(dtype)


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
    tubes = tubes.reshape(b * t * h * w, -1)
    return _tokens_matmul(tubes, kernel, bias, self.dtype).reshape(b, t * h * w, self.features)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (q, k, v order, like timm)."""
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # ATTENTION_IMPLS

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
    out = attention_op(q, k, v, head_dim ** -0.5, self.attention)
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
  does; evaluation, feature extraction and export do not), so no flag is threaded. Inside a
  `BlockStack` scan the rate is a traced scalar (one per layer).
  """
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = TORCH_LAYERNORM_EPS
  dtype: Dtype = jnp.float32
  modality_norms: bool = True
  drop_path: Any = 0.0
  attention: str = "xla"

  def setup(self):
    self.norm1 = layer_norm("norm1", self.norm_eps)
    if self.modality_norms:
      self.norm1_a = layer_norm("norm1_a", self.norm_eps)
      self.norm1_v = layer_norm("norm1_v", self.norm_eps)
    self.attn = Attention(self.dim, self.num_heads, dtype=self.dtype,
                          attention=self.attention, name="attn")
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
    if isinstance(self.drop_path, (int, float)):
      check_drop_path(self.drop_path)
      if self.drop_path == 0.0:
        return branch
    if not self.has_rng("dropout"):
      return branch
    keep = 1.0 - self.drop_path
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return branch * (kept / keep).astype(branch.dtype)


def check_drop_path(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"drop_path must be in [0, 1), got {rate}")


class BlockStack:
  """Runs a list of identical blocks (same class and sizes, own parameters) in order.

  Unrolled, each block is its own piece of the compiled program; with `scan`, the blocks'
  parameters are stacked inside the computation and one `lax.scan` runs a single copy of
  the block over them (big_vision's and MaxText's `scan_layers`), so XLA compiles one
  block instead of N. The stored parameters keep the per-block names either way
  (`blocks_a_0/...`, the reference's layout), so checkpoints, `.pth` import and export,
  optimizer masks and layer-wise lr decay never see the stacking, and a scanned and an
  unrolled model are the same function of the same parameters.

  `remat` (REMAT_POLICIES) recomputes each block's activations in the backward pass under
  that policy. Per-layer drop-path rates become a scanned input; the dropout key of layer
  i is fold_in(the stack's key, i).
  """

  def __init__(self, owner: nn.Module, blocks, scan: bool, remat: str):
    self.owner, self.blocks, self.scan, self.remat = owner, list(blocks), scan, remat

  def __call__(self, x: jax.Array, *static_args) -> jax.Array:
    if not self.scan or len(self.blocks) < 2 or self.owner.is_initializing():
      # Init runs unrolled: every block creates its parameters under its own name.
      for block in self.blocks:
        x = block(x, *static_args)
      return x
    rates = [float(b.drop_path) for b in self.blocks]
    for rate in rates:
      check_drop_path(rate)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[b.variables["params"] for b in self.blocks])
    dropout = any(rates) and self.owner.has_rng("dropout")
    key = self.owner.make_rng("dropout") if dropout else jax.random.key(0)
    template = self.blocks[0].clone(parent=None, name=None)

    def body(carry, layer):
      params, rate, index = layer
      block = template.clone(drop_path=rate if any(rates) else 0.0)
      rngs = {"dropout": jax.random.fold_in(key, index)} if dropout else {}
      return block.apply({"params": params}, carry, *static_args, rngs=rngs), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(rates, jnp.float32),
                                  jnp.arange(len(self.blocks))))
    return x
