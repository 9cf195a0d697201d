"""Flax layer pieces against float64 numpy written from the spec, independently of the code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae_jax.models import layers
from avmae_jax.models import losses
from avmae_jax.models import masking


def numpy_sincos(dim, grid_h, grid_w):
  """Token (row, col) -> concat(1d(col, dim/2), 1d(row, dim/2)), one token at a time."""
  half, quarter = dim // 2, dim // 4
  table = np.zeros((grid_h * grid_w, dim))
  for row in range(grid_h):
    for col in range(grid_w):
      for i in range(quarter):
        w = 1.0 / 10000 ** (i / quarter)
        token = row * grid_w + col
        table[token, i] = np.sin(col * w)
        table[token, quarter + i] = np.cos(col * w)
        table[token, half + i] = np.sin(row * w)
        table[token, half + quarter + i] = np.cos(row * w)
  return table


@pytest.mark.parametrize("dim,grid", [(768, (8, 64)), (512, (14, 14)), (16, (3, 5))])
def test_sincos_table_matches_float64(dim, grid):
  np.testing.assert_allclose(layers.sincos_2d(dim, *grid), numpy_sincos(dim, *grid),
                             rtol=0, atol=1e-6)


def test_patchify_order_and_round_trip():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 48, 3)).astype(np.float32)
  patches = np.asarray(losses.patchify(jnp.asarray(images), 16))
  assert patches.shape == (2, 2 * 3, 16 * 16 * 3)
  for b in range(2):
    for h in range(2):
      for w in range(3):
        for p in (0, 7, 15):
          for q in (0, 9, 15):
            for c in range(3):
              assert patches[b, h * 3 + w, (p * 16 + q) * 3 + c] == images[
                  b, h * 16 + p, w * 16 + q, c]
  back = losses.unpatchify(jnp.asarray(patches), 16, (2, 3), 3)
  np.testing.assert_array_equal(np.asarray(back), images)


def test_audio_tokens_are_frequency_major():
  """Token k = f*(T/16) + t covers mel bins 16f.. and frames 16t.. of the [T, F] input."""
  audio = np.arange(2 * 64 * 32, dtype=np.float32).reshape(2, 64, 32)  # T=64, F=32
  patches = np.asarray(losses.patchify(losses.spectrogram_image(jnp.asarray(audio)), 16))
  t_cols = 64 // 16
  for f in range(2):
    for t in range(t_cols):
      # inner order (p=freq, q=time): element (p, q) is audio[16t+q, 16f+p]
      want = audio[0, 16 * t:16 * t + 16, 16 * f:16 * f + 16].T.reshape(-1)
      np.testing.assert_array_equal(patches[0, f * t_cols + t], want)


@pytest.mark.parametrize("length,ratio", [(512, 0.75), (196, 0.75), (196, 0.9), (10, 0.0)])
def test_masking_keeps_exactly_len_keep(length, ratio):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, length, 4)))
  noise = masking.draw_noise(jax.random.key(0), 3, length, ratio)
  out = masking.apply_noise_mask(x, noise, ratio)
  len_keep = int(length * (1 - ratio))
  assert out.kept.shape == (3, len_keep, 4)
  mask = np.asarray(out.mask)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(axis=1), length - len_keep)
  noise = np.asarray(noise)
  for b in range(3):
    kept_ids = np.sort(np.argsort(noise[b], kind="stable")[:len_keep])
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), kept_ids)
    # the kept tokens are those rows of x, in ascending-noise order
    order = np.argsort(noise[b], kind="stable")[:len_keep]
    np.testing.assert_array_equal(np.asarray(out.kept[b]), np.asarray(x[b])[order])
    # ids_restore undoes the shuffle
    shuffled = np.asarray(x[b])[np.argsort(noise[b], kind="stable")]
    np.testing.assert_array_equal(shuffled[np.asarray(out.ids_restore[b])], np.asarray(x[b]))


@pytest.mark.parametrize("mode,ratio", [("time", 0.75), ("freq", 0.75), ("time", 0.5),
                                        ("freq", 0.5)])
def test_structured_masks_remove_whole_columns_or_rows(mode, ratio):
  f, t = 8, 64
  x = jnp.zeros((4, f * t, 2))
  noise = masking.draw_noise(jax.random.key(3), 4, f * t, ratio, mode, (f, t))
  mask = np.asarray(masking.apply_noise_mask(x, noise, ratio).mask).reshape(4, f, t)
  for b in range(4):
    if mode == "time":
      cols = mask[b].all(axis=0)
      assert cols.sum() == int(t * ratio)
      np.testing.assert_array_equal(mask[b], np.broadcast_to(cols, (f, t)))
    else:
      rows = mask[b].all(axis=1)
      assert rows.sum() == int(f * ratio)
      np.testing.assert_array_equal(mask[b], np.broadcast_to(rows[:, None], (f, t)))


def test_tf_mask_stays_inside_chosen_rows_and_columns():
  f, t, ratio = 8, 64, 0.75
  noise = np.asarray(masking.draw_noise(jax.random.key(4), 4, f * t, ratio, "tf", (f, t)))
  mask = np.asarray(masking.apply_noise_mask(jnp.zeros((4, f * t, 1)), jnp.asarray(noise),
                                             ratio).mask)
  grid = noise.reshape(4, f, t) == 1.1
  for b in range(4):
    cols, rows = grid[b].all(axis=0), grid[b].all(axis=1)
    assert cols.sum() == int(t * ratio * 0.7) and rows.sum() == int(f * ratio * 0.7)
    chosen = (cols[None, :] | rows[:, None]).reshape(-1)
    assert mask[b].sum() == f * t - int(f * t * (1 - ratio))
    assert not np.any(mask[b].astype(bool) & ~chosen)  # nothing removed outside them


def test_mae_loss_matches_float64():
  rng = np.random.default_rng(5)
  pred = rng.standard_normal((2, 6, 12))
  target = rng.standard_normal((2, 6, 12)) * 3 + 1
  mask = (rng.random((2, 6)) > 0.5).astype(np.float64)
  mask[0, 0] = 1.0
  mean = target.mean(-1, keepdims=True)
  std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  for norm_pix, tgt in ((True, (target - mean) / std), (False, target)):
    want = (((pred - tgt) ** 2).mean(-1) * mask).sum() / mask.sum()
    got = losses.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm_pix)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_contrastive_loss_matches_float64(bidirectional):
  rng = np.random.default_rng(6)
  a, v = rng.standard_normal((2, 5, 7))
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  sim = an @ vn.T / 0.05

  def way(s):  # softmax over axis 0: for each video column, over audios
    logp = s - np.log(np.exp(s - s.max(0)).sum(0)) - s.max(0)
    return -np.mean(np.diag(logp)), np.mean(s.argmax(0) == np.arange(5))

  want_nce, want_acc = way(sim)
  if bidirectional:
    nce_t, acc_t = way(sim.T)
    want_nce, want_acc = (want_nce + nce_t) / 2, (want_acc + acc_t) / 2
  nce, acc = losses.contrastive_loss(jnp.asarray(a), jnp.asarray(v), 0.05, bidirectional)
  np.testing.assert_allclose(float(nce), want_nce, rtol=1e-5)
  assert float(acc) == pytest.approx(want_acc)


def test_block_uses_the_norm_pair_of_its_modality():
  block = layers.Block(dim=8, num_heads=2)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 3, 8)), jnp.float32)
  params = block.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p, params)
  names = set(params)
  assert {"norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"} <= names
  # give each norm a distinct bias: the outputs must then differ by modality
  params = dict(params)
  for i, name in enumerate(("norm1", "norm1_a", "norm1_v")):
    params[name] = {"scale": params[name]["scale"], "bias": jnp.full((8,), float(i))}
  outs = [block.apply({"params": params}, x, m) for m in (None, "a", "v")]
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
  with pytest.raises(ValueError, match="modality"):
    block.apply({"params": params}, x, "x")


def test_contrastive_groups_are_independent_chunks():
  rng = np.random.default_rng(8)
  a, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, 8, 6)))
  nce, acc = losses.contrastive_loss(a, v, 0.05, False, groups=2)
  parts = [losses.contrastive_loss(a[i:i + 4], v[i:i + 4], 0.05) for i in (0, 4)]
  np.testing.assert_allclose(float(nce), np.mean([float(p[0]) for p in parts]), rtol=1e-6)
  assert float(acc) == pytest.approx(np.mean([float(p[1]) for p in parts]))
  whole, _ = losses.contrastive_loss(a, v, 0.05)
  assert abs(float(whole) - float(nce)) > 1e-3  # more negatives: a different loss
  with pytest.raises(ValueError, match="contrastive_groups=3"):
    losses.contrastive_loss(a, v, 0.05, groups=3)


@pytest.mark.slow
def test_drop_path_skips_whole_branches_per_sample():
  """Stochastic depth: each sample keeps or skips each residual branch (kept ones scaled by
  1/(1-p)); off without a "dropout" rng."""
  p, batch = 0.5, 256
  block = layers.Block(16, 2, modality_norms=False, drop_path=p)
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 3, 16)), (batch, 3, 16))
  params = block.init(jax.random.key(1), x)
  plain = layers.Block(16, 2, modality_norms=False).apply(params, x)
  np.testing.assert_array_equal(block.apply(params, x), plain)

  bound = block.bind(params)
  attn = bound.attn(bound.norm1(x[:1]))
  candidates = []
  for keep_attn in (0, 1):
    x1 = x[:1] + keep_attn * attn / (1 - p)
    mlp = bound.mlp(bound.norm2(x1))
    candidates += [x1, x1 + mlp / (1 - p)]
  out = block.apply(params, x, rngs={"dropout": jax.random.key(2)})
  dist = np.stack([np.abs(np.asarray(out) - np.asarray(c)).max(axis=(1, 2))
                   for c in candidates])
  assert np.all(dist.min(axis=0) < 1e-5)  # every sample is one of the four combinations
  counts = np.bincount(dist.argmin(axis=0), minlength=4)
  assert np.all((counts > 30) & (counts < 100)), counts  # ~64 each (binomial sd 7)
  with pytest.raises(ValueError, match="drop_path"):
    layers.Block(16, 2, modality_norms=False, drop_path=1.0).apply(
        params, x, rngs={"dropout": jax.random.key(2)})
