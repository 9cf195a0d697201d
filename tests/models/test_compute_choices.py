"""How a model computes (scanned blocks, rematerialisation, attention, compute dtype): none
of it may change the parameters or what the model computes from them. (Scanned against
unrolled training steps: tests/training/test_train.py; MAViL scanned and rematerialised:
tests/models/test_mavil.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avmae_jax import models
from avmae_jax.models import layers


def _tiny(kind, **fields):
  """The tiny model on small inputs (128 x 128 audio, 32 px frames; MAViL: 4 of 64 px)."""
  small = dict(audio_length=128, img_size=32)
  if kind.startswith("mavil"):
    small.update(num_frames=4, img_size=64)
  return models.build({"kind": kind, **models.size_fields("tiny", kind), **small, **fields})


def _inputs(module, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
               for s in models.example_inputs(module, batch))


def test_scanning_keeps_the_parameters_and_their_names():
  unrolled = _tiny("cav_mae")
  scanned = unrolled.clone(scan_layers=True)
  names = lambda m: jax.tree_util.tree_map_with_path(
      lambda p, x: (jax.tree_util.keystr(p), x.shape), models.abstract_params(m))
  assert names(scanned) == names(unrolled)
  assert "blocks_a_1" in models.abstract_params(scanned)


@pytest.mark.slow
def test_scanned_drop_path_draws_per_layer_and_is_off_without_a_dropout_rng():
  module = _tiny("mavil_ft", encoder_depth=3, drop_path_rate=0.5, scan_layers=True)
  params = models.init_params(module, seed=0)
  audio, frames = _inputs(module)
  run = jax.jit(lambda p, rngs: module.apply({"params": p}, audio, frames, rngs=rngs))
  plain = run(params, {})
  np.testing.assert_allclose(plain, run(params, {}), rtol=0)
  a = run(params, {"dropout": jax.random.key(0)})
  b = run(params, {"dropout": jax.random.key(0)})
  c = run(params, {"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, plain) and not np.allclose(a, c)


def test_bad_compute_fields_are_named():
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    _tiny("cav_mae", remat_policy="sometimes")
  with pytest.raises(ValueError, match="attention must be one of"):
    _tiny("cav_mae", attention="flash")
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    _tiny("cav_mae", dtype="float64")


def test_legacy_remat_field_and_auto_fields():
  # model.json files written before remat_policy carry remat: true/false
  assert _tiny("cav_mae", remat=True).remat_policy == "full"
  assert _tiny("cav_mae", remat=False).remat_policy == "none"
  want = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  module = _tiny("cav_mae", dtype="auto")
  assert module.dtype == want
  assert models.model_config(module)["dtype"] == jnp.dtype(want).name  # what ran is kept
  assert _tiny("cav_mae", scan_layers="auto").scan_layers == (jax.default_backend() != "cpu")
  assert _tiny("cav_mae", scan_layers="true").scan_layers is True  # from a command line
  with pytest.raises(ValueError, match="scan_layers must be true, false or 'auto'"):
    _tiny("cav_mae", scan_layers="sometimes")


def test_attention_implementations():
  q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 5, 2, 8)), jnp.float32)
             for i in range(3))
  xla = layers.attention_op(q, k, v, 0.3, "xla")
  logits = np.einsum("bqhd,bkhd->bhqk", np.float64(q), np.float64(k)) * 0.3
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(xla, np.einsum("bhqk,bkhd->bqhd", probs, np.float64(v)),
                             rtol=1e-5, atol=1e-6)
  if jax.default_backend() != "gpu":  # auto falls back to XLA; cudnn is refused by name
    np.testing.assert_array_equal(layers.attention_op(q, k, v, 0.3, "auto"), xla)
    with pytest.raises(ValueError, match="attention='cudnn' cannot run here"):
      layers.attention_op(q, k, v, 0.3, "cudnn")
