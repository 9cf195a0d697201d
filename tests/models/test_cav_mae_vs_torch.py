"""Flax CAV-MAE against the project's PyTorch port, at the paper's base size.

Both sides get the same random weights (the port's init, perturbed so that no norm or
bias is trivially 1 or 0) and the same masking noise. Acceptance: relative L2 error
<= 1e-5 in float32 for forward_feat, the five fine-tuning modes and the pretraining losses.
The numerics run the base widths and depths on the demo's shorter inputs (2.56 s of
log-mel: 8 x 16 patches; 112 px frames: 7 x 7), a quarter of the real sequence lengths;
the real input size's layout (1024 x 128 audio, 224 px frames) is checked on shapes.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from avmae_jax import api
from avmae_jax.checkpoints import interop
from avmae_jax import models
from avmae_jax import torch_port
from avmae_jax.models import common as models_common
from tests._helpers import perturbed_state_dict
from tests._helpers import rel_err

RTOL = 1e-5
BATCH = 2
GEOMETRY = dict(audio_length=256, img_size=112)  # the numerics' inputs (the demo's)


def random_inputs(seed, audio_length=GEOMETRY["audio_length"], img_size=GEOMETRY["img_size"]):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((BATCH, audio_length, 128)).astype(np.float32)
  frames = rng.standard_normal((BATCH, img_size, img_size, 3)).astype(np.float32)
  return audio, frames


def to_nchw(frames):
  return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def pretrain_pair():
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(norm_pix_loss=True, **GEOMETRY).eval()
  state_dict = perturbed_state_dict(ref, 1)
  return ref, state_dict, api.from_state_dict(state_dict)


@pytest.fixture(scope="module")
def finetune_pair():
  torch.manual_seed(2)
  ref = torch_port.CAVMAEFT(num_classes=527, **GEOMETRY).eval()
  state_dict = perturbed_state_dict(ref, 3)
  return ref, state_dict, api.from_state_dict(state_dict)


@pytest.mark.slow
def test_base_sizes_match_reference(pretrain_pair, finetune_pair):
  # the test models: base widths and depths, inferred from the port's state dicts
  for pair, kind in ((pretrain_pair, "cav_mae"), (finetune_pair, "cav_mae_ft")):
    _, state_dict, model = pair
    assert model.kind == kind
    assert (model.module.audio_length, model.module.img_size) == (256, 112)
    for key, value in models.size_fields("base", kind).items():
      assert getattr(model.module, key) == value, key
    exported = model.state_dict()
    assert {k: v.shape for k, v in exported.items()} == {
        k: v.shape for k, v in state_dict.items()}
  # the real input size, on shapes (the port on torch's meta device): the port's layout and
  # parameter count, the config inferred from it, the Flax model's layout in its names
  for kind, num_tensors, num_values in (("cav_mae", 647, 191_036_160),
                                        ("cav_mae_ft", 478, 164_907_023)):
    with torch.device("meta"):
      port = (torch_port.CAVMAE() if kind == "cav_mae"
              else torch_port.CAVMAEFT(num_classes=527))
    shapes = {k: tuple(v.shape) for k, v in port.state_dict().items()}
    assert len(shapes) == num_tensors
    assert sum(int(np.prod(s)) for s in shapes.values()) == num_values
    config = models.config_from_state_dict(port.state_dict())
    assert config["kind"] == kind
    assert (config["audio_length"], config["img_size"]) == (1024, 224)
    for key, value in models.size_fields("base", kind).items():
      assert config[key] == value, key
    assert interop.torch_shapes(api.abstract_params(models.build(config))) == shapes


@pytest.mark.slow
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
  fresh = torch_port.CAVMAE(**GEOMETRY)
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


@pytest.mark.slow
def test_forward_feat_matches(pretrain_outputs):
  _, (got_a, got_v), (ref_a, ref_v) = pretrain_outputs
  assert got_a.shape == (BATCH, 128, 768) and got_v.shape == (BATCH, 49, 768)
  assert rel_err(got_a, ref_a.numpy()) <= RTOL
  assert rel_err(got_v, ref_v.numpy()) <= RTOL


@pytest.mark.slow
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
              for mode in models_common.MODES}
    feats = module.apply({"params": params}, audio, frames, method=module.forward_feat)
    return logits, feats

  with torch.no_grad():
    want = {mode: ref(torch.from_numpy(audio), to_nchw(frames), mode=mode).numpy()
            for mode in models_common.MODES}
    ref_feats = ref.forward_feat(torch.from_numpy(audio), to_nchw(frames))
  return run(model.params), (want, ref_feats)


@pytest.mark.slow
@pytest.mark.parametrize("mode", models_common.MODES)
def test_finetune_logits_match(finetune_outputs, mode):
  (logits, _), (want, _) = finetune_outputs
  assert logits[mode].shape == (BATCH, 527)
  assert rel_err(logits[mode], want[mode]) <= RTOL


@pytest.mark.slow
def test_finetune_features_match(finetune_outputs):
  (_, (got_a, got_v)), (_, (ref_a, ref_v)) = finetune_outputs
  assert rel_err(got_a, ref_a.numpy()) <= RTOL
  assert rel_err(got_v, ref_v.numpy()) <= RTOL


@pytest.mark.slow
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


@pytest.mark.slow
def test_bfloat16_compute_stays_close():
  module = models.build(dict(kind="cav_mae", **models.size_fields("tiny")))
  model = api.LoadedModel(module, api.init_params(module, seed=1))
  audio, frames = random_inputs(15, audio_length=1024, img_size=224)  # the real size
  bf16 = api.LoadedModel(module.clone(dtype=jnp.bfloat16), model.params)
  feats32 = model.features(audio, frames)
  feats16 = bf16.features(audio, frames)
  assert feats16["audio"].dtype == np.float32
  assert 0 < rel_err(feats16["audio"], feats32["audio"]) < 0.05
