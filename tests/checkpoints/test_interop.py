"""Checkpoint interop: bad inputs, the export CLI, model directories, ImageNet-MAE mapping."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avmae_jax import api  # pylint: disable=g-import-not-at-top
from avmae_jax.checkpoints import interop
from avmae_jax import models
from avmae_jax import torch_port
from tests import _helpers

ROOT = _helpers.ROOT
TINY = models.size_fields("tiny")
TINY_FT = models.size_fields("tiny", kind="cav_mae_ft")


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
  torch.manual_seed(0)
  ref = torch_port.CAVMAE(**TINY)
  path = str(tmp_path_factory.mktemp("pth") / "tiny.pth")
  torch.save({"module." + k: v for k, v in ref.state_dict().items()}, path)
  return path, ref


def test_infer_config_from_state_dict(tiny_pth):
  _, ref = tiny_pth
  config = models.config_from_state_dict(ref.state_dict())
  assert config["kind"] == "cav_mae"
  for key, value in TINY.items():
    assert config[key] == value, key
  ft = torch_port.CAVMAEFT(num_classes=7, **TINY_FT)
  config = models.config_from_state_dict(ft.state_dict())
  assert config["kind"] == "cav_mae_ft" and config["num_classes"] == 7


def test_wrong_shape_names_key_and_both_shapes(tiny_pth, tmp_path):
  _, ref = tiny_pth
  sd = dict(ref.state_dict())
  sd["blocks_v.1.mlp.fc1.weight"] = torch.zeros(3, 128)
  module = models.build(dict(kind="cav_mae", **TINY))
  with pytest.raises(interop.CheckpointError,
                     match=r"blocks_v\.1\.mlp\.fc1\.weight has shape \(3, 128\), "
                           r"the model expects \(512, 128\)"):
    interop.torch_to_flax({k: v.numpy() for k, v in sd.items()}, api.abstract_params(module))


@pytest.mark.slow
def test_missing_and_unexpected_keys_are_named(tiny_pth):
  _, ref = tiny_pth
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  del sd["norm_a.weight"]
  sd["extra.weight"] = np.zeros(2)
  module = models.build(dict(kind="cav_mae", **TINY))
  with pytest.raises(interop.CheckpointError) as err:
    interop.torch_to_flax(sd, api.abstract_params(module))
  assert "missing 1 key(s): norm_a.weight" in str(err.value)
  assert "unexpected 1 key(s): extra.weight" in str(err.value)
  # non-strict keeps template values and reports both
  params = api.init_params(module)
  loaded, report = interop.torch_to_flax(sd, params, strict=False)
  assert report == {"missing": ["norm_a.weight"], "unexpected": ["extra.weight"]}
  np.testing.assert_array_equal(loaded["norm_a"]["scale"], params["norm_a"]["scale"])


@pytest.mark.parametrize("content,match", [
    (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
    ("tensor", "expected a state dict"),
    ("list", "expected a state dict"),
    ("non-tensor values", "are not tensors"),
])
def test_bad_pth_gives_clear_error(tmp_path, content, match):
  path = str(tmp_path / "bad.pth")
  if isinstance(content, bytes):
    with open(path, "wb") as f:
      f.write(content)
  else:
    obj = {"tensor": torch.zeros(3), "list": [torch.zeros(1)],
           "non-tensor values": {"epoch": 3, "w": torch.zeros(1)}}[content]
    torch.save(obj, path)
  with pytest.raises(interop.CheckpointError, match=match) as err:
    avmae_load(path)
  assert path in str(err.value)


def avmae_load(path):
  import avmae_jax  # pylint: disable=import-outside-toplevel
  return avmae_jax.load(path)


def test_not_cav_mae_state_dict(tmp_path):
  path = str(tmp_path / "other.pth")
  torch.save({"fc.weight": torch.zeros(2, 2)}, path)
  with pytest.raises(interop.CheckpointError, match="not a CAV-MAE state dict"):
    avmae_load(path)
  with pytest.raises(FileNotFoundError):
    avmae_load(str(tmp_path / "missing.pth"))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "avmae_jax.export", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_cli_round_trip(tiny_pth, tmp_path):
  path, ref = tiny_pth
  out_dir = str(tmp_path / "ckpt")
  result = run_cli("--torch", path, "--out", out_dir)
  assert result.returncode == 0, result.stderr
  model = api.load(out_dir)
  assert model.kind == "cav_mae" and model.config["embed_dim"] == 128
  back = str(tmp_path / "back.pth")
  result = run_cli("--checkpoint", out_dir, "--out", back)
  assert result.returncode == 0, result.stderr
  fresh = torch_port.CAVMAE(**TINY)
  fresh.load_state_dict(torch.load(back, weights_only=True), strict=True)
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  # an existing output is not overwritten silently; a bad input is one clear line
  result = run_cli("--torch", path, "--out", out_dir)
  assert result.returncode == 1 and "already holds a model checkpoint" in result.stderr
  bad = str(tmp_path / "bad.pth")
  with open(bad, "w") as f:
    f.write("garbage")
  result = run_cli("--torch", bad, "--out", str(tmp_path / "x"))
  assert result.returncode == 1 and "not a readable PyTorch checkpoint" in result.stderr
  assert "Traceback" not in result.stderr


def fake_imagenet_mae(depth, dim, decoder_dim, decoder_depth, patch=16, grid=14):
  """An MAE ViT state dict with the facebookresearch/mae key layout and random values."""
  rng = np.random.default_rng(0)
  sd = {"cls_token": rng.standard_normal((1, 1, dim)),
        "pos_embed": rng.standard_normal((1, grid * grid + 1, dim)),
        "patch_embed.proj.weight": rng.standard_normal((dim, 3, patch, patch)),
        "patch_embed.proj.bias": rng.standard_normal(dim),
        "norm.weight": rng.standard_normal(dim), "norm.bias": rng.standard_normal(dim),
        "mask_token": rng.standard_normal((1, 1, decoder_dim)),
        "decoder_pos_embed": rng.standard_normal((1, grid * grid + 1, decoder_dim)),
        "decoder_embed.weight": rng.standard_normal((decoder_dim, dim)),
        "decoder_embed.bias": rng.standard_normal(decoder_dim),
        "decoder_norm.weight": rng.standard_normal(decoder_dim),
        "decoder_norm.bias": rng.standard_normal(decoder_dim),
        "decoder_pred.weight": rng.standard_normal((patch * patch * 3, decoder_dim)),
        "decoder_pred.bias": rng.standard_normal(patch * patch * 3)}

  def block(prefix, d):
    for n in ("norm1", "norm2"):
      sd[f"{prefix}.{n}.weight"] = rng.standard_normal(d)
      sd[f"{prefix}.{n}.bias"] = rng.standard_normal(d)
    sd[f"{prefix}.attn.qkv.weight"] = rng.standard_normal((3 * d, d))
    sd[f"{prefix}.attn.qkv.bias"] = rng.standard_normal(3 * d)
    sd[f"{prefix}.attn.proj.weight"] = rng.standard_normal((d, d))
    sd[f"{prefix}.attn.proj.bias"] = rng.standard_normal(d)
    sd[f"{prefix}.mlp.fc1.weight"] = rng.standard_normal((4 * d, d))
    sd[f"{prefix}.mlp.fc1.bias"] = rng.standard_normal(4 * d)
    sd[f"{prefix}.mlp.fc2.weight"] = rng.standard_normal((d, 4 * d))
    sd[f"{prefix}.mlp.fc2.bias"] = rng.standard_normal(d)

  for i in range(depth):
    block(f"blocks.{i}", dim)
  for i in range(decoder_depth):
    block(f"decoder_blocks.{i}", decoder_dim)
  return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.mark.slow
def test_imagenet_mae_mapping(tmp_path):
  mae = fake_imagenet_mae(depth=3, dim=128, decoder_dim=64, decoder_depth=1)
  path = str(tmp_path / "mae.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in mae.items()}}, path)
  out_dir = str(tmp_path / "init")
  result = subprocess.run(
      [sys.executable, "-m", "avmae_jax.export", "--imagenet_mae", path, "--out", out_dir,
       "--config", "configs/cav_mae_pretrain.py:size=tiny"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  sd = api.load(out_dir).state_dict()
  eq = np.testing.assert_array_equal
  for i in range(2):  # modality-specific depth 2: MAE blocks 0, 1
    for m in ("a", "v"):
      eq(sd[f"blocks_{m}.{i}.attn.qkv.weight"], mae[f"blocks.{i}.attn.qkv.weight"])
      eq(sd[f"blocks_{m}.{i}.norm1.weight"], mae[f"blocks.{i}.norm1.weight"])
  eq(sd["blocks_u.0.mlp.fc2.weight"], mae["blocks.2.mlp.fc2.weight"])
  for m in ("", "_a", "_v"):
    eq(sd[f"blocks_u.0.norm2{m}.bias"], mae["blocks.2.norm2.bias"])
    eq(sd[f"norm{m}.weight"], mae["norm.weight"])
  eq(sd["patch_embed_v.proj.weight"], mae["patch_embed.proj.weight"])
  np.testing.assert_allclose(sd["patch_embed_a.proj.weight"][:, 0],
                             mae["patch_embed.proj.weight"].sum(axis=1), rtol=1e-6)
  eq(sd["decoder_pred_v.weight"], mae["decoder_pred.weight"])
  eq(sd["decoder_pred_a.weight"], mae["decoder_pred.weight"][:256])
  eq(sd["decoder_blocks.0.attn.proj.weight"], mae["decoder_blocks.0.attn.proj.weight"])
  eq(sd["mask_token"], mae["mask_token"])
  eq(sd["pos_embed_v"], mae["pos_embed"][:, 1:])
  assert "modality_a" in result.stdout  # reported as left at init
  # the unused modality-specific norms of blocks_a keep their init (1, 0)
  eq(sd["blocks_a.0.norm1_a.weight"], np.ones(128, np.float32))


def test_loaded_model_rejects_bad_inputs(tiny_pth):
  path, _ = tiny_pth
  model = api.load(path)
  with pytest.raises(ValueError, match=r"audio must be \[batch, 1024, 128\]"):
    model.features(np.zeros((1, 998, 128)), np.zeros((1, 224, 224, 3)))
  with pytest.raises(ValueError, match="frames must be"):
    model.features(np.zeros((1, 1024, 128)), np.zeros((1, 3, 224, 224)))
  with pytest.raises(TypeError, match="fine-tuned"):
    model.classify(np.zeros((1, 1024, 128)), np.zeros((1, 224, 224, 3)))


def test_build_rejects_unknown_fields():
  with pytest.raises(ValueError, match="unknown field"):
    models.build(dict(kind="cav_mae", embed_dimm=3))
  with pytest.raises(ValueError, match="model.kind"):
    models.build(dict(kind="vit"))
  with pytest.raises(ValueError, match="model.dtype"):
    models.build(dict(kind="cav_mae", dtype="float8"))
