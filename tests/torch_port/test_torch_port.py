"""Tests for the PyTorch port of CAV-MAE (`avmae_jax.torch_port`).

The port is the reference the Flax models are compared against, so the checks here are
written against the spec (cav-mae.md sections 4-5) with independent numpy formulas, not
against the port's own helpers. Everything but the base-size key/value counts uses tiny
models so the file runs in seconds on CPU.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avmae_jax import torch_port as tp  # pylint: disable=g-import-not-at-top

# Tiny geometry: audio [B, T=32, F=16] -> grid (4, 8); frames 16x16 -> grid (4, 4).
TINY = dict(img_size=16, audio_length=32, num_mel_bins=16, patch_size=4, in_chans=3,
            embed_dim=16, modality_specific_depth=2, shared_depth=1, num_heads=2,
            mlp_ratio=2.0)
TINY_DEC = dict(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
B = 4
LA, LV = 32, 16


def _tiny(**kw):
  torch.manual_seed(0)
  return tp.CAVMAE(**{**TINY, **TINY_DEC, **kw}).eval()


def _inputs(seed=1, b=B):
  g = torch.Generator().manual_seed(seed)
  audio = torch.randn(b, TINY["audio_length"], TINY["num_mel_bins"], generator=g)
  frames = torch.randn(b, 3, TINY["img_size"], TINY["img_size"], generator=g)
  return audio, frames


def _np(t):
  return t.detach().double().numpy()


def _perturb_norms(model, seed=0):
  """Gives every LayerNorm distinct affine parameters (init makes them all 1/0), so that
  using the wrong norm of a block, or the wrong final norm, changes the result."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, torch.nn.LayerNorm):
        mod.weight.copy_(1 + 0.5 * torch.randn(mod.weight.shape, generator=g))
        mod.bias.copy_(0.5 * torch.randn(mod.bias.shape, generator=g))
  return model


# ----------------------------------------------------------------------------------------------
# Key layout and sizes of the base models.
# ----------------------------------------------------------------------------------------------


def _expected_block(prefix, d):
  out = {}
  for n in ("norm1", "norm1_a", "norm1_v", "norm2", "norm2_a", "norm2_v"):
    out[f"{prefix}.{n}.weight"] = (d,)
    out[f"{prefix}.{n}.bias"] = (d,)
  out[f"{prefix}.attn.qkv.weight"] = (3 * d, d)
  out[f"{prefix}.attn.qkv.bias"] = (3 * d,)
  out[f"{prefix}.attn.proj.weight"] = (d, d)
  out[f"{prefix}.attn.proj.bias"] = (d,)
  out[f"{prefix}.mlp.fc1.weight"] = (4 * d, d)
  out[f"{prefix}.mlp.fc1.bias"] = (4 * d,)
  out[f"{prefix}.mlp.fc2.weight"] = (d, 4 * d)
  out[f"{prefix}.mlp.fc2.bias"] = (d,)
  return out


def _expected_encoder_layout():
  """Spec section 4 key layout (without `module.`), encoder part."""
  e = {
      "modality_a": (1, 1, 768), "modality_v": (1, 1, 768),
      "pos_embed_a": (1, 512, 768), "pos_embed_v": (1, 196, 768),
      "patch_embed_a.proj.weight": (768, 1, 16, 16), "patch_embed_a.proj.bias": (768,),
      "patch_embed_v.proj.weight": (768, 3, 16, 16), "patch_embed_v.proj.bias": (768,),
  }
  for i in range(11):
    e.update(_expected_block(f"blocks_a.{i}", 768))
    e.update(_expected_block(f"blocks_v.{i}", 768))
  e.update(_expected_block("blocks_u.0", 768))
  for n in ("norm_a", "norm_v", "norm"):
    e[f"{n}.weight"] = (768,)
    e[f"{n}.bias"] = (768,)
  return e


def test_base_cavmae_state_dict_matches_spec_layout():
  sd = tp.CAVMAE().state_dict()
  expected = _expected_encoder_layout()
  expected.update({
      "mask_token": (1, 1, 512), "decoder_modality_a": (1, 1, 512),
      "decoder_modality_v": (1, 1, 512), "decoder_pos_embed_a": (1, 512, 512),
      "decoder_pos_embed_v": (1, 196, 512), "decoder_embed.weight": (512, 768),
      "decoder_embed.bias": (512,), "decoder_norm.weight": (512,),
      "decoder_norm.bias": (512,), "decoder_pred_a.weight": (256, 512),
      "decoder_pred_a.bias": (256,), "decoder_pred_v.weight": (768, 512),
      "decoder_pred_v.bias": (768,),
  })
  for i in range(8):
    expected.update(_expected_block(f"decoder_blocks.{i}", 512))
  assert len(sd) == 647
  assert sum(v.numel() for v in sd.values()) == 191_036_160
  assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_base_cavmaeft_state_dict_matches_spec_layout():
  model = tp.CAVMAEFT(527)
  sd = model.state_dict()
  expected = _expected_encoder_layout()
  expected.update({"mlp_head.0.weight": (768,), "mlp_head.0.bias": (768,),
                   "mlp_head.1.weight": (527, 768), "mlp_head.1.bias": (527,)})
  assert sum(v.numel() for v in sd.values()) == 164_907_023
  assert {k: tuple(v.shape) for k, v in sd.items()} == expected
  # Trainable in fine-tuning, fixed in pretraining (checked on the tiny model below).
  assert model.pos_embed_a.requires_grad and model.pos_embed_v.requires_grad


# ----------------------------------------------------------------------------------------------
# Helpers: sin-cos table, patchify, masking.
# ----------------------------------------------------------------------------------------------


def _sincos_reference(d, gh, gw):
  """Spec formula, one token at a time in float64."""
  half, quarter = d // 2, d // 4
  w = np.array([1.0 / 10000.0**(i / quarter) for i in range(quarter)], dtype=np.float64)
  out = np.zeros((gh * gw, d), dtype=np.float64)
  for row in range(gh):
    for col in range(gw):
      k = row * gw + col
      out[k, :quarter] = np.sin(col * w)
      out[k, quarter:half] = np.cos(col * w)
      out[k, half:half + quarter] = np.sin(row * w)
      out[k, half + quarter:] = np.cos(row * w)
  return out


@pytest.mark.parametrize("d,gh,gw", [(8, 3, 5), (768, 8, 64), (512, 14, 14)])
def test_sincos_matches_float64_formula(d, gh, gw):
  got = tp.sincos_pos_embed_2d(d, gh, gw)
  assert got.dtype == np.float32 and got.shape == (gh * gw, d)
  np.testing.assert_allclose(got, _sincos_reference(d, gh, gw).astype(np.float32),
                             rtol=0, atol=1e-6)


def test_model_pos_embeds_are_the_sincos_tables():
  m = _tiny()
  np.testing.assert_array_equal(m.pos_embed_a[0].detach().numpy(),
                                tp.sincos_pos_embed_2d(16, 4, 8))
  np.testing.assert_array_equal(m.pos_embed_v[0].detach().numpy(),
                                tp.sincos_pos_embed_2d(16, 4, 4))
  np.testing.assert_array_equal(m.decoder_pos_embed_a[0].detach().numpy(),
                                tp.sincos_pos_embed_2d(8, 4, 8))
  np.testing.assert_array_equal(m.decoder_pos_embed_v[0].detach().numpy(),
                                tp.sincos_pos_embed_2d(8, 4, 4))
  assert not m.pos_embed_a.requires_grad and not m.decoder_pos_embed_v.requires_grad


@pytest.mark.parametrize("c,h,w,p", [(3, 2, 3, 4), (1, 2, 5, 3)])
def test_patchify_element_order_and_round_trip(c, h, w, p):
  imgs = torch.randn(2, c, h * p, w * p, dtype=torch.float64)
  x = tp.patchify(imgs, c, h, w, p)
  assert x.shape == (2, h * w, p * p * c)
  a, ref = imgs.numpy(), np.empty((2, h * w, p * p * c))
  for n in range(2):
    for i in range(h):
      for j in range(w):
        for pi in range(p):
          for qi in range(p):
            for ci in range(c):
              ref[n, i * w + j, (pi * p + qi) * c + ci] = a[n, ci, i * p + pi, j * p + qi]
  np.testing.assert_array_equal(x.numpy(), ref)
  torch.testing.assert_close(tp.unpatchify(x, c, h, w, p), imgs, rtol=0, atol=0)


def test_audio_tokens_are_frequency_major():
  m = _tiny()
  audio, _ = _inputs()
  # Token k = f * (T/p) + t is the conv of the patch at frequency row f, time column t.
  spec_img = audio.numpy().transpose(0, 2, 1)  # [B, F, T]
  wgt = m.patch_embed_a.proj.weight.detach().numpy()[:, 0]  # [D, p, p] = (freq, time)
  bias = m.patch_embed_a.proj.bias.detach().numpy()
  gf, gt = 4, 8
  ref = np.empty((B, gf * gt, 16))
  for f in range(gf):
    for t in range(gt):
      patch = spec_img[:, 4 * f:4 * f + 4, 4 * t:4 * t + 4]
      ref[:, f * gt + t] = np.einsum("bpq,dpq->bd", patch, wgt) + bias
  ref = ref + _np(m.pos_embed_a) + _np(m.modality_a)
  np.testing.assert_allclose(_np(m.embed_audio(audio)), ref, atol=1e-5)


def test_random_masking_keeps_len_keep_tokens():
  n, length, d = 3, 50, 2
  x = torch.arange(n * length * d, dtype=torch.float32).reshape(n, length, d)
  noise = torch.rand(n, length)
  for r in (0.0, 0.3, 0.75, 0.9):
    len_keep = int(length * (1 - r))
    xm, mask, ids_restore = tp.random_masking(x, noise, r)
    assert xm.shape == (n, len_keep, d)
    assert torch.all(mask.sum(1) == length - len_keep)
    for i in range(n):
      order = np.argsort(noise[i].numpy(), kind="stable")
      np.testing.assert_array_equal(xm[i].numpy(), x[i].numpy()[order[:len_keep]])
      np.testing.assert_array_equal(np.nonzero(mask[i].numpy() == 0)[0],
                                    np.sort(order[:len_keep]))
      np.testing.assert_array_equal(ids_restore[i].numpy(), np.argsort(order))


def test_random_masking_breaks_ties_by_index():
  x = torch.randn(2, 10, 3)
  _, mask, _ = tp.random_masking(x, torch.full((2, 10), 1.1), 0.7)
  np.testing.assert_array_equal(mask.numpy(), np.array([[0.] * 3 + [1.] * 7] * 2))


@pytest.mark.parametrize("mode,axis,n_lines", [("time", 1, 48), ("freq", 2, 6)])
def test_structured_masks_remove_whole_lines(mode, axis, n_lines):
  torch.manual_seed(3)
  n, f, t, r = 5, 8, 64, 0.75
  noise = tp.structured_noise(torch.rand(n, f * t), r, mode, f=f, t=t)
  _, mask, _ = tp.random_masking(torch.zeros(n, f * t, 1), noise, r)
  grid = mask.reshape(n, f, t).numpy()
  assert np.all(mask.sum(1).numpy() == f * t - int(f * t * (1 - r)))
  # Every column (time) or row (freq) is either all removed or all kept.
  line_sum = grid.sum(axis=axis)
  assert np.all((line_sum == 0) | (line_sum == grid.shape[axis]))
  assert np.all((line_sum > 0).sum(1) == n_lines)
  # Different samples draw different lines.
  assert len({tuple(row) for row in (line_sum > 0)}) > 1


def test_structured_tf_noise_marks_rows_and_columns():
  torch.manual_seed(4)
  noise = tp.structured_noise(torch.rand(3, 512), 0.75, "tf")
  g = noise.reshape(3, 8, 64).numpy() == np.float32(1.1)
  full_rows = g.all(axis=2).sum(1)
  full_cols = g.all(axis=1).sum(1)
  np.testing.assert_array_equal(full_rows, [4, 4, 4])
  np.testing.assert_array_equal(full_cols, [33, 33, 33])
  np.testing.assert_array_equal(g.sum((1, 2)), [33 * 8 + 4 * 64 - 33 * 4] * 3)
  _, mask, _ = tp.random_masking(torch.zeros(3, 512, 1), noise, 0.75)
  assert torch.all(mask.sum(1) == 384)
  # Only marked tokens are removed.
  assert not np.any(mask.reshape(3, 8, 64).numpy().astype(bool) & ~g)


# ----------------------------------------------------------------------------------------------
# Layers and losses against numpy.
# ----------------------------------------------------------------------------------------------


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _block_np(blk, x, modality, heads, eps):
  p = {k: _np(v) for k, v in blk.state_dict().items()}
  sfx = "" if modality is None else "_" + modality
  n, length, d = x.shape
  h = _ln(x, p[f"norm1{sfx}.weight"], p[f"norm1{sfx}.bias"], eps)
  qkv = h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
  qkv = qkv.reshape(n, length, 3, heads, d // heads)
  q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
  s = np.exp(s - s.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  o = (s @ v).transpose(0, 2, 1, 3).reshape(n, length, d)
  x = x + o @ p["attn.proj.weight"].T + p["attn.proj.bias"]
  h = _ln(x, p[f"norm2{sfx}.weight"], p[f"norm2{sfx}.bias"], eps)
  h = h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
  h = 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
  return x + h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


@pytest.mark.parametrize("modality", [None, "a", "v"])
def test_block_matches_numpy(modality):
  torch.manual_seed(5)
  blk = tp.Block(16, 4, mlp_ratio=4.0, norm_eps=1e-5).double()
  _perturb_norms(blk)
  x = torch.randn(2, 7, 16, dtype=torch.float64)
  np.testing.assert_allclose(_np(blk(x, modality)), _block_np(blk, x.numpy(), modality, 4,
                                                              1e-5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_numpy(norm_pix):
  m = _tiny(norm_pix_loss=norm_pix).double()
  audio, frames = (t.double() for t in _inputs())
  g = torch.Generator().manual_seed(6)
  pred_a = torch.randn(B, LA, 16, generator=g, dtype=torch.float64)
  pred_v = torch.randn(B, LV, 48, generator=g, dtype=torch.float64)
  mask_a = (torch.rand(B, LA, generator=g) < 0.6).double()
  mask_v = (torch.rand(B, LV, generator=g) < 0.6).double()

  def ref(target, pred, mask):
    if norm_pix:
      target = ((target - target.mean(-1, keepdims=True))
                / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6))
    per_patch = ((pred - target)**2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()

  a = audio.numpy().transpose(0, 2, 1)  # [B, F, T]
  tgt_a = a.reshape(B, 4, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(B, LA, 16)
  f = frames.numpy()
  tgt_v = f.reshape(B, 3, 4, 4, 4, 4).transpose(0, 2, 4, 3, 5, 1).reshape(B, LV, 48)
  np.testing.assert_allclose(m.forward_mae_loss(audio, pred_a, mask_a, "a").item(),
                             ref(tgt_a, pred_a.numpy(), mask_a.numpy()), rtol=1e-12)
  np.testing.assert_allclose(m.forward_mae_loss(frames, pred_v, mask_v, "v").item(),
                             ref(tgt_v, pred_v.numpy(), mask_v.numpy()), rtol=1e-12)


@pytest.mark.parametrize("bidirect", [False, True])
def test_contrastive_matches_numpy(bidirect):
  g = torch.Generator().manual_seed(7)
  a = torch.randn(6, 5, generator=g, dtype=torch.float64)
  v = a + 0.8 * torch.randn(6, 5, generator=g, dtype=torch.float64)
  nce, acc = _tiny().forward_contrastive(a, v, bidirect_contrast=bidirect, temperature=0.1)
  an = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
  vn = v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True)
  s = an @ vn.T / 0.1

  def one_way(s):
    # Column j is video j: softmax over audios (axis 0).
    logp = s - np.log(np.exp(s).sum(0, keepdims=True))
    return -np.mean(np.diag(logp)), np.mean(s.argmax(0) == np.arange(len(s)))

  ref_nce, ref_acc = one_way(s)
  if bidirect:
    n2, a2 = one_way(s.T)
    ref_nce, ref_acc = (ref_nce + n2) / 2, (ref_acc + a2) / 2
  np.testing.assert_allclose(nce.item(), ref_nce, rtol=1e-12)
  # c_acc is a count over the batch divided in the default float dtype, as in the reference.
  np.testing.assert_allclose(acc.item(), ref_acc, rtol=1e-6)
  assert 0 < ref_acc < 1  # the data separates the directions and the accuracy is informative


# ----------------------------------------------------------------------------------------------
# Encoder / decoder wiring.
# ----------------------------------------------------------------------------------------------


def test_decoder_input_puts_tokens_back_in_place():
  m = _perturb_norms(_tiny().double())
  audio, frames = (t.double() for t in _inputs())
  g = torch.Generator().manual_seed(8)
  noise_a = torch.rand(B, LA, generator=g)
  noise_v = torch.rand(B, LV, generator=g)
  enc = m.forward_encoder(audio, frames, 0.75, 0.5, noise_a=noise_a, noise_v=noise_v)
  x = enc[0]
  captured = {}
  m.decoder_blocks[0].register_forward_pre_hook(
      lambda mod, args: captured.setdefault("x", args[0]))
  pred_a, pred_v = m.forward_decoder(*enc[:5])
  assert pred_a.shape == (B, LA, 16) and pred_v.shape == (B, LV, 48)

  emb = _np(m.decoder_embed(x))
  tok, d = _np(m.mask_token)[0, 0], 8
  keep_a, keep_v = int(LA * 0.25), int(LV * 0.5)
  ref = np.tile(tok, (B, LA + LV, 1))
  for i in range(B):
    order_a = np.argsort(noise_a[i].numpy(), kind="stable")
    order_v = np.argsort(noise_v[i].numpy(), kind="stable")
    ref[i, order_a[:keep_a]] = emb[i, :keep_a]
    ref[i, LA + order_v[:keep_v]] = emb[i, keep_a:]
  ref[:, :LA] += _np(m.decoder_pos_embed_a)[0] + _np(m.decoder_modality_a)[0]
  ref[:, LA:] += _np(m.decoder_pos_embed_v)[0] + _np(m.decoder_modality_v)[0]
  assert ref.shape == (B, LA + LV, d)
  np.testing.assert_allclose(_np(captured["x"]), ref, rtol=1e-12, atol=1e-12)


def test_encoder_matches_manual_composition_and_shared_block_quirk():
  m = _perturb_norms(_tiny(shared_depth=2).double())
  audio, frames = (t.double() for t in _inputs())
  # Identity-order noise with ratio 0: nothing removed, nothing permuted.
  ident_a = torch.arange(LA, dtype=torch.float64).expand(B, LA)
  ident_v = torch.arange(LV, dtype=torch.float64).expand(B, LV)
  x, mask_a, _, mask_v, _, ca, cv = m.forward_encoder(audio, frames, 0.0, 0.0,
                                                      noise_a=ident_a, noise_v=ident_v)
  assert mask_a.sum() == 0 and mask_v.sum() == 0
  with torch.no_grad():
    a, v = m.embed_audio(audio), m.embed_video(frames)
    for blk in m.blocks_a:
      a = blk(a)
    for blk in m.blocks_v:
      v = blk(v)
    j = torch.cat([a, v], 1)
    for blk in m.blocks_u:
      j = blk(j)
    torch.testing.assert_close(x, m.norm(j), rtol=0, atol=1e-12)
    # Contrastive path: only the last shared block acts on the modality-specific output.
    torch.testing.assert_close(ca, m.norm_a(m.blocks_u[1](a, "a")), rtol=0, atol=1e-12)
    torch.testing.assert_close(cv, m.norm_v(m.blocks_u[1](v, "v")), rtol=0, atol=1e-12)
    # forward_feat chains both shared blocks, which is a different result.
    chained_a = m.norm_a(m.blocks_u[1](m.blocks_u[0](a, "a"), "a"))
    chained_v = m.norm_v(m.blocks_u[1](m.blocks_u[0](v, "v"), "v"))
    fa, fv = m.forward_feat(audio, frames)
    torch.testing.assert_close(fa, chained_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(fv, chained_v, rtol=0, atol=1e-12)
    assert (fa - ca).abs().max() > 1e-3


def test_same_noise_gives_same_masks_and_outputs():
  m = _tiny()
  audio, frames = _inputs()
  torch.manual_seed(9)
  noise_a = tp.structured_noise(torch.rand(B, LA), 0.75, "time", f=4, t=8)
  noise_v = torch.rand(B, LV)
  outs = [m(audio, frames, mask_mode="time", noise_a=noise_a, noise_v=noise_v)
          for _ in range(2)]
  for k in ("loss", "mask_a", "mask_v", "pred_a"):
    torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=0)
  # The supplied structured noise is used verbatim: whole time columns are removed.
  cols = outs[0]["mask_a"].reshape(B, 4, 8).sum(1)
  assert torch.all((cols == 0) | (cols == 4)) and torch.all((cols == 4).sum(1) == 6)


def test_forward_losses_are_finite_and_backprop():
  torch.manual_seed(10)
  m = tp.CAVMAE(**{**TINY, **TINY_DEC}, norm_pix_loss=True).train()
  audio, frames = _inputs()
  out = m(audio, frames, mask_mode="tf", bidirect_contrast=True)
  for k in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "nce", "c_acc"):
    assert out[k].dim() == 0 and torch.isfinite(out[k]), k
  torch.testing.assert_close(out["loss"], out["loss_mae"] + out["loss_c"])
  torch.testing.assert_close(out["loss_mae"], out["loss_mae_a"] + out["loss_mae_v"])
  torch.testing.assert_close(out["loss_c"], 0.01 * out["nce"])
  assert out["mask_a"].shape == (B, LA) and out["mask_v"].shape == (B, LV)
  assert torch.all(out["mask_a"].sum(1) == 24) and torch.all(out["mask_v"].sum(1) == 12)
  assert out["pred_a"].shape == (B, LA, 16) and out["pred_v"].shape == (B, LV, 48)
  out["loss"].backward()
  for name in ("patch_embed_a.proj.weight", "patch_embed_v.proj.weight", "modality_a",
               "blocks_a.0.attn.qkv.weight", "blocks_v.1.mlp.fc2.weight",
               "blocks_u.0.norm1_a.weight", "blocks_u.0.norm1.weight", "norm_a.weight",
               "norm.weight", "mask_token", "decoder_blocks.0.attn.proj.weight",
               "decoder_pred_a.weight"):
    grad = m.get_parameter(name).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
  assert m.pos_embed_a.grad is None  # fixed in pretraining


def test_zero_loss_weights_skip_branches():
  m = _tiny()
  audio, frames = _inputs()
  out = m(audio, frames, mae_loss_weight=0.0)
  assert out["pred_a"] is None and out["pred_v"] is None
  assert out["loss_mae"].item() == 0 and out["loss_mae_a"].item() == 0
  torch.testing.assert_close(out["loss"], out["loss_c"])
  assert out["nce"].item() > 0
  out = m(audio, frames, contrast_loss_weight=0.0)
  assert out["loss_c"].item() == 0 and out["nce"].item() == 0 and out["c_acc"].item() == 0
  assert out["pred_a"] is not None
  torch.testing.assert_close(out["loss"], out["loss_mae"])


def test_state_dict_round_trip_strict():
  m = _tiny()
  torch.manual_seed(123)
  other = tp.CAVMAE(**{**TINY, **TINY_DEC}).eval()
  audio, frames = _inputs()
  noise = dict(noise_a=torch.rand(B, LA), noise_v=torch.rand(B, LV))
  before = other(audio, frames, **noise)["loss"]
  other.load_state_dict(m.state_dict(), strict=True)
  after = other(audio, frames, **noise)["loss"]
  torch.testing.assert_close(after, m(audio, frames, **noise)["loss"], rtol=0, atol=0)
  assert before.item() != after.item()


def test_init_follows_spec():
  m = _tiny()
  w = m.patch_embed_a.proj.weight.detach()
  fan_out, fan_in = w.shape[0], w[0].numel()
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  # Xavier over the whole receptive field; torch's default conv init would stay under
  # 1/sqrt(fan_in) = 0.25 here, well below 0.75 * bound = 0.40.
  assert w.abs().max() <= bound and w.abs().max() > 0.75 * bound
  for name, mod in m.named_modules():
    if isinstance(mod, torch.nn.Linear):
      assert torch.all(mod.bias == 0), name
      b = math.sqrt(6.0 / sum(mod.weight.shape))
      assert mod.weight.abs().max() <= b, name
    if isinstance(mod, torch.nn.LayerNorm):
      assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
  for tok in (m.modality_a, m.mask_token, m.decoder_modality_v):
    assert 0 < tok.abs().max() < 0.1


# ----------------------------------------------------------------------------------------------
# Fine-tuning model.
# ----------------------------------------------------------------------------------------------


def test_cavmaeft_modes():
  torch.manual_seed(11)
  m = _perturb_norms(tp.CAVMAEFT(5, **TINY).eval())
  audio, frames = _inputs()
  with torch.no_grad():
    logits = {mode: m(audio, frames, mode=mode) for mode in
              ("multimodal", "audioonly", "videoonly", "missingaudioonly",
               "missingvideoonly")}
    for mode, out in logits.items():
      assert out.shape == (B, 5) and torch.isfinite(out).all(), mode
    fa, fv = m.forward_feat(audio, frames)
    torch.testing.assert_close(logits["audioonly"], m.mlp_head(fa.mean(1)))
    torch.testing.assert_close(logits["videoonly"], m.mlp_head(fv.mean(1)))
    a = m.embed_audio(audio)
    for blk in m.blocks_a:
      a = blk(a)
    unified = m.norm(m.blocks_u[0](a)).mean(1)
    torch.testing.assert_close(logits["missingaudioonly"],
                               m.mlp_head((unified + fa.mean(1)) / 2))
    # Single-modality modes do not look at the other input.
    torch.testing.assert_close(m(audio, None, mode="missingaudioonly"),
                               logits["missingaudioonly"])
    torch.testing.assert_close(m(None, frames, mode="videoonly"), logits["videoonly"])
    assert (logits["multimodal"] - logits["audioonly"]).abs().max() > 1e-4
    assert (logits["missingvideoonly"] - logits["videoonly"]).abs().max() > 1e-4
  m.train()
  m(audio, frames, mode="multimodal").sum().backward()
  assert m.pos_embed_a.grad is not None and m.blocks_u[0].norm1.weight.grad is not None
  with pytest.raises(ValueError):
    m(audio, frames, mode="bogus")
