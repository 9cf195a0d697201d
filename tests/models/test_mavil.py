"""Flax MAViL against float64 numpy written from the spec (mavil.md), independently of the code.

Tiny widths and small inputs (audio 128x32 -> 16 tokens, clips 8x48x48 -> 36 tokens) keep
this file to seconds of compute; the base model is only shape-checked (jax.eval_shape).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avmae_jax import api
from avmae_jax.checkpoints import interop
from avmae_jax import models
from avmae_jax.training import optim
from avmae_jax.models import flops
from avmae_jax.models import layers
from avmae_jax.models import losses
from avmae_jax.models import mavil
from avmae_jax.models import mavil_ft
from tests import _helpers

B = 4
GEOMETRY = dict(audio_length=128, num_mel_bins=32, img_size=48, num_frames=8)
LA, LV = 8 * 2, 4 * 3 * 3  # (128/16) x (32/16) audio grid; (8/2) x 3 x 3 video grid
TEMPERATURE = 0.1


def build(kind="mavil", **fields):
  # One encoder block per modality keeps compile times short; the comparison with the
  # PyTorch port (test_mavil_vs_torch.py) runs the tiny preset's depths.
  fields = {**models.size_fields("tiny", kind), "encoder_depth": 1, **GEOMETRY, **fields}
  return models.build(dict(kind=kind, **fields))


def init(module, seed=0):
  """Random parameters of the model's shapes (numpy, no compiled init): LayerNorm scales
  near 1, kernels ~ 1/sqrt(fan-in), everything else (biases, tokens, tables) small."""
  shapes = jax.eval_shape(lambda a, v: nn.meta.unbox(module.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v)["params"]),
                          *module.input_shapes(B))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(x.shape)
    if "scale" in name:
      return jnp.asarray(1 + 0.1 * z, jnp.float32)
    if "kernel" in name:
      return jnp.asarray(z / np.sqrt(np.prod(x.shape[:-1])), jnp.float32)
    return jnp.asarray(0.05 * z, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((B, GEOMETRY["audio_length"], GEOMETRY["num_mel_bins"]))
  frames = rng.standard_normal((B, GEOMETRY["num_frames"], 48, 48, 3))
  return audio.astype(np.float32), frames.astype(np.float32)


def noise(views, seed=0):
  rng = np.random.default_rng(100 + seed)
  return (rng.random((views * B, LA)).astype(np.float32),
          rng.random((views * B, LV)).astype(np.float32))


def f64(x):
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------------------------
# Independent float64 references.
# ----------------------------------------------------------------------------------------------


def numpy_sincos_3d(dim, gt, gh, gw):
  """Token (t, r, c): [sin/cos of t on dim/4 | sin/cos of c on 3dim/8 | sin/cos of r on 3dim/8]."""
  out = np.zeros((gt * gh * gw, dim))
  q = dim // 4
  s = 3 * dim // 8

  def one(pos, width):
    w = 1.0 / 10000 ** (np.arange(width // 2) / (width / 2))
    return np.concatenate([np.sin(pos * w), np.cos(pos * w)])

  for t in range(gt):
    for r in range(gh):
      for c in range(gw):
        out[(t * gh + r) * gw + c] = np.concatenate([one(t, q), one(c, s), one(r, s)])
  return out


def numpy_audio_patches(audio, p=16):
  """Token (t, f) = audio[16t:16t+16, 16f:16f+16] flattened (time-in-patch, freq-in-patch)."""
  b, t_len, f_len = audio.shape
  out = []
  for t in range(t_len // p):
    for f in range(f_len // p):
      out.append(audio[:, p * t:p * t + p, p * f:p * f + p].reshape(b, -1))
  return np.stack(out, axis=1)


def numpy_video_patches(frames, u=2, p=16):
  """Tubelet (t, r, c) flattened with inner order (frame, row, column, channel)."""
  b, n, h, w, c = frames.shape
  out = []
  for t in range(n // u):
    for r in range(h // p):
      for col in range(w // p):
        out.append(frames[:, u * t:u * t + u, p * r:p * r + p, p * col:p * col + p]
                   .reshape(b, -1))
  return np.stack(out, axis=1)


def numpy_mask(noise_rows, ratio):
  keep = int(noise_rows.shape[1] * (1 - ratio))
  mask = np.ones(noise_rows.shape)
  for i, row in enumerate(noise_rows):
    mask[i, np.argsort(row, kind="stable")[:keep]] = 0
  return mask


def numpy_masked_mse(pred, target, mask):
  per_token = ((f64(pred) - target) ** 2).mean(axis=-1)
  return (per_token * mask).sum() / mask.sum()


def numpy_norm_pix(target):
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / np.sqrt(var + 1e-6)


def numpy_info_nce(x, y, temperature):
  """Symmetric InfoNCE (mean of row-wise and column-wise cross-entropy) and accuracy."""
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  y = y / np.linalg.norm(y, axis=1, keepdims=True)
  s = x @ y.T / temperature
  n = len(s)
  rows = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(n)])
  cols = -np.mean([s[j, j] - np.log(np.exp(s[:, j]).sum()) for j in range(n)])
  acc = (np.mean(s.argmax(axis=1) == np.arange(n)) + np.mean(s.argmax(axis=0) == np.arange(n)))
  return (rows + cols) / 2, acc / 2


def numpy_layer_norm(x, eps):
  mean = x.mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------------------------
# Layout pieces.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,grid", [(768, (4, 14, 14)), (512, (4, 14, 14)), (32, (3, 2, 5))])
def test_sincos_3d_matches_float64(dim, grid):
  got = layers.sincos_3d(dim, *grid)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, numpy_sincos_3d(dim, *grid), rtol=0, atol=1e-6)


def test_patch_layouts_match_numpy():
  audio, frames = inputs()
  np.testing.assert_array_equal(
      np.asarray(losses.patchify(jnp.asarray(audio)[..., None], 16)), numpy_audio_patches(audio))
  np.testing.assert_array_equal(np.asarray(losses.patchify_video(jnp.asarray(frames), 2, 16)),
                                numpy_video_patches(frames))


@pytest.mark.slow
def test_position_tables_and_embeddings_follow_the_layout():
  module = build()
  params = jax.jit(module.init)({"params": jax.random.key(0), "masking": jax.random.key(1)},
                                *(jnp.zeros(s.shape) for s in module.input_shapes(1)))["params"]
  params = nn.meta.unbox(params)
  d, dd = module.embed_dim, module.decoder_embed_dim
  for name, dim, video in (("pos_embed", d, False), ("decoder_pos_embed", dd, False),
                           ("pos_embed_v", d, True), ("decoder_pos_embed_v", dd, True)):
    table = f64(params[name][0])
    np.testing.assert_array_equal(table[0], 0.0, err_msg=f"{name}: cls row")
    want = (numpy_sincos_3d(dim, 4, 3, 3) if video else
            np.asarray(layers.sincos_2d(dim, 8, 2), np.float64))
    np.testing.assert_allclose(table[1:], want, rtol=0, atol=1e-6, err_msg=name)
  # Audio token k = t * 2 + f: the 16x16 block at time 16t, frequency 16f.
  audio, frames = inputs()
  tokens = module.apply({"params": params}, jnp.asarray(audio), method=module.embed_audio)
  kernel = f64(params["patch_embed"]["proj"]["kernel"]).reshape(256, d)
  want = numpy_audio_patches(f64(audio)) @ kernel + f64(params["patch_embed"]["proj"]["bias"])
  np.testing.assert_allclose(tokens, want + f64(params["pos_embed"][0, 1:]), atol=2e-5)
  tokens_v = module.apply({"params": params}, jnp.asarray(frames), method=module.embed_video)
  kernel_v = f64(params["patch_embed_v"]["proj"]["kernel"]).reshape(2 * 16 * 16 * 3, d)
  want_v = (numpy_video_patches(f64(frames)) @ kernel_v
            + f64(params["patch_embed_v"]["proj"]["bias"]))
  np.testing.assert_allclose(tokens_v, want_v + f64(params["pos_embed_v"][0, 1:]), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Stage 1.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1():
  module = build()
  params = init(module)
  audio, frames = inputs()
  noise_a, noise_v = noise(2)

  @jax.jit
  def run(params, noise_a, noise_v):
    out = module.apply({"params": params}, audio, frames, noise_a, noise_v)
    enc = module.apply({"params": params}, audio, frames, noise_a, noise_v,
                       method=module.encode_masked)
    return out, enc

  return module, params, (audio, frames, noise_a, noise_v), run(params, noise_a, noise_v), run


def test_stage1_masks_follow_the_noise(stage1):
  module, _, (_, _, noise_a, noise_v), (out, (a, v, ma, mv)), _ = stage1
  assert module.num_views == 2
  np.testing.assert_array_equal(ma.mask, numpy_mask(noise_a, 0.8))
  np.testing.assert_array_equal(mv.mask, numpy_mask(noise_v, 0.9))
  np.testing.assert_array_equal(out["mask_a"], numpy_mask(noise_a[:B], 0.8))
  np.testing.assert_array_equal(out["mask_v"], numpy_mask(noise_v[:B], 0.9))
  # int(16 * 0.2) = 3 audio and int(36 * 0.1) = 3 video tokens kept, plus the cls tokens.
  assert a.shape == (2 * B, 1 + 3, 128) and v.shape == (2 * B, 1 + 3, 128)


def test_stage1_reconstruction_losses_match_numpy(stage1):
  _, _, (audio, frames, noise_a, noise_v), (out, _), _ = stage1
  target_a = numpy_norm_pix(numpy_audio_patches(f64(audio)))
  target_v = numpy_norm_pix(numpy_video_patches(f64(frames)))
  assert out["pred_a"].shape == (B, LA, 256) and out["pred_v"].shape == (B, LV, 1536)
  want_a = numpy_masked_mse(out["pred_a"], target_a, numpy_mask(noise_a[:B], 0.8))
  want_v = numpy_masked_mse(out["pred_v"], target_v, numpy_mask(noise_v[:B], 0.9))
  assert float(out["loss_rec_a"]) == pytest.approx(want_a, rel=1e-5)
  assert float(out["loss_rec_v"]) == pytest.approx(want_v, rel=1e-5)


def test_stage1_contrastive_losses_match_numpy(stage1):
  _, _, _, (out, (a, v, _, _)), _ = stage1
  # Mean over the visible patch tokens (not the cls token, row 0) of each ViT's output.
  rep_a, rep_v = f64(a)[:, 1:].mean(axis=1), f64(v)[:, 1:].mean(axis=1)
  want = {"inter": numpy_info_nce(rep_a[:B], rep_v[:B], TEMPERATURE),
          "intra_a": numpy_info_nce(rep_a[:B], rep_a[B:], TEMPERATURE),
          "intra_v": numpy_info_nce(rep_v[:B], rep_v[B:], TEMPERATURE)}
  for key, (loss, acc) in want.items():
    assert float(out[f"loss_{key}"]) == pytest.approx(loss, rel=1e-5), key
    assert float(out[f"acc_{key}"]) == pytest.approx(acc), key
  total = (float(out["loss_rec_a"]) + float(out["loss_rec_v"]) + 0.01 * want["inter"][0]
           + 0.01 * (want["intra_a"][0] + want["intra_v"][0]))
  assert float(out["loss"]) == pytest.approx(total, rel=1e-5)


def test_stacked_views_equal_separate_single_view_passes(stage1):
  """Both views in one batched pass give what each view alone gives."""
  module, params, (audio, frames, noise_a, noise_v), (_, (a, v, _, _)), _ = stage1
  single = module.clone(intra_contrast_weight=0.0)
  assert single.num_views == 1
  run = jax.jit(lambda p, na, nv: single.apply({"params": p}, audio, frames, na, nv,
                                               method=single.encode_masked)[:2])
  for view in range(2):
    rows = slice(view * B, (view + 1) * B)
    a1, v1 = run(params, noise_a[rows], noise_v[rows])
    np.testing.assert_allclose(a1, a[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v1, v[rows], rtol=1e-5, atol=1e-5)


def test_two_views_are_masked_independently(stage1):
  module, params, _, _, run = stage1
  noise_a, noise_v = module.apply({"params": params}, B, method=module.draw_noise,
                                  rngs={"masking": jax.random.key(7)})
  assert noise_a.shape == (2 * B, LA) and noise_v.shape == (2 * B, LV)
  out, (_, _, ma, mv) = run(params, noise_a, noise_v)
  for mask, length, kept in ((ma.mask, LA, 3), (mv.mask, LV, 3)):
    mask = np.asarray(mask)
    assert np.all(mask.sum(axis=1) == length - kept)
    for i in range(B):  # the same clip, masked twice: different kept tokens
      assert not np.array_equal(mask[i], mask[B + i]), f"clip {i}: views share a mask"
  # The contrastive terms see two different views, and view 1 is what gets reconstructed.
  assert float(out["loss_intra_a"]) > 0 and float(out["loss_intra_v"]) > 0
  np.testing.assert_array_equal(out["mask_a"], ma.mask[:B])
  np.testing.assert_array_equal(out["mask_v"], mv.mask[:B])


def test_zero_weights_switch_terms_off():
  module = build(intra_contrast_weight=0.0, inter_contrast_weight=0.0)
  params = init(module)
  audio, frames = inputs()
  noise_a, noise_v = noise(1)
  out = jax.jit(lambda p: module.apply({"params": p}, audio, frames, noise_a, noise_v))(params)
  for key in ("loss_inter", "loss_intra_a", "loss_intra_v", "acc_inter"):
    assert float(out[key]) == 0.0, key
  assert float(out["loss"]) == pytest.approx(float(out["loss_rec_a"] + out["loss_rec_v"]))
  with pytest.raises(ValueError, match=r"noise_a must be \[1 views"):
    module.apply({"params": params}, audio, frames, *noise(2))


# ----------------------------------------------------------------------------------------------
# Stage 2.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2():
  teacher = build()
  teacher_params = init(teacher, seed=10)
  student = build(stage=2)
  student_params = init(student, seed=20)
  return teacher, teacher_params, student, student_params


@pytest.mark.slow
def test_teacher_targets_are_layer_normed_fusion_outputs(stage2):
  teacher, teacher_params, _, _ = stage2
  audio, frames = inputs(1)
  targets = jax.jit(lambda p: mavil.compute_teacher_targets(teacher, p, audio, frames))(
      teacher_params)
  fa, fv = jax.jit(lambda p: teacher.apply({"params": p}, audio, frames,
                                           method=teacher.fusion_feat))(teacher_params)
  assert targets["audio"].shape == (B, LA, 128) and targets["video"].shape == (B, LV, 128)
  np.testing.assert_allclose(targets["audio"], numpy_layer_norm(f64(fa), 1e-6), atol=2e-5)
  np.testing.assert_allclose(targets["video"], numpy_layer_norm(f64(fv), 1e-6), atol=2e-5)
  # The fusion encoder mixes modalities: the audio targets depend on the video input.
  other = jax.jit(lambda p: mavil.compute_teacher_targets(teacher, p, audio, frames[::-1]))(
      teacher_params)
  assert np.abs(np.asarray(other["audio"]) - np.asarray(targets["audio"])).max() > 1e-3


@pytest.mark.slow
def test_stage2_mse_matches_numpy(stage2):
  teacher, teacher_params, student, student_params = stage2
  audio, frames = inputs(2)
  noise_a, noise_v = noise(2, seed=3)

  targets, out = _helpers.mavil_stage2_forward(teacher, teacher_params, student,
                                               student_params, audio, frames, noise_a, noise_v)
  assert out["pred_a"].shape == (B, LA, 128) and out["pred_v"].shape == (B, LV, 128)
  want_a = numpy_masked_mse(out["pred_a"], f64(targets["audio"]), numpy_mask(noise_a[:B], 0.8))
  want_v = numpy_masked_mse(out["pred_v"], f64(targets["video"]), numpy_mask(noise_v[:B], 0.9))
  assert float(out["loss_rec_a"]) == pytest.approx(want_a, rel=1e-5)
  assert float(out["loss_rec_v"]) == pytest.approx(want_v, rel=1e-5)
  # Contrastive terms stay on by default in stage 2.
  assert float(out["loss_inter"]) > 0 and float(out["loss_intra_v"]) > 0
  total = want_a + want_v + 0.01 * float(out["loss_inter"] + out["loss_intra_a"]
                                         + out["loss_intra_v"])
  assert float(out["loss"]) == pytest.approx(total, rel=1e-5)
  off = student.clone(stage2_contrastive=False)
  assert off.num_views == 1
  out_off = jax.jit(lambda sp: off.apply({"params": sp}, audio, frames, noise_a[:B],
                                         noise_v[:B], teacher_targets=targets))(student_params)
  assert float(out_off["loss_inter"]) == 0.0
  assert float(out_off["loss"]) == pytest.approx(want_a + want_v, rel=1e-5)


@pytest.mark.slow
def test_teacher_gets_no_gradient(stage2):
  teacher, teacher_params, student, student_params = stage2
  audio, frames = inputs(3)

  def loss_fn(both, key):
    sp, tp = both
    targets = mavil.compute_teacher_targets(teacher, tp, audio, frames)
    return student.apply({"params": sp}, audio, frames, teacher_targets=targets,
                         rngs={"masking": key})["loss"]

  both = (student_params, teacher_params)
  key = jax.random.key(4)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss, (g_student, g_teacher) = value_and_grad(both, key)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_student)) > 0
  # The teacher does drive the loss (so a zero gradient is stop_gradient's doing).
  nudged = jax.tree.map(lambda x: x * 1.1, teacher_params)
  assert abs(float(value_and_grad((student_params, nudged), key)[0]) - float(loss)) > 1e-4
  # One optimizer step over both: the student moves, the teacher stays bit-identical.
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  new_student, new_teacher = step(both, (g_student, g_teacher))
  for old, new in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(new_teacher)):
    np.testing.assert_array_equal(old, new)
  assert any(not np.array_equal(o, n) for o, n in zip(jax.tree.leaves(student_params),
                                                      jax.tree.leaves(new_student)))


def test_stage_argument_errors(stage2):
  teacher, teacher_params, student, student_params = stage2
  audio, frames = inputs()
  with pytest.raises(ValueError, match="stage 2 needs teacher_targets"):
    student.apply({"params": student_params}, audio, frames, rngs={"masking": jax.random.key(0)})
  with pytest.raises(ValueError, match="teacher_targets are for stage 2"):
    teacher.apply({"params": teacher_params}, audio, frames, rngs={"masking": jax.random.key(0)},
                  teacher_targets={"audio": None, "video": None})
  bad = {"audio": jnp.zeros((B, LA, 64)), "video": jnp.zeros((B, LV, 128))}
  with pytest.raises(ValueError, match=r"teacher_targets\['audio'\] must be \(4, 16, 128\)"):
    student.apply({"params": student_params}, audio, frames, teacher_targets=bad,
                  rngs={"masking": jax.random.key(0)})
  with pytest.raises(ValueError, match="stage must be 1 or 2"):
    build(stage=3).init({"params": jax.random.key(0), "masking": jax.random.key(0)},
                        audio, frames)
  with pytest.raises(ValueError, match="mask_ratio_v=0.99 keeps no token of 36"):
    build(mask_ratio_v=0.99).init({"params": jax.random.key(0), "masking": jax.random.key(0)},
                                  audio, frames)
  with pytest.raises(ValueError, match=r"frames must be \[batch, 8, 48, 48, 3\]"):
    teacher.apply({"params": teacher_params}, audio, frames[:, :4],
                  rngs={"masking": jax.random.key(0)})


# ----------------------------------------------------------------------------------------------
# Fine-tuning model, configs, sizes, FLOPs.
# ----------------------------------------------------------------------------------------------


def test_finetune_heads_and_modes():
  audio, frames = inputs()
  by_heads = {}
  for heads in mavil_ft.FT_HEADS:
    module = build("mavil_ft", num_classes=5, heads=heads)
    params = init(module)
    by_heads[heads] = (module, params)
    names = set(params)
    assert ("blocks_av_0" in names) == (heads != "unimodal"), heads
    assert ("head_av" in names) == (heads != "unimodal"), heads
    assert ("head_a" in names and "head_v" in names) == (heads != "multimodal"), heads
    assert "norm" not in names and "decoder_embed" not in names
  module, params = by_heads["all"]

  @jax.jit
  def run(p):
    logits = {m: module.apply({"params": p}, audio, frames, m) for m in mavil_ft.FT_MODES}
    audio_only = module.apply({"params": p}, audio, None, "audioonly")
    feats = module.apply({"params": p}, audio, frames, method=module.forward_feat)
    fused = module.apply({"params": p}, audio, frames, method=module.fusion_feat)
    return logits, audio_only, feats, fused

  logits, audio_only, (fa, _), (xa, xv) = run(params)
  # audio-only: pooled audio patch tokens (no cls), fc_norm_a, head_a; independent of video.
  pooled = f64(fa).mean(axis=1)
  head = params["head_a"]
  want = (numpy_layer_norm(pooled, 1e-6) * f64(params["fc_norm_a"]["scale"])
          + f64(params["fc_norm_a"]["bias"])) @ f64(head["kernel"]) + f64(head["bias"])
  np.testing.assert_allclose(logits["audioonly"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(audio_only, logits["audioonly"], rtol=1e-5, atol=1e-6)
  # multimodal: fusion output, audio and video patch tokens pooled separately, concat.
  pooled = np.concatenate([f64(xa).mean(axis=1), f64(xv).mean(axis=1)], axis=1)
  want = (numpy_layer_norm(pooled, 1e-6) * f64(params["fc_norm_av"]["scale"])
          + f64(params["fc_norm_av"]["bias"])) @ f64(params["head_av"]["kernel"])
  np.testing.assert_allclose(logits["multimodal"], want + f64(params["head_av"]["bias"]),
                             rtol=1e-4, atol=1e-5)
  module, params = by_heads["multimodal"]
  with pytest.raises(ValueError, match=r"mode 'audioonly' needs heads in \['unimodal', 'all'\]"):
    module.apply({"params": params}, audio, frames, "audioonly")
  with pytest.raises(ValueError, match="needs audio and frames"):
    module.apply({"params": params}, audio, None, "multimodal")


@pytest.mark.parametrize("kind", ["mavil", "mavil_ft"])
def test_config_round_trip_axes_and_frozen_tables(kind):
  module = models.build(dict(kind=kind, **models.size_fields("tiny", kind)))
  assert models.build(models.model_config(module)) == module
  assert module.kind == kind
  boxed = jax.eval_shape(lambda a, v: module.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v),
                         *module.input_shapes(1))["params"]
  for path, value in jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(value, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no axes"
    assert len(value.names) == value.value.ndim, jax.tree_util.keystr(path)
  frozen = module.frozen_param_names()
  want = {"pos_embed", "pos_embed_v"} | (
      {"decoder_pos_embed", "decoder_pos_embed_v"} if kind == "mavil" else set())
  assert set(frozen) == want and want <= set(boxed)
  assert module.clone(trainable_pos_embed=True).frozen_param_names() == ()
  with pytest.raises(ValueError, match="unknown field"):
    models.build(dict(kind=kind, modality_specific_depth=3))


def _block_params(d):
  return 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 (ratio 4) with biases, two LayerNorms


@pytest.mark.slow
def test_base_parameter_counts_by_eval_shape():
  """Base sizes, shapes only: every tensor of the key layout, and the total by arithmetic."""
  d, dd, la, lv = 768, 512, 512, 784
  enc = (d * 256 + d) + d + (1 + la) * d + 12 * _block_params(d)          # audio ViT
  enc += (d * 3 * 2 * 256 + d) + d + (1 + lv) * d + 12 * _block_params(d)  # video ViT
  dec_a = (d * dd + dd) + dd + (1 + la) * dd + 8 * _block_params(dd) + 2 * dd
  dec_v = (d * dd + dd) + dd + (1 + lv) * dd + 8 * _block_params(dd) + 2 * dd
  want = {
      1: enc + 2 * _block_params(d) + 2 * d + dec_a + dec_v + (dd * 256 + 256)
         + (dd * 1536 + 1536),
      2: enc + 2 * _block_params(d) + 2 * d + dec_a + dec_v + 2 * (dd * d + d),
  }
  for stage, total in want.items():
    module = models.build(dict(kind="mavil", stage=stage, **models.size_fields("base", "mavil")))
    shapes = jax.eval_shape(lambda a, v, m=module: nn.meta.unbox(m.init(
        {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v)["params"]),
                            *module.input_shapes(1))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == total
  assert want[1] == 239_474_944
  torch_shapes = interop.torch_shapes(shapes)
  assert len(torch_shapes) == 530
  assert torch_shapes["patch_embed_v.proj.weight"] == (768, 3, 2, 16, 16)
  assert torch_shapes["pos_embed_v"] == (1, 785, 768)
  assert torch_shapes["decoder_pred_v.weight"] == (768, 512)  # stage 2: features
  ft = models.build(dict(kind="mavil_ft", num_classes=527,
                         **models.size_fields("base", "mavil_ft")))
  assert ft.fusion_depth == 3
  shapes = jax.eval_shape(lambda a, v: nn.meta.unbox(ft.init(
      {"params": jax.random.key(0)}, a, v)["params"]), *ft.input_shapes(1))
  want_ft = enc + 3 * _block_params(d) + 2 * (2 * d) + (2 * d * 527 + 527)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == want_ft == 194_561_807


@pytest.mark.slow
@pytest.mark.parametrize("kind,mode", [("mavil", None), ("mavil_ft", "multimodal")])
def test_flops_formula_agrees_with_xla(kind, mode):
  """Real input sizes (tiny widths): XLA's count of the compiled forward is a little above
  the matmul-only formula (it adds elementwise work); leaving out a term (the second view's
  encoders are 12%) would fall outside."""
  extra = {"num_classes": 10} if kind == "mavil_ft" else {}
  module = models.build(dict(kind=kind, **models.size_fields("tiny", kind), **extra))
  audio, frames = module.input_shapes(2)
  params = jax.eval_shape(lambda a, v: nn.meta.unbox(module.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v)["params"]),
                          audio, frames)
  if kind == "mavil":
    fn = lambda p, a, v: module.apply({"params": p}, a, v, rngs={"masking": jax.random.key(0)})
  else:
    fn = lambda p, a, v: module.apply({"params": p}, a, v, mode)
  cost = jax.jit(fn).lower(params, audio, frames).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ratio = cost["flops"] / 2 / flops.forward_flops(module, mode or "multimodal")
  assert 0 <= ratio - 1 < 0.08, ratio
  stage2 = module.clone(stage=2) if kind == "mavil" else None
  if stage2 is not None:  # a stage-2 step adds the teacher's forward pass
    assert flops.train_flops(stage2) == pytest.approx(
        3 * flops.forward_flops(stage2) + flops.teacher_flops(stage2))
    assert flops.teacher_flops(stage2) > 0 and flops.teacher_flops(module) == 0


@pytest.mark.slow
def test_bfloat16_remat_and_scan_variants(stage1):
  module, params, (audio, frames, noise_a, noise_v), (ref, _), _ = stage1

  def run(m):
    return jax.jit(lambda p: m.apply({"params": p}, audio, frames, noise_a, noise_v))(params)

  for variant in (dict(remat_policy="full"),
                  dict(scan_layers=True, remat_policy="dots_saveable")):
    np.testing.assert_allclose(run(module.clone(**variant))["loss"], ref["loss"], rtol=1e-5)
  bf16 = run(module.clone(dtype=jnp.bfloat16))
  assert bf16["loss"].dtype == jnp.float32
  assert 0 < abs(float(bf16["loss"]) - float(ref["loss"])) / float(ref["loss"]) < 0.05
  rel = np.linalg.norm(f64(bf16["pred_v"]) - f64(ref["pred_v"])) / np.linalg.norm(
      f64(ref["pred_v"]))
  assert 0 < rel < 0.05


@pytest.mark.slow
def test_finetune_drop_path_rises_along_each_tokens_path():
  """drop_path_rate: linear from 0 at the first ViT block to the rate at the last block a
  token passes; audio and video blocks of one depth share a rate; unimodal heads (no
  fusion) reach the rate at the last ViT block. Evaluation (no dropout rng) is unaffected."""
  module = build("mavil_ft", encoder_depth=2, fusion_depth=3, drop_path_rate=0.2,
                 num_classes=3)
  params = init(module)
  bound = module.bind({"params": params})
  np.testing.assert_allclose([b.drop_path for b in bound.blocks], [0.0, 0.05])
  np.testing.assert_allclose([b.drop_path for b in bound.blocks_v], [0.0, 0.05])
  np.testing.assert_allclose([b.drop_path for b in bound.blocks_av], [0.1, 0.15, 0.2])
  unimodal = build("mavil_ft", encoder_depth=2, drop_path_rate=0.2, heads="unimodal",
                   num_classes=3).bind({"params": init(build(
                       "mavil_ft", encoder_depth=2, heads="unimodal", num_classes=3))})
  np.testing.assert_allclose([b.drop_path for b in unimodal.blocks], [0.0, 0.2])

  audio, frames = inputs()
  plain = build("mavil_ft", encoder_depth=2, fusion_depth=3, num_classes=3)
  np.testing.assert_array_equal(module.apply({"params": params}, audio, frames),
                                plain.apply({"params": params}, audio, frames))
  dropped = module.apply({"params": params}, audio, frames,
                         rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(dropped, plain.apply({"params": params}, audio, frames))
  with pytest.raises(ValueError, match="drop_path_rate"):
    build("mavil_ft", drop_path_rate=1.0, num_classes=3).init(
        jax.random.key(0), *inputs())


def test_lr_layers_follow_mae_layer_ids():
  """Layer ids for layer-wise lr decay: embeddings 0, ViT block i -> i+1 in both
  modalities, fusion block j -> depth+1+j, heads (and decoders) at the top."""
  cav_mae_ft = models.build(dict(kind="cav_mae_ft", **models.size_fields("tiny", "cav_mae_ft"),
                                 num_classes=3))
  for module, depth, fusion, top in (
      (build("mavil_ft", encoder_depth=2, fusion_depth=3, num_classes=3), 2, "blocks_av_", 6),
      (build("mavil_ft", encoder_depth=2, heads="unimodal", num_classes=3), 2, None, 3),
      (build("mavil", encoder_depth=2), 2, "blocks_av_", 4),
      (cav_mae_ft, 2, "blocks_u_", 4)):
    layer_of, num_layers = module.lr_layers()
    assert num_layers == top
    shapes = jax.eval_shape(lambda a, v, m=module: m.init(jax.random.key(0), a, v),
                            *api.example_inputs(module, 1))["params"]
    seen = set()
    for path in optim.param_paths(nn.meta.unbox(shapes)):
      name, layer = path.split("/")[0], layer_of(path)
      index = name.rsplit("_", 1)[-1]
      if name.startswith(("patch_embed", "pos_embed", "cls_token", "modality_")):
        want = 0
      elif fusion and name.startswith(fusion):
        want = depth + int(index) + 1
      elif name.startswith(("blocks_", "blocks_a_", "blocks_v_")) and index.isdigit():
        want = int(index) + 1
      else:
        want = top
      assert layer == want, path
      seen.add(layer)
    assert seen == set(range(top + 1))  # every layer has parameters
