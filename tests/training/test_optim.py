"""Tests of avmae_jax.optim against PyTorch's optimizers and schedulers.

Every recipe runs the same fixed random gradients through our optax transformation and through
torch.optim (Adam / AdamW, MultiStepLR / LambdaLR, clip_grad_norm_, param groups), comparing the
parameters after every step. The learning rates are far above the recipe's so that a wrong
schedule, group or decay rule moves the parameters well beyond the float32 tolerance.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from avmae_jax.training import optim

# Tolerances. optax computes Adam's bias corrections in float32: 1 - 0.999**t with 0.999
# rounded to float32 is 1.3e-5 (relative) off the float64 value torch uses, which scales every
# update by about (1 - 6.4e-6). So differences grow with the distance travelled: the absolute
# tolerance is a few float32 ulps of the initial values plus 2e-5 of the summed per-step lr
# (Adam moves a parameter by about lr per step). Any semantic error (wrong lr, group, decay
# rule, clipping, accumulation) changes an update by a percent or more.
RTOL = 1e-6
ULPS_OF_INITIAL, OF_PATH = 1e-6, 2e-5
SHAPES = {
    "pos_embed_a": (1, 4, 8),
    "blocks_a_0": {"attn": {"qkv": {"kernel": (8, 24), "bias": (24,)}},
                   "norm1": {"scale": (8,), "bias": (8,)}},
    "decoder_blocks_3": {"mlp": {"fc1": {"kernel": (8, 16)}}},
    "mlp_head_0": {"scale": (8,), "bias": (8,)},
    "mlp_head_1": {"kernel": (8, 5), "bias": (5,)},
}


def _is_shape(x):
  return isinstance(x, tuple)


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=_is_shape)


def make_grads(num_steps, seed=1, scale_range=(1.0, 1.0)):
  """Per step: a gradient tree whose global scale varies in `scale_range` (log-uniform)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    scale = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    out.append(jax.tree.map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), SHAPES,
                            is_leaf=_is_shape))
  return out


def flat(tree):
  """{path: array} in the order of the tree's leaves."""
  return {optim.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def config_with(recipe="adam_step", **fields):
  """A config whose optimizer fields are plain values (so wrong types reach our checks)."""
  optimizer = optim.default_optimizer_config(recipe).to_dict()
  optimizer.update(fields)
  return ml_collections.ConfigDict({"optimizer": optimizer})


def run_jax(config, params, grads, steps_per_epoch, global_batch_size=48, lr_layers=None):
  """Parameters after every step, and schedule(step) of every step."""
  tx, schedule = optim.make_optimizer(config, params, steps_per_epoch, global_batch_size,
                                      lr_layers)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  history, lrs = [], []
  for i, g in enumerate(grads):
    lrs.append(float(schedule(i)))
    params, state = step(params, state, g)
    history.append(flat(params))
  return history, lrs


class TorchRun:
  """The torch side: named float32 tensors, param groups by regex, one step per call."""

  def __init__(self, params, frozen=(), head=(), head_mult=1.0, no_decay_1d=False,
               lr_scale=lambda name: 1.0):
    self.tensors = {k: torch.tensor(v, requires_grad=True) for k, v in flat(params).items()}
    self.frozen = {k for k in self.tensors if any(re.search(p, k) for p in frozen)}
    for k in self.frozen:
      self.tensors[k].requires_grad_(False)
    self.groups = {}
    for k, t in self.tensors.items():
      if k in self.frozen:
        continue
      is_head = any(re.search(p, k) for p in head)
      decays = not (no_decay_1d and t.ndim <= 1)
      self.groups.setdefault((is_head, decays, lr_scale(k)), []).append(t)
    self.head_mult = head_mult

  def param_groups(self, lr, weight_decay):
    """Groups as MAE's param_groups_lrd builds them: a fixed lr_scale per group."""
    return [{"params": ts, "lr_scale": scale * (self.head_mult if is_head else 1.0),
             "lr": lr * scale * (self.head_mult if is_head else 1.0),
             "weight_decay": weight_decay if decays else 0.0}
            for (is_head, decays, scale), ts in self.groups.items()]

  def trainable(self):
    return [t for k, t in self.tensors.items() if k not in self.frozen]

  def set_grads(self, grads_list):
    """Sets .grad of trainable tensors to the mean of the given gradient trees."""
    flats = [flat(g) for g in grads_list]
    for k, t in self.tensors.items():
      if k not in self.frozen:
        t.grad = torch.tensor(np.mean([f[k] for f in flats], axis=0, dtype=np.float32))

  def snapshot(self):
    return {k: t.detach().numpy().copy() for k, t in self.tensors.items()}


class Tolerance:
  """The absolute tolerance after each torch step: see RTOL above."""

  def __init__(self, params):
    self.initial = max(float(np.abs(x).max()) for x in flat(params).values())
    self.path = 0.0

  def step(self, opt):
    """Call right before opt.step()."""
    self.path += max(g["lr"] for g in opt.param_groups)

  @property
  def atol(self):
    return ULPS_OF_INITIAL * self.initial + OF_PATH * self.path


def assert_close(ours, theirs, step, tol):
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=RTOL, atol=tol.atol,
                               err_msg=f"param {k} at step {step}")


# --- adam_step (CAV-MAE) -----------------------------------------------------------------------

ADAM_CASES = {
    # the reference weight decay (5e-7 moves nothing visibly at this tolerance) ...
    "reference_wd": dict(fields=dict(weight_decay=5e-7), torch=dict()),
    # ... and a large one, where coupled and decoupled decay differ by far more than it.
    "coupled_wd": dict(fields=dict(weight_decay=0.5), torch=dict()),
    "head_x100": dict(fields=dict(head_patterns=["^mlp_head"], head_lr_mult=100.0),
                      torch=dict(head=["^mlp_head"], head_mult=100.0)),
    # Gradient scales vary 0.1x..10x so some steps are clipped and some not (a uniform clip
    # would be invisible through Adam's normalisation).
    "clip": dict(fields=dict(grad_clip_norm=8.0), torch=dict(), clip=8.0),
    # Frozen gradients are huge: they must neither move frozen params nor enter the clip norm.
    "frozen_clip": dict(fields=dict(frozen=["^(decoder_)?pos_embed_[av]$", "^decoder_"],
                                    grad_clip_norm=8.0),
                        torch=dict(frozen=["^(decoder_)?pos_embed_[av]$", "^decoder_"]),
                        clip=8.0),
}


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_step_matches_torch(case):
  spec = ADAM_CASES[case]
  lr, spe, num_steps = 1e-2, 3, 30
  config = config_with("adam_step", lr=lr, lr_step_start=2, lr_step_every=1, lr_decay=0.5,
                       **spec["fields"])
  params = make_params()
  grads = make_grads(num_steps, scale_range=(0.1, 10.0))
  if case == "frozen_clip":
    for g in grads:
      g["pos_embed_a"] *= 1e4
      g["decoder_blocks_3"]["mlp"]["fc1"]["kernel"] *= 1e4
  ours, our_lrs = run_jax(config, params, grads, spe)

  ref = TorchRun(params, **spec["torch"])
  opt = torch.optim.Adam(ref.param_groups(lr, config.optimizer.weight_decay),
                         betas=(0.95, 0.999), eps=1e-8)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(2, 1000, 1)), gamma=0.5)
  base_group = next(i for i, ((is_head, *_), _) in enumerate(ref.groups.items()) if not is_head)
  clipped, tol = 0, Tolerance(params)
  for i, g in enumerate(grads):
    assert our_lrs[i] == pytest.approx(opt.param_groups[base_group]["lr"], rel=1e-6), i
    ref.set_grads([g])
    if "clip" in spec:
      norm = torch.nn.utils.clip_grad_norm_(ref.trainable(), spec["clip"])
      clipped += int(norm > spec["clip"])
    tol.step(opt)
    opt.step()
    if (i + 1) % spe == 0:
      sched.step()
    assert_close(ours[i], ref.snapshot(), i, tol)
  if "clip" in spec:
    assert 0 < clipped < num_steps  # the case exercises both branches
  initial = flat(params)
  for k in ref.frozen:
    assert np.array_equal(ours[-1][k], initial[k]), k  # bit-identical
  for k in set(initial) - ref.frozen:
    assert not np.allclose(ours[-1][k], initial[k]), k


def test_linear_probe_updates_only_the_head():
  config = config_with("adam_step", lr=1e-2, weight_decay=0.1, frozen=["^(?!mlp_head)"])
  params = make_params()
  ours, _ = run_jax(config, params, make_grads(4), steps_per_epoch=2)
  for k, v in flat(params).items():
    assert np.array_equal(ours[-1][k], v) != k.startswith("mlp_head"), k


def test_default_schedule_is_the_reference_multisteplr():
  """Defaults = CAV-MAE AS-2M pretraining: 5e-5, halved after epochs 10, 15, 20 (of 25)."""
  config = ml_collections.ConfigDict({"optimizer": optim.default_optimizer_config()})
  c = config.optimizer
  assert (c.name, c.lr, c.b1, c.b2, c.eps, c.weight_decay) == (
      "adam_step", 5e-5, 0.95, 0.999, 1e-8, 5e-7)
  assert (c.grad_clip_norm, c.grad_accum_steps, c.warmup_steps, c.warmup_epochs) == (
      None, 1, None, None)
  spe = 7
  _, schedule = optim.make_optimizer(config, make_params(), spe, 48)
  opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=5e-5)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(10, 1000, 5)), gamma=0.5)
  for epoch in range(25):
    for step in (epoch * spe, epoch * spe + spe - 1):
      assert float(schedule(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step
    opt.step()  # no gradients: only keeps torch from warning about the call order
    sched.step()
  assert float(schedule(20 * spe)) == pytest.approx(5e-5 / 8, rel=1e-6)


# --- adamw_cosine (MAViL) ----------------------------------------------------------------------

def warmup_cosine(step, peak, min_lr, warmup, total):
  if step < warmup:
    return peak * step / warmup
  progress = (step - warmup) / (total - warmup)
  return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_adamw_cosine_matches_torch():
  lr, min_lr, warmup, total, spe, batch = 5e-3, 1e-4, 5, 30, 4, 512
  config = config_with("adamw_cosine", lr=lr, min_lr=min_lr, warmup_epochs=None,
                       warmup_steps=warmup, total_steps=total, head_patterns=["^mlp_head_1"],
                       head_lr_mult=10.0)
  params = make_params()
  grads = make_grads(total)
  ours, our_lrs = run_jax(config, params, grads, spe, global_batch_size=batch)

  peak = lr * batch / 256  # lr_scale_by_batch is the adamw_cosine default
  ref = TorchRun(params, head=["^mlp_head_1"], head_mult=10.0, no_decay_1d=True)
  opt = torch.optim.AdamW(ref.param_groups(peak, 0.05), betas=(0.9, 0.95), eps=1e-8)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: warmup_cosine(s, peak, min_lr, warmup, total) / peak)
  tol = Tolerance(params)
  for i, g in enumerate(grads):
    assert our_lrs[i] == pytest.approx(warmup_cosine(i, peak, min_lr, warmup, total),
                                       rel=1e-5, abs=1e-9), i
    ref.set_grads([g])
    tol.step(opt)
    opt.step()
    sched.step()
    assert_close(ours[i], ref.snapshot(), i, tol)
  # 1-D params are exempt from decay: a zero-gradient bias keeps its value exactly.
  zero = [jax.tree.map(np.zeros_like, g) for g in grads[:3]]
  after, _ = run_jax(config, params, zero, spe, global_batch_size=batch)
  assert np.array_equal(after[-1]["mlp_head_1/bias"], flat(params)["mlp_head_1/bias"])
  assert not np.array_equal(after[-1]["mlp_head_1/kernel"], flat(params)["mlp_head_1/kernel"])


def test_layer_decay_matches_torch_param_groups():
  """MAE's layer-wise decay: torch groups with lr = schedule * lr_scale (wd included)."""
  lr, warmup, total, spe, decay = 5e-3, 3, 12, 4, 0.5
  layers = {"pos_embed_a": 0, "blocks_a_0": 1, "decoder_blocks_3": 2}  # the rest: top, 3
  layer_of = lambda path: layers.get(path.split("/")[0], 3)
  config = config_with("adamw_cosine", lr=lr, lr_scale_by_batch=False, min_lr=0.0,
                       warmup_epochs=None, warmup_steps=warmup, total_steps=total,
                       head_patterns=["^mlp_head_1"], head_lr_mult=10.0, layer_decay=decay)
  params, grads = make_params(), make_grads(total)
  ours, _ = run_jax(config, params, grads, spe, lr_layers=(layer_of, 3))

  ref = TorchRun(params, head=["^mlp_head_1"], head_mult=10.0, no_decay_1d=True,
                 lr_scale=lambda name: decay ** (3 - layer_of(name)))
  opt = torch.optim.AdamW(ref.param_groups(lr, 0.05), betas=(0.9, 0.95), eps=1e-8)
  tol = Tolerance(params)
  for i, g in enumerate(grads):
    for group in opt.param_groups:  # MAE's adjust_learning_rate: lr * lr_scale per group
      group["lr"] = warmup_cosine(i, lr, 0.0, warmup, total) * group["lr_scale"]
    ref.set_grads([g])
    tol.step(opt)
    opt.step()
    assert_close(ours[i], ref.snapshot(), i, tol)
  # The decay is visible: without it the embedding moves 8x further.
  plain, _ = run_jax(config_with("adamw_cosine", lr=lr, lr_scale_by_batch=False, min_lr=0.0,
                                 warmup_epochs=None, warmup_steps=warmup, total_steps=total),
                     params, grads, spe)
  start = flat(params)["pos_embed_a"]
  moved = lambda run: np.abs(run[-1]["pos_embed_a"] - start).mean()
  assert moved(plain) > 4 * moved(ours)
  with pytest.raises(ValueError, match="optimizer.layer_decay"):
    optim.make_optimizer(config, params, spe, 48)  # no layer ids given
  with pytest.raises(ValueError, match="outside 0..3"):
    tx, _ = optim.make_optimizer(config, params, spe, 48, (lambda path: 4, 3))
    tx.update(grads[0], tx.init(params), params)


def test_adamw_warmup_and_length_in_epochs():
  config = config_with("adamw_cosine", lr=1e-3, lr_scale_by_batch=False, warmup_epochs=1.5,
                       min_lr=1e-5)
  config.num_epochs = 4  # the fallback for the schedule length
  spe = 10
  _, schedule = optim.make_optimizer(config, make_params(), spe, 48)
  for step in (0, 7, 15, 22, 39, 40):
    assert float(schedule(step)) == pytest.approx(
        warmup_cosine(min(step, 40), 1e-3, 1e-5, 15, 40), rel=1e-5, abs=1e-10), step


# --- gradient accumulation ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adam_step", "adamw_cosine"])
def test_accumulation_equals_a_step_on_the_mean_gradient(name):
  k, spe, num_updates, lr, batch = 3, 6, 8, 1e-2, 128
  if name == "adam_step":
    # A large coupled decay: it is what makes mean and sum of the micro-gradients differ
    # (Adam itself is scale-invariant), and the clip acts on some updates only.
    fields = dict(lr_step_start=1, lr_step_every=1, grad_clip_norm=15.0, weight_decay=0.5)
  else:
    # warmup / total in loop steps (6 and 24 -> 2 and 8 updates); lr * 128 * 3 / 256.
    fields = dict(warmup_epochs=None, warmup_steps=6, total_steps=24, min_lr=1e-4,
                  head_patterns=["^mlp_head"], head_lr_mult=5.0)
  config = config_with(name, lr=lr, grad_accum_steps=k, **fields)
  params = make_params()
  grads = make_grads(num_updates * k, scale_range=(0.3, 3.0))
  ours, our_lrs = run_jax(config, params, grads, spe, global_batch_size=batch)

  if name == "adam_step":
    ref = TorchRun(params)
    opt = torch.optim.Adam(ref.param_groups(lr, 0.5), betas=(0.95, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(range(1, 1000)), gamma=0.5)
    lr_of_update = lambda u: lr * 0.5 ** max(0, (u * k) // spe)
  else:
    peak = lr * batch * k / 256
    ref = TorchRun(params, head=["^mlp_head"], head_mult=5.0, no_decay_1d=True)
    opt = torch.optim.AdamW(ref.param_groups(peak, 0.05), betas=(0.9, 0.95), eps=1e-8)
    lr_of_update = lambda u: warmup_cosine(u * k, peak, 1e-4, 6, 24)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_of_update(u) / peak)
  tol, clipped = Tolerance(params), 0
  for u in range(num_updates):
    before = flat(params) if u == 0 else ours[u * k - 1]
    for j in range(k - 1):  # no movement until the k-th micro-step
      assert all(np.array_equal(ours[u * k + j][n], before[n]) for n in before), (u, j)
    for j in range(k):
      assert our_lrs[u * k + j] == pytest.approx(lr_of_update(u), rel=1e-5), (u, j)
    ref.set_grads(grads[u * k:u * k + k])
    if name == "adam_step":
      clipped += int(torch.nn.utils.clip_grad_norm_(ref.trainable(), 15.0) > 15.0)
    tol.step(opt)
    opt.step()
    if name == "adamw_cosine" or (u * k + k) % spe == 0:
      sched.step()
    assert_close(ours[u * k + k - 1], ref.snapshot(), u, tol)
  if name == "adam_step":
    assert 0 < clipped < num_updates


def test_accumulated_schedule_takes_the_first_micro_step():
  """steps_per_epoch not a multiple of k: update u uses the epoch of loop step u*k."""
  config = config_with("adam_step", lr=1.0, lr_step_start=1, lr_step_every=1, grad_accum_steps=3)
  _, schedule = optim.make_optimizer(config, make_params(), 4, 48)
  got = [float(schedule(s)) for s in range(12)]
  # updates start at steps 0, 3, 6, 9 -> epochs 0, 0, 1, 2
  assert got == [1.0] * 6 + [0.5] * 3 + [0.25] * 3


# --- validation --------------------------------------------------------------------------------

BAD = [
    ("adam_step", dict(lr=-1.0), "optimizer.lr must be > 0, got -1"),
    ("adam_step", dict(name="sgd"), "optimizer.name"),
    ("adam_step", dict(b1=1.0), "optimizer.b1"),
    ("adam_step", dict(b2=-0.1), "optimizer.b2"),
    ("adam_step", dict(eps=-1.0), "optimizer.eps"),
    ("adam_step", dict(weight_decay=-1.0), "optimizer.weight_decay"),
    ("adam_step", dict(grad_clip_norm=0.0), "optimizer.grad_clip_norm"),
    ("adam_step", dict(grad_accum_steps=0), "optimizer.grad_accum_steps"),
    ("adam_step", dict(grad_accum_steps=1.5), "optimizer.grad_accum_steps"),
    ("adam_step", dict(head_lr_mult=0.0, head_patterns=["^mlp_head"]), "optimizer.head_lr_mult"),
    ("adam_step", dict(head_lr_mult=100.0), "optimizer.head_patterns"),
    ("adam_step", dict(head_patterns=["^mlp_heads"]), "optimizer.head_patterns"),
    ("adam_step", dict(frozen=["["]), "optimizer.frozen"),
    ("adam_step", dict(frozen=["^pos_embed_v$"]), "optimizer.frozen"),
    ("adam_step", dict(frozen=[""]), "optimizer.frozen"),
    ("adam_step", dict(no_decay_patterns="bias"), "optimizer.no_decay_patterns"),
    ("adam_step", dict(lr_step_every=0), "optimizer.lr_step_every"),
    ("adam_step", dict(lr_step_start=-1), "optimizer.lr_step_start"),
    ("adam_step", dict(lr_decay=0.0), "optimizer.lr_decay"),
    ("adam_step", dict(warmup_steps=10), "optimizer.warmup_steps"),
    ("adam_step", dict(lr_scale_by_batch="yes"), "optimizer.lr_scale_by_batch"),
    ("adamw_cosine", dict(total_steps=100, warmup_epochs=None, warmup_steps=100),
     "optimizer.warmup_steps"),
    ("adamw_cosine", dict(total_steps=100, warmup_steps=10), "optimizer.warmup_epochs"),
    ("adamw_cosine", dict(), "optimizer.total_steps"),
    ("adamw_cosine", dict(total_steps=0), "optimizer.total_steps"),
    ("adamw_cosine", dict(total_steps=100, total_epochs=2), "optimizer.total_epochs"),
    ("adamw_cosine", dict(total_steps=100, warmup_epochs=None, min_lr=1.0), "optimizer.min_lr"),
    ("adamw_cosine", dict(total_steps=100, min_lr=-1.0), "optimizer.min_lr"),
    ("adamw_cosine", dict(total_steps=100, lr_decay=0.5), "optimizer.lr_decay"),
    ("adamw_cosine", dict(total_steps=100, layer_decay=0.0), "optimizer.layer_decay"),
    ("adamw_cosine", dict(total_steps=100, layer_decay=1.5), "optimizer.layer_decay"),
]


@pytest.mark.parametrize("recipe,fields,message", BAD)
def test_bad_config_names_the_field(recipe, fields, message):
  config = config_with(recipe, **fields)
  with pytest.raises(ValueError, match=re.escape(message)):
    optim.make_optimizer(config, make_params(), 10, 48)


def test_bad_structure_and_arguments():
  config = config_with()
  config.optimizer.unlock()
  config.optimizer.lr_typo = 1.0
  with pytest.raises(ValueError, match="optimizer.lr_typo"):
    optim.make_optimizer(config, make_params(), 10, 48)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.make_optimizer(config_with(), make_params(), 0, 48)
  with pytest.raises(ValueError, match="global_batch_size"):
    optim.make_optimizer(config_with(), make_params(), 10, 2.5)
  # The default ConfigDict is typed: a wrong type fails already at override time.
  with pytest.raises(TypeError):
    optim.default_optimizer_config().grad_accum_steps = 1.5
  with pytest.raises(TypeError):
    optim.default_optimizer_config().grad_clip_norm = "none"


def test_frozen_mask_marks_exactly_what_make_optimizer_freezes():
  params, grads = make_params(), make_grads(1)[0]
  config = config_with(frozen=["^pos_embed", "norm1/scale$"], lr=0.1)
  tx, _ = optim.make_optimizer(config, params, steps_per_epoch=10, global_batch_size=48)
  updates, _ = tx.update(grads, tx.init(params), params)
  mask = optim.frozen_mask(config.optimizer.frozen, params)
  got = {optim.param_path(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert got["pos_embed_a"] and got["blocks_a_0/norm1/scale"] and sum(got.values()) == 2
  for path, update in flat(updates).items():
    assert got[path] == (not np.any(update)), path
