"""Flax MAViL / MAViLFT against the project's PyTorch port (`avmae_jax.torch_port`).

Both sides get the same random weights (the port's init, perturbed so that no norm or bias is
trivially 1 or 0; moved across with interop.torch_to_flax), the same inputs and the same
masking noise. Acceptance: relative L2 error <= 1e-5 in float32. The tiny preset's depths
with small inputs (audio 128x32, clips 8x48x48); the base layout is checked on shapes only
(the port on torch's meta device, Flax by jax.eval_shape).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avmae_jax.checkpoints import interop  # pylint: disable=g-import-not-at-top
from avmae_jax import models
from avmae_jax import torch_port as tp
from avmae_jax.models import mavil_ft
from tests import _helpers
from tests._helpers import perturbed_state_dict
from tests._helpers import rel_err

RTOL = 1e-5
B = 4
GEOMETRY = dict(audio_length=128, num_mel_bins=32, img_size=48, num_frames=8)
LA, LV = 16, 36


def abstract_params(module):
  return jax.eval_shape(lambda a, v: nn.meta.unbox(module.init(
      {"params": jax.random.key(0), "masking": jax.random.key(1)}, a, v)["params"]),
                        *module.input_shapes(1))


def to_flax(module, state_dict):
  params, report = interop.torch_to_flax(state_dict, abstract_params(module), strict=True)
  assert report == {"missing": [], "unexpected": []}
  return jax.tree.map(jnp.asarray, params)


def inputs(seed):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((B, 128, 32)).astype(np.float32)
  frames = rng.standard_normal((B, 8, 48, 48, 3)).astype(np.float32)
  return audio, frames


def to_torch_clip(frames):
  """[B, N, H, W, C] (ours) -> [B, C, N, H, W] (torch video layout)."""
  return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 4, 1, 2, 3)))


def fields(kind, **extra):
  return {**models.size_fields("tiny", kind), **GEOMETRY, **extra}


# ----------------------------------------------------------------------------------------------
# Key layout (base).
# ----------------------------------------------------------------------------------------------


def _block(prefix, d):
  out = {}
  for n in ("norm1", "norm2"):
    out[f"{prefix}.{n}.weight"] = out[f"{prefix}.{n}.bias"] = (d,)
  out.update({f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
              f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
              f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
              f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)})
  return out


def _encoder_layout(d=768, fusion=2):
  """The released inference model's encoder names (timm / AudioMAE), written out."""
  e = {"patch_embed.proj.weight": (d, 1, 16, 16), "patch_embed.proj.bias": (d,),
       "cls_token": (1, 1, d), "pos_embed": (1, 513, d),
       "patch_embed_v.proj.weight": (d, 3, 2, 16, 16), "patch_embed_v.proj.bias": (d,),
       "cls_token_v": (1, 1, d), "pos_embed_v": (1, 785, d)}
  for i in range(12):
    e.update(_block(f"blocks.{i}", d))
    e.update(_block(f"blocks_v.{i}", d))
  for i in range(fusion):
    e.update(_block(f"blocks_av.{i}", d))
  return e


def _decoder_layout(suffix, tokens, out, d=768, dd=512):
  e = {f"decoder_embed{suffix}.weight": (dd, d), f"decoder_embed{suffix}.bias": (dd,),
       f"mask_token{suffix}": (1, 1, dd), f"decoder_pos_embed{suffix}": (1, 1 + tokens, dd),
       f"decoder_norm{suffix}.weight": (dd,), f"decoder_norm{suffix}.bias": (dd,),
       f"decoder_pred{suffix}.weight": (out, dd), f"decoder_pred{suffix}.bias": (out,)}
  for i in range(8):
    e.update(_block(f"decoder_blocks{suffix}.{i}", dd))
  return e


def _shapes(module):
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_base_pretraining_layout(stage):
  expected = _encoder_layout()
  expected.update({"norm.weight": (768,), "norm.bias": (768,)})
  expected.update(_decoder_layout("", 512, 256 if stage == 1 else 768))
  expected.update(_decoder_layout("_v", 784, 1536 if stage == 1 else 768))
  with torch.device("meta"):
    port = tp.MAViL(stage=stage)
  assert _shapes(port) == expected
  module = models.build(dict(kind="mavil", stage=stage, **models.size_fields("base", "mavil")))
  assert interop.torch_shapes(abstract_params(module)) == expected
  assert not port.pos_embed.requires_grad and not port.decoder_pos_embed_v.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("heads", mavil_ft.FT_HEADS)
def test_base_finetune_layout(heads):
  """heads='multimodal' is exactly the released audio+video model's key set."""
  expected = _encoder_layout(fusion=0 if heads == "unimodal" else 3)
  if heads != "unimodal":
    expected.update({"fc_norm_av.weight": (1536,), "fc_norm_av.bias": (1536,),
                     "head_av.weight": (527, 1536), "head_av.bias": (527,)})
  if heads != "multimodal":
    for m in ("a", "v"):
      expected.update({f"fc_norm_{m}.weight": (768,), f"fc_norm_{m}.bias": (768,),
                       f"head_{m}.weight": (527, 768), f"head_{m}.bias": (527,)})
  with torch.device("meta"):
    port = tp.MAViLFT(527, heads=heads)
  assert _shapes(port) == expected
  module = models.build(dict(kind="mavil_ft", heads=heads, num_classes=527,
                             **models.size_fields("base", "mavil_ft")))
  assert interop.torch_shapes(abstract_params(module)) == expected


# ----------------------------------------------------------------------------------------------
# Numerics.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_pair():
  torch.manual_seed(0)
  ref = tp.MAViL(**fields("mavil")).eval()
  state_dict = perturbed_state_dict(ref, 1)
  module = models.build(dict(kind="mavil", **fields("mavil")))
  return ref, state_dict, module, to_flax(module, state_dict)


@pytest.fixture(scope="module")
def stage1_outputs(stage1_pair):
  ref, _, module, params = stage1_pair
  audio, frames = inputs(11)
  noise_a, noise_v = module.apply({"params": params}, B, method=module.draw_noise,
                                  rngs={"masking": jax.random.key(5)})

  @jax.jit
  def run(p):
    out = module.apply({"params": p}, audio, frames, noise_a, noise_v)
    feats = module.apply({"params": p}, audio, frames, method=module.forward_feat)
    fused = module.apply({"params": p}, audio, frames, method=module.fusion_feat)
    return out, feats, fused

  with torch.no_grad():
    a_t, v_t = torch.from_numpy(audio), to_torch_clip(frames)
    want = ref(a_t, v_t, torch.from_numpy(np.array(noise_a)), torch.from_numpy(np.array(noise_v)))
    want_feats = ref.forward_feat(a_t, v_t)
    want_fused = ref.fusion_feat(a_t, v_t)
  return run(params), (want, want_feats, want_fused)


@pytest.mark.slow
def test_stage1_losses_match(stage1_outputs):
  (out, _, _), (want, _, _) = stage1_outputs
  np.testing.assert_array_equal(np.asarray(out["mask_a"]), want["mask_a"].numpy())
  np.testing.assert_array_equal(np.asarray(out["mask_v"]), want["mask_v"].numpy())
  for key in ("pred_a", "pred_v", "loss", "loss_rec_a", "loss_rec_v", "loss_inter",
              "loss_intra_a", "loss_intra_v"):
    assert rel_err(out[key], want[key].numpy()) <= RTOL, key
  for key in ("acc_inter", "acc_intra_a", "acc_intra_v"):
    assert float(out[key]) == pytest.approx(float(want[key])), key
  assert float(want["loss_intra_a"]) > 0 and float(want["loss_inter"]) > 0


@pytest.mark.slow
def test_features_match(stage1_outputs):
  (_, feats, fused), (_, want_feats, want_fused) = stage1_outputs
  assert feats[0].shape == (B, LA, 128) and feats[1].shape == (B, LV, 128)
  for got, want in zip(feats + fused, want_feats + want_fused):
    assert rel_err(got, want.numpy()) <= RTOL


@pytest.mark.slow
def test_stage2_targets_and_losses_match(stage1_pair):
  teacher_ref, _, teacher, teacher_params = stage1_pair
  torch.manual_seed(3)
  student_ref = tp.MAViL(stage=2, **fields("mavil")).eval()
  state_dict = perturbed_state_dict(student_ref, 4)
  student = models.build(dict(kind="mavil", stage=2, **fields("mavil")))
  student_params = to_flax(student, state_dict)
  audio, frames = inputs(12)
  rng = np.random.default_rng(6)
  noise_a = rng.random((2 * B, LA)).astype(np.float32)
  noise_v = rng.random((2 * B, LV)).astype(np.float32)

  targets, out = _helpers.mavil_stage2_forward(teacher, teacher_params, student,
                                               student_params, audio, frames, noise_a, noise_v)
  a_t, v_t = torch.from_numpy(audio), to_torch_clip(frames)
  with torch.no_grad():
    want_targets = teacher_ref.teacher_targets(a_t, v_t)
    want = student_ref(a_t, v_t, torch.from_numpy(noise_a), torch.from_numpy(noise_v),
                       teacher_targets=want_targets)
  for key in ("audio", "video"):
    assert rel_err(targets[key], want_targets[key].numpy()) <= RTOL, key
  assert out["pred_a"].shape == (B, LA, 128)
  for key in ("pred_a", "pred_v", "loss", "loss_rec_a", "loss_rec_v", "loss_inter",
              "loss_intra_a", "loss_intra_v"):
    assert rel_err(out[key], want[key].numpy()) <= RTOL, key


def test_finetune_logits_match():
  torch.manual_seed(7)
  ref = tp.MAViLFT(num_classes=5, heads="all", **fields("mavil_ft")).eval()
  state_dict = perturbed_state_dict(ref, 8)
  module = models.build(dict(kind="mavil_ft", num_classes=5, heads="all", **fields("mavil_ft")))
  params = to_flax(module, state_dict)
  audio, frames = inputs(13)
  logits = jax.jit(lambda p: {m: module.apply({"params": p}, audio, frames, m)
                              for m in mavil_ft.FT_MODES})(params)
  with torch.no_grad():
    for mode in mavil_ft.FT_MODES:
      want = ref(torch.from_numpy(audio), to_torch_clip(frames), mode=mode).numpy()
      assert logits[mode].shape == (B, 5)
      assert rel_err(logits[mode], want) <= RTOL, mode
    # The port's unimodal modes ignore the other input, like ours.
    np.testing.assert_allclose(ref(None, to_torch_clip(frames), mode="videoonly").numpy(),
                               logits["videoonly"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gradients_match(stage1_pair):
  ref, _, module, params = stage1_pair
  audio, frames = inputs(14)
  rng = np.random.default_rng(9)
  noise_a = rng.random((2 * B, LA)).astype(np.float32)
  noise_v = rng.random((2 * B, LV)).astype(np.float32)
  grads = jax.jit(jax.grad(lambda p: module.apply(
      {"params": p}, audio, frames, noise_a, noise_v)["loss"]))(params)
  ref.zero_grad()
  ref(torch.from_numpy(audio), to_torch_clip(frames), torch.from_numpy(noise_a),
      torch.from_numpy(noise_v))["loss"].backward()
  got = interop.flax_to_torch(grads)
  for key, param in ref.named_parameters():
    if not param.requires_grad:  # the fixed sin-cos tables
      np.testing.assert_array_equal(got[key], 0.0, err_msg=f"{key} is frozen")
      continue
    want = param.grad.numpy()
    assert np.linalg.norm(want) > 0, key
    assert rel_err(got[key], want) <= 1e-4, key


# ----------------------------------------------------------------------------------------------
# Interop.
# ----------------------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_and_loads_strict(stage1_pair):
  ref, state_dict, _, params = stage1_pair
  exported = interop.flax_to_torch(params)
  assert sorted(exported) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  fresh = tp.MAViL(**fields("mavil"))
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                        strict=True)
  for key, value in fresh.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref.state_dict()[key].numpy(), err_msg=key)


@pytest.mark.parametrize("kind,extra", [
    ("mavil", dict(stage=1)), ("mavil", dict(stage=2)),
    ("mavil_ft", dict(heads="multimodal", num_classes=7)),
    ("mavil_ft", dict(heads="unimodal", num_classes=7)),
    ("mavil_ft", dict(heads="all", num_classes=7)),
])
def test_infer_config_from_state_dict(kind, extra):
  """Tiny widths at the real input sizes (1024x128 audio, 8 frames of 224x224)."""
  cls = tp.MAViL if kind == "mavil" else tp.MAViLFT
  want = dict(models.size_fields("tiny", kind), **extra)
  if extra.get("heads") == "unimodal":
    want.pop("fusion_depth")  # no fusion blocks, nothing to read it from
  with torch.device("meta"):
    port = cls(**want)
  config = models.config_from_state_dict(port.state_dict())
  assert config["kind"] == kind
  for key, value in want.items():
    assert config[key] == value, key
  module = models.build(config)
  assert (module.audio_length, module.num_mel_bins, module.num_frames, module.img_size) == (
      1024, 128, 8, 224)
  assert interop.torch_shapes(abstract_params(module)) == _shapes(port)
