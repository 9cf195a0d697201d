r"""Benchmarks that print measured figures; the last line of each is one JSON object.

  python -m avmae_jax.bench model --config configs/cav_mae_pretrain.py:size=base --batch_size 2
      compiled forward+backward of the model alone (random inputs, no optimizer, no input
      pipeline): step_ms, samples_per_s, analytic flops_per_sample, achieved TFLOP/s.
  python -m avmae_jax.bench train --config configs/cav_mae_pretrain.py --batch_size 8
      the real sharded train step (model, optimizer update, donation) over all devices:
      step_ms, samples_per_s, mfu (null where the accelerator's peak is unknown), memory.
  python -m avmae_jax.bench aot --config configs/cav_mae_pretrain.py --topology v5e:4x4 \
      --batch_size 256 [--mesh data=-1,fsdp=4]
      compiles the real train step for a TPU topology on this machine (needs libtpu:
      `pip install "jax[tpu]"`) and prints the per-chip memory XLA plans for it.
  python -m avmae_jax.bench data ...
      prepare and input-pipeline throughput (see avmae_jax/data/benchmark.py).

Every model kind works, MAViL included (configs/mavil_pretrain.py, stage=1 or 2). A MAViL
stage-2 step includes the frozen teacher's forward pass; with config.teacher empty a
random teacher of the student's architecture stands in (timings do not depend on the
values), else `bench train` loads config.teacher.

Timings exclude compilation (reported separately as compile_s) and are the median of
--steps runs after one warm-up.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avmae_jax import api
from avmae_jax import config_args
from avmae_jax import models
from avmae_jax import sharding
from avmae_jax import trainer as trainer_lib
from avmae_jax.models import flops as flops_lib
from avmae_jax.models import mavil

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets, keyed by a substring
# of jax's device_kind. MFU is reported against these; null for anything not listed.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str):
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def _loss_fn(module, mode, teacher=None):
  """The loss of one batch; `teacher` (MAViL stage 2) makes the targets inside it, from
  the teacher's parameters (labels holds them there: no gradient flows to them)."""
  if models.kind_of(module) in ("cav_mae", "mavil"):
    def loss(params, audio, frames, labels, key):
      targets = None
      if teacher is not None:
        targets = mavil.compute_teacher_targets(teacher, labels, audio, frames)
      return module.apply({"params": params}, audio, frames,
                          **({"teacher_targets": targets} if targets is not None else {}),
                          rngs={"masking": key})["loss"]
  else:
    def loss(params, audio, frames, labels, key):
      del key
      logits = module.apply({"params": params}, audio, frames, mode)
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
  return loss


def bench_model(args) -> dict:
  config = config_args.load_config(args.config)
  model_config = dict(config.model)
  if args.dtype:
    model_config["dtype"] = args.dtype
  module = models.build(model_config)
  mode = config.get("mode", "multimodal")
  if models.kind_of(module) == "mavil_ft" and mode not in module.modes():
    mode = module.modes()[0]
  b = args.batch_size
  rng = np.random.default_rng(0)
  audio, frames = (jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
                   for s in api.example_inputs(module, b))
  labels = jnp.zeros((b, getattr(module, "num_classes", 1)), jnp.float32)
  params = api.init_params(module, seed=0)
  teacher = None
  if _is_stage2(module):
    # The teacher's forward pass is part of the step; its values do not matter for timing,
    # so a random teacher of the student's architecture stands in (passed as `labels`).
    teacher = module.clone(stage=1)
    labels = api.init_params(teacher, seed=1)
  step = jax.jit(jax.value_and_grad(_loss_fn(module, mode, teacher)))
  key = jax.random.key(0)

  start = time.perf_counter()
  compiled = step.lower(params, audio, frames, labels, key).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  jax.block_until_ready(compiled(params, audio, frames, labels, key))  # warm-up
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, audio, frames, labels, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_sample = flops_lib.train_flops(module, mode)
  device = jax.devices()[0]
  memory = device.memory_stats() or {}
  return {
      "bench": "model", "config": args.config, "kind": models.kind_of(module),
      "dtype": jnp.dtype(module.dtype).name, "batch_size": b, "steps": args.steps,
      "step_ms": round(step_s * 1e3, 2), "compile_s": round(compile_s, 2),
      "samples_per_s": round(b / step_s, 3), "flops_per_sample": per_sample,
      "xla_flops_per_sample": xla_flops / b, "achieved_tflops": per_sample * b / step_s / 1e12,
      "peak_bytes": memory.get("peak_bytes_in_use"), "backend": jax.default_backend(),
      "device_kind": device.device_kind, "devices": jax.device_count(),
  }


def _is_stage2(module) -> bool:
  return models.kind_of(module) == "mavil" and module.stage == 2


def _build_trainer(config, mesh):
  """The trainer of a training config; MAViL stage 2 without config.teacher gets a stand-in
  teacher of the student's architecture (stage 1)."""
  teacher_model = None
  if (config.model.get("kind") == "mavil" and config.model.get("stage") == 2
      and not config.get("teacher")):
    teacher_model = dict(config.model.to_dict(), stage=1)
  return trainer_lib.build_trainer(config, mesh, steps_per_epoch=1000,
                                   teacher_model=teacher_model)


def _teacher_args(trainer, config, abstract: bool = False) -> tuple:
  """The extra train-step argument of MAViL stage 2: the teacher's parameters, loaded
  from config.teacher, or random ones of the student's architecture when it is empty
  (timings do not depend on the values), or (abstract) their shapes and shardings."""
  if trainer.teacher is None:
    return ()
  if abstract:
    return (trainer.teacher_spec(),)
  if config.get("teacher"):
    return (trainer.load_teacher(),)
  return (trainer.init_teacher(seed=1),)


def _training_config(args):
  config = config_args.load_config(args.config)
  config.batch_size = args.batch_size
  if args.dtype:
    config.model.dtype = args.dtype
  if args.mesh:
    config.mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
  if args.remat is not None:
    config.model.remat = args.remat
  return config


def _memory(compiled) -> dict:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  fields = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
            for name in ("argument", "output", "temp", "alias", "generated_code")}
  fields["per_device_bytes"] = (fields["argument"] + fields["output"] + fields["temp"]
                                - fields["alias"])
  return fields


def bench_train(args) -> dict:
  config = _training_config(args)
  mesh = sharding.make_mesh(config.mesh)
  trainer = _build_trainer(config, mesh)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    state = trainer.init()
    teacher = _teacher_args(trainer, config)
    specs = trainer.batch_spec(args.batch_size)
    batch = {k: jax.device_put(rng.standard_normal(v.shape).astype(v.dtype), v.sharding)
             for k, v in specs.items()}
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, *teacher).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch, *teacher)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, *teacher)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_sample = flops_lib.train_flops(trainer.module, config.get("mode", "multimodal"))
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  achieved = per_sample * args.batch_size / step_s
  stats = device.memory_stats() or {}
  result = {
      "bench": "train", "config": args.config, "kind": trainer.kind,
      "dtype": jnp.dtype(trainer.module.dtype).name, "batch_size": args.batch_size,
      "mesh": dict(mesh.shape), "steps": args.steps, "step_ms": round(step_s * 1e3, 2),
      "compile_s": round(compile_s, 2), "samples_per_s": round(args.batch_size / step_s, 3),
      "flops_per_sample": per_sample, "achieved_tflops": achieved / 1e12,
      "mfu": None if peak is None else achieved / (peak * mesh.size),
      "peak_bytes": stats.get("peak_bytes_in_use"), **_memory(compiled),
      "loss": float(metrics["loss"]), "backend": jax.default_backend(),
      "device_kind": device.device_kind, "devices": mesh.size,
  }
  if args.torch:
    result.update(bench_torch_step(trainer.module, args.batch_size, args.steps))
    result["speedup_vs_torch"] = round(result["samples_per_s"] /
                                       result["torch_samples_per_s"], 3)
  return result


def bench_torch_step(module, batch_size: int, steps: int) -> dict:
  """The PyTorch port's pretraining step on the same shapes: forward, backward, Adam.

  Eager float32 on CPU; on a CUDA device, autocast to bfloat16 (the reference trained with
  fp16 autocast, which needs a loss scaler; bf16 does not) for a fair mixed-precision match.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  if models.kind_of(module) != "cav_mae":
    raise SystemExit("--torch compares the pretraining step (model.kind='cav_mae')")
  config = models.model_config(module)
  fields = {k: config[k] for k in (
      "img_size", "audio_length", "num_mel_bins", "patch_size", "in_chans", "embed_dim",
      "modality_specific_depth", "shared_depth", "num_heads", "decoder_embed_dim",
      "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_eps", "norm_pix_loss")}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_port.CAVMAE(**fields).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.95, 0.999),
                               weight_decay=5e-7)
  audio = torch.randn(batch_size, module.audio_length, module.num_mel_bins, device=device)
  frames = torch.randn(batch_size, module.in_chans, module.img_size, module.img_size,
                       device=device)
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

  def step():
    optimizer.zero_grad(set_to_none=True)
    with amp:
      out = model(audio, frames, mask_ratio_a=module.mask_ratio_a,
                  mask_ratio_v=module.mask_ratio_v, mae_loss_weight=module.mae_loss_weight,
                  contrast_loss_weight=module.contrast_loss_weight)
    out["loss"].backward()
    optimizer.step()
    if device == "cuda":
      torch.cuda.synchronize()

  step()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"torch_step_ms": round(step_s * 1e3, 2),
          "torch_samples_per_s": round(batch_size / step_s, 3),
          "torch_mode": "bf16 autocast" if device == "cuda" else "eager fp32",
          "torch_threads": torch.get_num_threads()}


def bench_aot(args) -> dict:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"cannot describe TPU topology {args.topology!r} ({e}); is libtpu "
                     "installed (pip install \"jax[tpu]\")?") from e
  devices = topology.devices
  config = _training_config(args)
  mesh = sharding.make_mesh(config.mesh, devices)
  trainer = _build_trainer(config, mesh)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      trainer.abstract_state, trainer.state_shardings)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = trainer.train_step.lower(abstract_state, trainer.batch_spec(args.batch_size),
                                        *_teacher_args(trainer, config, abstract=True)
                                        ).compile()
  compile_s = time.perf_counter() - start
  n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
  hosts = len({d.process_index for d in devices})
  return {
      "bench": "aot", "config": args.config, "kind": trainer.kind, "topology": args.topology,
      "devices": len(devices), "hosts": hosts, "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape), "batch_size": args.batch_size,
      "dtype": jnp.dtype(trainer.module.dtype).name, "params": int(n_params),
      "compile_s": round(compile_s, 2), **_memory(compiled),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m avmae_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  model = sub.add_parser("model", help="compiled forward+backward of the model alone")
  model.add_argument("--config", required=True, help="configs/FILE.py[:args]")
  model.add_argument("--batch_size", type=int, default=2)
  model.add_argument("--steps", type=int, default=5)
  model.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="compute dtype (default: the config's)")
  for name, text in (("train", "the real sharded train step over all devices"),
                     ("aot", "ahead-of-time compile of the train step for a TPU topology")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=True, help="configs/FILE.py[:args]")
    p.add_argument("--batch_size", type=int, required=True, help="global batch")
    p.add_argument("--mesh", default=None, help="e.g. data=-1,fsdp=4 (default: the config's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--remat", type=lambda v: v.lower() in ("1", "true"), default=None)
    if name == "train":
      p.add_argument("--steps", type=int, default=5)
      p.add_argument("--torch", action="store_true",
                     help="also time the PyTorch port's step and report the ratio")
    else:
      p.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5e:8x8, v5p:2x2x2")
  sub.add_parser("data", help="prepare and input-pipeline throughput", add_help=False)
  args, rest = parser.parse_known_args(argv)
  if args.command == "data":
    from avmae_jax.data import benchmark  # pylint: disable=import-outside-toplevel
    return benchmark.main(rest)
  if rest:
    parser.error(f"unrecognised arguments: {' '.join(rest)}")
  if args.batch_size < 1 or getattr(args, "steps", 1) < 1:
    parser.error("--batch_size and --steps must be positive")
  if args.command == "aot":
    result = bench_aot(args)
    print(f"{result['kind']} {result['dtype']} on {result['topology']} ({result['devices']} "
          f"chips, {result['hosts']} hosts), mesh {result['mesh']}, global batch "
          f"{result['batch_size']}: {result.get('per_device_bytes', 0) / 2**30:.2f} GiB per chip "
          f"(compile {result['compile_s']:.1f} s)")
  else:
    result = bench_model(args) if args.command == "model" else bench_train(args)
    mfu = result.get("mfu")
    print(f"{result['kind']} {result['dtype']} batch {result['batch_size']} on "
          f"{result['backend']} ({result['device_kind']}): {result['step_ms']:.1f} ms/step, "
          f"{result['samples_per_s']:.2f} samples/s, {result['achieved_tflops']:.3f} TFLOP/s"
          + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
          + f" (compile {result['compile_s']:.1f} s)")
    if "torch_step_ms" in result:
      print(f"PyTorch port ({result['torch_mode']}): {result['torch_step_ms']:.1f} ms/step, "
            f"{result['torch_samples_per_s']:.2f} samples/s; JAX / PyTorch = "
            f"{result['speedup_vs_torch']:.2f}x")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
