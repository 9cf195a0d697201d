"""Flax CAV-MAE against the project's PyTorch port, at the paper's base size.

Both sides get the same random weights (the port's init, perturbed so that no norm or
bias is trivially 1 or 0) and the same masking noise. Acceptance: relative L2 error
<= 1e-5 in float32 for forward_feat, the five fine-tuning modes and the pretraining losses.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from avmae_jax import api
from avmae_jax import interop
from avmae_jax import models
from avmae_jax import torch_port
from avmae_jax.models import cav_mae

RTOL = 1e-5
BATCH = 2


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def perturbed_state_dict(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def random_inputs(seed, audio_length=1024, img_size=224):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((BATCH, audio_length, 128)).astype(np.float32)
  frames = rng.standard_normal((BATCH, img_size, img_size, 3)).astype(np.float32)
  return audio, frames


def to_nchw(frames):
  return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def pretrain_pair():
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(norm_pix_loss=True).eval()
  state_dict = perturbed_state_dict(ref, 1)
  return ref, state_dict, api.from_state_dict(state_dict)


@pytest.fixture(scope="module")
def finetune_pair():
  torch.manual_seed(2)
  ref = torch_port.CAVMAEFT(num_classes=527).eval()
  state_dict = perturbed_state_dict(ref, 3)
  return ref, state_dict, api.from_state_dict(state_dict)


def test_base_sizes_match_reference(pretrain_pair, finetune_pair):
  _, _, model = pretrain_pair
  exported = model.state_dict()
  assert len(exported) == 647
  assert sum(v.size for v in exported.values()) == 191_036_160
  ft_exported = finetune_pair[2].state_dict()
  assert sum(v.size for v in ft_exported.values()) == 164_907_023


def test_export_reimport_is_bit_exact_and_loads_strict(pretrain_pair, tmp_path):
  ref, state_dict, model = pretrain_pair
  exported = model.state_dict()
  assert sorted(exported) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  path = str(tmp_path / "cav_mae.pth")
  model.save_torch(path, module_prefix=True)
  reloaded = api.load(path)
  for a, b in zip(jax.tree.leaves(reloaded.params), jax.tree.leaves(model.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = torch_port.CAVMAE()
  saved = torch.load(path, weights_only=True)
  assert all(k.startswith("module.") for k in saved)
  fresh.load_state_dict({k[len("module."):]: v for k, v in saved.items()}, strict=True)
  for key, value in fresh.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref.state_dict()[key].numpy(), err_msg=key)


@pytest.fixture(scope="module")
def pretrain_outputs(pretrain_pair):
  """Losses for two mask modes and forward_feat, from ONE compiled function each side."""
  ref, _, model = pretrain_pair
  module = model.module
  audio, frames = random_inputs(11)

  @jax.jit
  def run(params, noise_a, noise_v):
    out = module.apply({"params": params}, audio, frames, noise_a, noise_v)
    feats = module.apply({"params": params}, audio, frames, method=module.forward_feat)
    return out, feats

  results = {}
  for mode in ("unstructured", "tf"):
    # The mask mode only shapes the noise; the same compiled forward serves both.
    noise_a, noise_v = module.clone(mask_mode=mode).apply(
        {"params": model.params}, BATCH, method=module.draw_noise,
        rngs={"masking": jax.random.key(5)})
    out, feats = run(model.params, noise_a, noise_v)
    with torch.no_grad():
      want = ref(torch.from_numpy(audio), to_nchw(frames), mask_mode=mode,
                 noise_a=torch.from_numpy(np.array(noise_a)),
                 noise_v=torch.from_numpy(np.array(noise_v)))
    results[mode] = (out, want)
  with torch.no_grad():
    ref_feats = ref.forward_feat(torch.from_numpy(audio), to_nchw(frames))
  return results, feats, ref_feats


def test_forward_feat_matches(pretrain_outputs):
  _, (got_a, got_v), (ref_a, ref_v) = pretrain_outputs
  assert got_a.shape == (BATCH, 512, 768) and got_v.shape == (BATCH, 196, 768)
  assert rel_err(got_a, ref_a.numpy()) <= RTOL
  assert rel_err(got_v, ref_v.numpy()) <= RTOL


@pytest.mark.parametrize("mask_mode", ["unstructured", "tf"])
def test_pretraining_losses_match_under_identical_masks(pretrain_outputs, mask_mode):
  out, want = pretrain_outputs[0][mask_mode]
  np.testing.assert_array_equal(np.asarray(out["mask_a"]), want["mask_a"].numpy())
  np.testing.assert_array_equal(np.asarray(out["mask_v"]), want["mask_v"].numpy())
  for key in ("pred_a", "pred_v"):
    assert rel_err(out[key], want[key].numpy()) <= RTOL, key
  for key in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "nce"):
    assert rel_err(out[key], want[key].numpy()) <= RTOL, key
  assert float(out["c_acc"]) == pytest.approx(float(want["c_acc"]))


@pytest.fixture(scope="module")
def finetune_outputs(finetune_pair):
  ref, _, model = finetune_pair
  module = model.module
  audio, frames = random_inputs(12)

  @jax.jit
  def run(params):
    logits = {mode: module.apply({"params": params}, audio, frames, mode)
              for mode in cav_mae.FT_MODES}
    feats = module.apply({"params": params}, audio, frames, method=module.forward_feat)
    return logits, feats

  with torch.no_grad():
    want = {mode: ref(torch.from_numpy(audio), to_nchw(frames), mode=mode).numpy()
            for mode in cav_mae.FT_MODES}
    ref_feats = ref.forward_feat(torch.from_numpy(audio), to_nchw(frames))
  return run(model.params), (want, ref_feats)


@pytest.mark.parametrize("mode", cav_mae.FT_MODES)
def test_finetune_logits_match(finetune_outputs, mode):
  (logits, _), (want, _) = finetune_outputs
  assert logits[mode].shape == (BATCH, 527)
  assert rel_err(logits[mode], want[mode]) <= RTOL


def test_finetune_features_match(finetune_outputs):
  (_, (got_a, got_v)), (_, (ref_a, ref_v)) = finetune_outputs
  assert rel_err(got_a, ref_a.numpy()) <= RTOL
  assert rel_err(got_v, ref_v.numpy()) <= RTOL


def test_classify_api_matches_module(finetune_pair, finetune_outputs):
  _, _, model = finetune_pair
  audio, frames = random_inputs(12)
  (logits, _), _ = finetune_outputs
  np.testing.assert_allclose(model.classify(audio, None, mode="audioonly"),
                             logits["audioonly"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="needs audio"):
    model.classify(None, frames, mode="audioonly")


def test_gradients_match_on_tiny_model():
  """The training signal agrees, not only the forward pass (tiny size, small inputs)."""
  fields = dict(models.size_fields("tiny"), audio_length=256, img_size=64,
                norm_pix_loss=True)
  torch.manual_seed(4)
  ref = torch_port.CAVMAE(**fields)
  state_dict = perturbed_state_dict(ref, 5)
  model = api.from_state_dict(state_dict, num_heads=2, decoder_num_heads=2)
  audio, frames = random_inputs(14, audio_length=256, img_size=64)
  module = model.module
  noise_a, noise_v = module.apply({"params": model.params}, BATCH, method=module.draw_noise,
                                  rngs={"masking": jax.random.key(6)})
  grads = jax.jit(jax.grad(lambda p: module.apply(
      {"params": p}, audio, frames, noise_a, noise_v)["loss"]))(model.params)
  out = ref(torch.from_numpy(audio), to_nchw(frames),
            noise_a=torch.from_numpy(np.array(noise_a)),
            noise_v=torch.from_numpy(np.array(noise_v)))
  out["loss"].backward()
  got = interop.flax_to_torch(grads)
  for key, param in ref.named_parameters():
    if not param.requires_grad:
      np.testing.assert_array_equal(got[key], 0.0, err_msg=f"{key} is frozen")
      continue
    want = param.grad.numpy() if param.grad is not None else np.zeros(param.shape)
    if np.linalg.norm(want) == 0:
      assert np.linalg.norm(got[key]) == 0, key
    else:
      assert rel_err(got[key], want) <= 1e-4, key


def test_bfloat16_compute_stays_close():
  module = models.build(dict(kind="cav_mae", **models.size_fields("tiny")))
  model = api.LoadedModel(module, api.init_params(module, seed=1))
  audio, frames = random_inputs(15)
  bf16 = api.LoadedModel(module.clone(dtype=jnp.bfloat16), model.params)
  feats32 = model.features(audio, frames)
  feats16 = bf16.features(audio, frames)
  assert feats16["audio"].dtype == np.float32
  assert 0 < rel_err(feats16["audio"], feats32["audio"]) < 0.05
