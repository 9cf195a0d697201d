"""Static-shape MAE masking: argsort of per-token noise, then gather.

Every mask is a function of an explicit noise array (or a PRNG key that draws it), so two
implementations given the same noise produce the same mask, which is how the tests
compare against the PyTorch port. `mask` uses the reference convention: 1 = removed.

Structured audio masks (the reference's 'time', 'freq' and 'tf' ablations) work on the
[f, t] token grid of a frequency-major spectrogram: chosen whole columns (time) and/or rows
(frequency) get noise 1.1, above any uniform draw, so the same argsort removes them first.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_MODES = ("unstructured", "time", "freq", "tf")


class Masked(NamedTuple):
  kept: jax.Array         # [B, len_keep, D] tokens that stay, in the order argsort gives
  mask: jax.Array         # [B, L] 1.0 where the token was removed, 0.0 where kept
  ids_restore: jax.Array  # [B, L] gathers (kept ++ removed) back to the original order


def num_kept(length: int, mask_ratio: float) -> int:
  """len_keep = int(L * (1 - r)), the reference's rounding."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
  return int(length * (1 - mask_ratio))


def apply_noise_mask(x: jax.Array, noise: jax.Array, mask_ratio: float) -> Masked:
  """Keeps the len_keep tokens of smallest noise (per sample)."""
  b, length, d = x.shape
  if noise.shape != (b, length):
    raise ValueError(f"noise shape {noise.shape} does not match tokens {(b, length)}")
  len_keep = num_kept(length, mask_ratio)
  # Stable sort: tied noise (the 1.1 of structured masks) resolves by position in every
  # implementation, so exact comparisons stay exact.
  ids_shuffle = jnp.argsort(noise, axis=1, stable=True)
  ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
  ids_keep = ids_shuffle[:, :len_keep]
  kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  removed = (jnp.arange(length) >= len_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(jnp.broadcast_to(removed, (b, length)), ids_restore, axis=1)
  del d
  return Masked(kept, mask, ids_restore)


def _choose(key: jax.Array, batch: int, size: int, count: int) -> jax.Array:
  """[batch, size] booleans with exactly `count` True per row, uniformly chosen."""
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, size)), axis=1), axis=1)
  return ranks < count


def structured_noise(key: jax.Array, noise: jax.Array, mask_ratio: float, mode: str,
                     grid: tuple[int, int]) -> jax.Array:
  """Raises chosen whole time columns and/or frequency rows of `noise` [B, f*t] to 1.1."""
  f, t = grid
  b = noise.shape[0]
  if mode not in MASK_MODES:
    raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
  if mode == "unstructured":
    return noise
  n_cols = {"time": int(t * mask_ratio), "freq": 0, "tf": int(t * mask_ratio * 0.7)}[mode]
  n_rows = {"time": 0, "freq": int(f * mask_ratio), "tf": int(f * mask_ratio * 0.7)}[mode]
  key_t, key_f = jax.random.split(key)
  cols = _choose(key_t, b, t, n_cols)[:, None, :]
  rows = _choose(key_f, b, f, n_rows)[:, :, None]
  grid_noise = jnp.where(cols | rows, 1.1, noise.reshape(b, f, t))
  return grid_noise.reshape(b, f * t)


def draw_noise(key: jax.Array, batch: int, length: int, mask_ratio: float,
               mode: str = "unstructured", grid: tuple[int, int] | None = None) -> jax.Array:
  """The noise the reference would draw for one modality; `grid` is needed for audio modes."""
  key_u, key_s = jax.random.split(key)
  noise = jax.random.uniform(key_u, (batch, length))
  if mode == "unstructured":
    return noise
  if grid is None or grid[0] * grid[1] != length:
    raise ValueError(f"structured mask_mode {mode!r} needs the token grid (f, t) of {length}")
  return structured_noise(key_s, noise, mask_ratio, mode, grid)
