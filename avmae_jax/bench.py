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
  python -m avmae_jax.bench device [--size base]
      the accelerator check (one H100/H200 in under 8 minutes): base CAV-MAE and MAViL
      stage-1 pretraining in bf16 at the largest batch that fits (samples/s, MFU, peak
      memory, compile s) and the PyTorch port's CAV-MAE step on the same device in bf16
      autocast and in fp16 autocast with a GradScaler (the authors' setting), with ratios.
  python -m avmae_jax.bench data ...
      prepare and input-pipeline throughput (see avmae_jax/data/benchmark.py).
  python -m avmae_jax.bench embed --config configs/cav_mae_pretrain.py [--num_clips 16]
      `embed` on generated clips (10 s, 640x360 H.264 + AAC by default) by the config's
      model (random parameters unless --checkpoint): clips/s of the whole path (decode,
      filterbank, frames, transforms, forward pass) and the share of it spent decoding.
  python -m avmae_jax.bench retrieval --num 100000 --dim 768 [--chunk 4096] [--k 10]
      retrieval at scale (evaluators/search.py) over --num random unit vectors per
      modality: both directions' top-k and true-pair ranks, so the figures of
      metrics.retrieval_metrics; seconds (compile and one query chunk as warmup_s) and
      the process's peak resident memory.

Every model kind works, MAViL included (configs/mavil_pretrain.py, stage=1 or 2). A MAViL
stage-2 step includes the frozen teacher's forward pass; with config.teacher empty a
random teacher of the student's architecture stands in (timings do not depend on the
values), else `bench train` loads config.teacher.

--scan_layers, --remat_policy, --attention and --dtype override the config's model fields.
Timings exclude compilation (reported separately as compile_s) and are the median of
--steps runs after one warm-up.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from avmae_jax import config_args
from avmae_jax import models
from avmae_jax import tasks
from avmae_jax.models import flops as flops_lib
from avmae_jax.models import layers
from avmae_jax.parallel import mesh as mesh_lib
from avmae_jax.training import steps

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


def _task(config, module):
  """The task of a training config; self-training without config.teacher gets a stand-in
  teacher of the student's architecture."""
  return tasks.for_config(config, module, stand_in_teacher=True)


def _random_batch(module, keys, batch_size: int, dtype=np.float32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  audio, frames = models.example_inputs(module, batch_size)
  shapes = {"audio": audio.shape, "frames": frames.shape,
            "labels": (batch_size, getattr(module, "num_classes", 1))}
  return {k: (rng.standard_normal(shapes[k]) if k != "labels" else np.zeros(shapes[k])
              ).astype(dtype) for k in keys}


def _aux(trainer_or_task, config, shardings):
  """The task's frozen inputs (a teacher): config.teacher's when given, else random ones
  (timings do not depend on the values)."""
  task = getattr(trainer_or_task, "task", trainer_or_task)
  if config.get("teacher"):
    return task.load_aux(shardings)
  return task.random_aux(shardings, seed=1)


def bench_model(args) -> dict:
  config = _training_config(args)
  module = models.build(config.model)
  task = _task(config, module)
  b = args.batch_size
  batch = {k: jnp.asarray(v) for k, v in _random_batch(module, task.train_keys, b).items()}
  params = models.init_params(module, seed=0)
  aux = _aux(task, config, None)
  step = jax.jit(jax.value_and_grad(lambda p, x, key, a: task.loss(p, x, key, a)[0]))
  key = jax.random.key(0)

  start = time.perf_counter()
  compiled = step.lower(params, batch, key, aux).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  jax.block_until_ready(compiled(params, batch, key, aux))  # warm-up
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, batch, jax.random.fold_in(key, i), aux))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_sample = flops_lib.train_flops(module, config.get("mode", "multimodal"))
  device = jax.devices()[0]
  memory = device.memory_stats() or {}
  return {
      "bench": "model", "config": args.config, "kind": module.kind,
      "dtype": jnp.dtype(module.dtype).name, "batch_size": b, "steps": args.steps,
      "step_ms": round(step_s * 1e3, 2), "compile_s": round(compile_s, 2),
      "samples_per_s": round(b / step_s, 3), "flops_per_sample": per_sample,
      "xla_flops_per_sample": xla_flops / b, "achieved_tflops": per_sample * b / step_s / 1e12,
      "peak_bytes": memory.get("peak_bytes_in_use"), "backend": jax.default_backend(),
      "device_kind": device.device_kind, "devices": jax.device_count(),
  }


def _build_trainer(config, mesh):
  return steps.from_config(config, mesh, steps_per_epoch=1000, stand_in_teacher=True)


def _training_config(args):
  config = config_args.load_config(args.config)
  config.batch_size = args.batch_size
  if args.dtype:
    config.model.dtype = args.dtype
  if getattr(args, "mesh", None):
    config.mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
  _override_compute_fields(config, args)
  return config


def _override_compute_fields(config, args) -> None:
  with config.ignore_type():  # scan_layers may be "auto" in the config, a bool here
    for field in ("remat_policy", "scan_layers", "attention"):
      if getattr(args, field, None) is not None:
        config.model[field] = getattr(args, field)


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
  mesh = mesh_lib.make_mesh(config.mesh)
  result = _time_train_step(config, mesh, args.batch_size, args.steps)
  result["config"] = args.config
  if args.torch:
    module = models.build(config.model)
    if type(_task(config, module)) is not tasks.Pretraining:  # pylint: disable=unidiomatic-typecheck
      raise SystemExit("--torch compares pretraining steps (a model trained on its own "
                       "losses: CAV-MAE, MAViL stage 1)")
    precision = "bf16" if jax.default_backend() != "cpu" else "fp32"
    result.update(_prefixed("torch_", bench_torch_step(module, args.batch_size, args.steps,
                                                       precision)))
    result["speedup_vs_torch"] = round(result["samples_per_s"] /
                                       result["torch_samples_per_s"], 3)
  return result


def _time_train_step(config, mesh, batch_size: int, steps_to_time: int) -> dict:
  """Compiles and times the real train step of `config` on `mesh` at `batch_size`."""
  trainer = _build_trainer(config, mesh)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    state = trainer.init()
    aux = _aux(trainer, config, trainer.aux_shardings)
    specs = trainer.batch_spec(batch_size)
    batch = {k: jax.device_put(rng.standard_normal(v.shape).astype(v.dtype), v.sharding)
             for k, v in specs.items()}
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, aux).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch, aux)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps_to_time):
      start = time.perf_counter()
      state, metrics = compiled(state, batch, aux)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  per_sample = flops_lib.train_flops(trainer.module, config.get("mode", "multimodal"))
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind)
  achieved = per_sample * batch_size / step_s
  stats = device.memory_stats() or {}
  del state
  return {
      "bench": "train", "kind": trainer.module.kind,
      "dtype": jnp.dtype(trainer.module.dtype).name, "batch_size": batch_size,
      "scan_layers": trainer.module.scan_layers, "remat_policy": trainer.module.remat_policy,
      "attention": trainer.module.attention,
      "mesh": dict(mesh.shape), "steps": steps_to_time, "step_ms": round(step_s * 1e3, 2),
      "compile_s": round(compile_s, 2), "samples_per_s": round(batch_size / step_s, 3),
      "flops_per_sample": per_sample, "achieved_tflops": achieved / 1e12,
      "mfu": None if peak is None else achieved / (peak * mesh.size),
      "peak_bytes": stats.get("peak_bytes_in_use"), **_memory(compiled),
      "loss": float(metrics["loss"]), "backend": jax.default_backend(),
      "device_kind": device.device_kind, "devices": mesh.size,
  }


def _as_on_an_accelerator(config) -> None:
  """Resolves the config's "auto" compute fields as a TPU or GPU would."""
  if config.model.get("dtype") == "auto":
    config.model.dtype = "bfloat16"
  if config.model.get("scan_layers") == "auto":
    with config.ignore_type():
      config.model.scan_layers = True


def _prefixed(prefix: str, record: dict) -> dict:
  return {prefix + k: v for k, v in record.items()}


TORCH_PRECISIONS = {
    "fp32": "eager float32",
    "bf16": "bfloat16 autocast",
    "fp16": "float16 autocast with a GradScaler (the authors' setting)",
}


def bench_torch_step(module, batch_size: int, steps: int, precision: str = "fp32") -> dict:
  """The PyTorch port's pretraining step on the same shapes: forward, backward, Adam, on
  CUDA when there is one; `precision` one of TORCH_PRECISIONS."""
  import torch  # pylint: disable=import-outside-toplevel
  from avmae_jax import torch_port  # pylint: disable=import-outside-toplevel
  if precision not in TORCH_PRECISIONS:
    raise ValueError(f"precision must be one of {sorted(TORCH_PRECISIONS)}, got {precision!r}")
  config = models.model_config(module)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_port.build(config).to(device)
  loss_settings = torch_port.call_args(model.forward, config)
  optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.95, 0.999),
                               weight_decay=5e-7)
  audio, frames = (torch.randn(*s.shape, device=device)
                   for s in models.example_inputs(module, batch_size))
  frames = torch.movedim(frames, -1, 1)  # channels first: [B, C, H, W] or [B, C, N, H, W]
  half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
  amp = torch.autocast(device, dtype=half or torch.float32, enabled=half is not None)
  scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

  def step():
    optimizer.zero_grad(set_to_none=True)
    with amp:
      out = model(audio, frames, **loss_settings)
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    if device == "cuda":
      torch.cuda.synchronize()
    return out["loss"]

  step()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
  del model, optimizer
  if device == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  return {"step_ms": round(step_s * 1e3, 2), "samples_per_s": round(batch_size / step_s, 3),
          "mode": TORCH_PRECISIONS[precision], "device": device, "batch_size": batch_size,
          "loss": float(loss), "peak_bytes": memory, "threads": torch.get_num_threads()}


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemory"))


def _largest_batch(run, batch_sizes) -> tuple[dict, list[int]]:
  """run(batch) at the largest of `batch_sizes` that fits (tried from the largest down);
  returns (its result, the sizes that ran out of memory)."""
  too_big = []
  for b in sorted(batch_sizes, reverse=True):
    try:
      return run(b), too_big
    except Exception as e:  # pylint: disable=broad-except
      if not _out_of_memory(e):
        raise
      too_big.append(b)
  raise SystemExit(f"out of memory at every batch size in {sorted(batch_sizes)}")


def bench_device(args) -> dict:
  """The accelerator check: base CAV-MAE and MAViL stage-1 pretraining in bfloat16 at the
  largest batch that fits (one device), and the PyTorch port's CAV-MAE step on the same
  device in bf16 autocast and in fp16 autocast with a GradScaler, with the ratios."""
  import gc  # pylint: disable=import-outside-toplevel
  start_all = time.perf_counter()
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  result = {"bench": "device", "size": args.size, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind}
  modules = {}
  specs = {"cav_mae": f"configs/cav_mae_pretrain.py:size={args.size}",
           "mavil": f"configs/mavil_pretrain.py:size={args.size}"}
  for name in args.models:
    spec = specs[name]
    config = config_args.load_config(spec)
    config.model.dtype = "bfloat16"
    _as_on_an_accelerator(config)  # on CPU (the smoke test) too: the programs the check runs
    _override_compute_fields(config, args)

    def run(batch, config=config):
      config.batch_size = batch
      gc.collect()
      return _time_train_step(config, mesh, batch, args.steps)

    record, too_big = _largest_batch(run, args.batch_sizes)
    record = {k: record[k] for k in (
        "batch_size", "dtype", "scan_layers", "remat_policy", "attention", "step_ms",
        "samples_per_s", "mfu", "achieved_tflops", "compile_s", "peak_bytes",
        "per_device_bytes", "loss") if k in record}
    record["out_of_memory_at"] = too_big
    result[name] = record
    modules[name] = models.build(config.model)
  jax.clear_caches()
  gc.collect()
  jax_rate = result["cav_mae"]["samples_per_s"]
  for precision in ("bf16", "fp16"):
    run = lambda b, p=precision: bench_torch_step(modules["cav_mae"], b, args.steps, p)
    batches = [b for b in args.batch_sizes if b <= result["cav_mae"]["batch_size"]]
    record, too_big = _largest_batch(run, batches)
    record["out_of_memory_at"] = too_big
    result[f"torch_cav_mae_{precision}"] = record
    result[f"speedup_vs_torch_{precision}"] = round(jax_rate / record["samples_per_s"], 3)
  result["total_s"] = round(time.perf_counter() - start_all, 1)
  return result


def bench_aot(args) -> dict:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(f"cannot describe TPU topology {args.topology!r} ({e}); is libtpu "
                     "installed (pip install \"jax[tpu]\")?") from e
  devices = topology.devices
  config = _training_config(args)
  _as_on_an_accelerator(config)  # the target is a TPU, not this machine
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer = _build_trainer(config, mesh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = trainer.train_step.lower(trainer.state_spec(),
                                        trainer.batch_spec(args.batch_size),
                                        trainer.aux_spec()).compile()
  compile_s = time.perf_counter() - start
  n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
  hosts = len({d.process_index for d in devices})
  return {
      "bench": "aot", "config": args.config, "kind": trainer.module.kind,
      "topology": args.topology,
      "devices": len(devices), "hosts": hosts, "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape), "batch_size": args.batch_size,
      "dtype": jnp.dtype(trainer.module.dtype).name, "params": int(n_params),
      "compile_s": round(compile_s, 2), **_memory(compiled),
  }


def _unit_vectors(rng, num: int, dim: int, block: int = 8192) -> np.ndarray:
  """[num, dim] float32 random unit vectors, drawn `block` rows at a time so that drawing
  them needs little more memory than they take."""
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, block):
    x = rng.standard_normal((min(block, num - start), dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out[start:start + len(x)] = x
  return out


def _peak_rss_gib() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_retrieval(args) -> dict:
  """Both directions of `search.top_k` with true-pair ranks over random unit vectors: the
  work of `metrics.retrieval_metrics` (k=1 there) at --num clips, timed after a warm-up."""
  from avmae_jax.evaluators import search  # pylint: disable=import-outside-toplevel
  rss_before = _peak_rss_gib()
  rng = np.random.default_rng(args.seed)
  audio = _unit_vectors(rng, args.num, args.dim)
  video = _unit_vectors(rng, args.num, args.dim)
  pairs = np.arange(args.num)
  # Warm-up: the same program as the run (one query chunk's shape, all the candidates), so
  # the timed run compiles nothing; it also searches that one chunk.
  warm = min(args.chunk, args.num)
  start = time.perf_counter()
  search.top_k(audio[:warm], video, args.k, true_index=pairs[:warm], chunk=args.chunk)
  warmup_s = time.perf_counter() - start
  result = {"bench": "retrieval", "num": args.num, "dim": args.dim, "chunk": args.chunk,
            "k": args.k, "seed": args.seed, "warmup_s": round(warmup_s, 3)}
  seconds = 0.0
  for name, queries, candidates in (("a2v", audio, video), ("v2a", video, audio)):
    start = time.perf_counter()
    found = search.top_k(queries, candidates, args.k, true_index=pairs, chunk=args.chunk)
    elapsed = time.perf_counter() - start
    seconds += elapsed
    result[f"{name}_s"] = round(elapsed, 3)
    result.update(search.figures(name, found.ranks))
    # the ranks and the top-k lists agree: nothing scores above a true match listed first
    if np.any(found.ranks[found.indices[:, 0] == pairs] != 0):
      raise SystemExit(f"{name}: a true match listed first has a rank above 0")
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  result.update({
      "seconds": round(seconds, 3),
      "queries_per_s": round(2 * args.num / seconds, 1),
      "embeddings_gib": round(audio.nbytes * 2 / 2**30, 3),
      "rss_before_gib": round(rss_before, 3),
      "peak_rss_gib": round(_peak_rss_gib(), 3),
      "device_peak_bytes": stats.get("peak_bytes_in_use"),
      "backend": jax.default_backend(), "device_kind": device.device_kind,
  })
  return result


def bench_embed(args) -> dict:
  """`embed` on generated clips: clips/s of the whole path, and the share spent decoding."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from avmae_jax import api  # pylint: disable=import-outside-toplevel
  from avmae_jax import embed as embed_lib  # pylint: disable=import-outside-toplevel
  from avmae_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  config = config_args.load_config(args.config)
  _override_compute_fields(config, args)
  if args.checkpoint:
    model = api.load(args.checkpoint)
  else:  # timings do not depend on the values
    module = models.build(config.model)
    model = api.LoadedModel(module, models.init_params(module))
  data = embed_lib.data_config(model, config if "eval_data" in config else None)
  stored_frames = embed_lib.stored_frames(data.mode)
  with tempfile.TemporaryDirectory() as tmp:
    files = []
    for i in range(args.num_clips + 1):
      path = os.path.join(tmp, f"clip{i:03d}.mp4")
      synthetic.write_video(path, synthetic.draw_scene(0, "test", i, seconds=args.seconds),
                            width=args.width, height=args.height)
      files.append(path)
    warm, files = files[:1], files[1:]
    start = time.perf_counter()  # compiles the forward pass and the transforms
    list(embed_lib.embed_files(model, data, warm * args.batch_size, batch_size=args.batch_size))
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for path in files:
      embed_lib.decode(path, stored_frames, data.target_length)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    rounds = list(embed_lib.embed_files(model, data, files, batch_size=args.batch_size))
    total_s = time.perf_counter() - start
  failed = [item for _, round_failed in rounds for item in round_failed]
  if failed:
    raise SystemExit(f"generated clips failed to embed: {failed}")
  return {"bench": "embed", "config": args.config, "kind": model.kind,
          "num_clips": args.num_clips, "seconds_per_clip": args.seconds,
          "size": f"{args.width}x{args.height}", "batch_size": args.batch_size,
          "clips_per_s": round(args.num_clips / total_s, 3), "total_s": round(total_s, 2),
          "decode_s": round(decode_s, 2), "decode_share": round(decode_s / total_s, 3),
          "warmup_s": round(warmup_s, 2), "backend": jax.default_backend()}


def _compute_flags(parser) -> None:
  """Overrides of how the model computes (models/layers.py); default: the config's."""
  parser.add_argument("--remat_policy", choices=layers.REMAT_POLICIES, default=None)
  parser.add_argument("--scan_layers", type=_boolean, default=None)
  parser.add_argument("--attention", choices=layers.ATTENTION_IMPLS, default=None)


def _boolean(value: str) -> bool:
  if value.lower() not in ("1", "0", "true", "false"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
  return value.lower() in ("1", "true")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m avmae_jax.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  model = sub.add_parser("model", help="compiled forward+backward of the model alone")
  model.add_argument("--config", required=True, help="configs/FILE.py[:args]")
  model.add_argument("--batch_size", type=int, default=2)
  model.add_argument("--steps", type=int, default=5)
  model.add_argument("--dtype", choices=models.DTYPES, default=None,
                     help="compute dtype (default: the config's)")
  _compute_flags(model)
  for name, text in (("train", "the real sharded train step over all devices"),
                     ("aot", "ahead-of-time compile of the train step for a TPU topology")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=True, help="configs/FILE.py[:args]")
    p.add_argument("--batch_size", type=int, required=True, help="global batch")
    p.add_argument("--mesh", default=None, help="e.g. data=-1,fsdp=4 (default: the config's)")
    p.add_argument("--dtype", choices=models.DTYPES, default=None)
    _compute_flags(p)
    if name == "train":
      p.add_argument("--steps", type=int, default=5)
      p.add_argument("--torch", action="store_true",
                     help="also time the PyTorch port's step and report the ratio")
    else:
      p.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5e:8x8, v5p:2x2x2")
  device = sub.add_parser(
      "device", help="the accelerator check: CAV-MAE and MAViL bf16 at the largest batch "
      "that fits, MFU, memory, and the PyTorch port's step (bf16, fp16) on the same device")
  device.add_argument("--size", default="base", choices=sorted(models.MODEL_CLASSES[
      "cav_mae"].sizes), help="model size of both (tiny: a smoke test on CPU)")
  device.add_argument("--batch_sizes", default="1024,768,512,384,256,128,64,32",
                      type=lambda v: [int(b) for b in v.split(",")],
                      help="batch sizes to try, largest first; the largest that fits is timed")
  device.add_argument("--steps", type=int, default=10)
  device.add_argument("--models", default="cav_mae,mavil", type=lambda v: v.split(","),
                      help="which of cav_mae,mavil to time (the PyTorch port runs CAV-MAE)")
  _compute_flags(device)
  retrieval = sub.add_parser(
      "retrieval", help="chunked top-k retrieval and ranks over random unit vectors: seconds "
      "and peak resident memory")
  retrieval.add_argument("--num", type=int, required=True, help="clips (vectors per modality)")
  retrieval.add_argument("--dim", type=int, required=True, help="vector size")
  retrieval.add_argument("--chunk", type=int, default=4096,
                         help="rows of queries and of candidates per block")
  retrieval.add_argument("--k", type=int, default=10, help="nearest candidates kept per query")
  retrieval.add_argument("--seed", type=int, default=0)
  embed = sub.add_parser("embed", help="files in, embeddings out: clips/s and the decoding "
                         "share on generated clips")
  embed.add_argument("--config", required=True, help="configs/FILE.py[:args] (its model)")
  embed.add_argument("--checkpoint", default="", help="a model to load instead of random "
                     "parameters of the config's model (timings do not depend on them)")
  embed.add_argument("--num_clips", type=int, default=16)
  embed.add_argument("--seconds", type=float, default=10.0)
  embed.add_argument("--width", type=int, default=640)
  embed.add_argument("--height", type=int, default=360)
  embed.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
  _compute_flags(embed)
  sub.add_parser("data", help="prepare and input-pipeline throughput", add_help=False)
  args, rest = parser.parse_known_args(argv)
  if args.command == "data":
    from avmae_jax.data import benchmark  # pylint: disable=import-outside-toplevel
    return benchmark.main(rest)
  if rest:
    parser.error(f"unrecognised arguments: {' '.join(rest)}")
  if (min(getattr(args, "batch_sizes", None) or [getattr(args, "batch_size", 1)]) < 1
      or getattr(args, "steps", 1) < 1):
    parser.error("batch sizes and --steps must be positive")
  if args.command == "embed":
    for name in ("num_clips", "width", "height", "batch_size"):
      if getattr(args, name) < 1:
        parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    result = bench_embed(args)
    print(f"embed of {result['num_clips']} clips of {result['seconds_per_clip']:g} s "
          f"({result['size']}) by {result['kind']} on {result['backend']}: "
          f"{result['clips_per_s']:.2f} clips/s ({result['total_s']:.1f} s), decoding "
          f"{100 * result['decode_share']:.0f}% of it ({result['decode_s']:.1f} s); warm-up "
          f"{result['warmup_s']:.1f} s")
  elif args.command == "retrieval":
    for name in ("num", "dim", "chunk", "k"):
      if getattr(args, name) < 1:
        parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.k > args.num:
      parser.error(f"--k {args.k} is more than --num {args.num} candidates")
    result = bench_retrieval(args)
    print(f"retrieval of {result['num']} x {result['dim']} (chunk {result['chunk']}, top "
          f"{result['k']}) on {result['backend']}: {result['seconds']:.2f} s both directions "
          f"(a2v {result['a2v_s']:.2f} s, v2a {result['v2a_s']:.2f} s; warm-up "
          f"{result['warmup_s']:.2f} s), peak resident memory {result['peak_rss_gib']:.2f} GiB "
          f"(embeddings {result['embeddings_gib']:.2f} GiB); a2v R@1 {result['a2v_r1']:.3f}%, "
          f"median rank {result['a2v_median_rank']:.1f}")
  elif args.command == "device":
    if "cav_mae" not in args.models or set(args.models) - {"cav_mae", "mavil"}:
      parser.error("--models: cav_mae (which the PyTorch port is compared with), optionally "
                   "mavil")
    result = bench_device(args)
    for name in args.models:
      r = result[name]
      mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}%"
      print(f"{name} {r['dtype']} batch {r['batch_size']}: {r['samples_per_s']:.1f} "
            f"samples/s{mfu}, compile {r['compile_s']:.1f} s")
    for precision in ("bf16", "fp16"):
      r = result[f"torch_cav_mae_{precision}"]
      print(f"PyTorch port CAV-MAE ({r['mode']}) batch {r['batch_size']}: "
            f"{r['samples_per_s']:.1f} samples/s; JAX / PyTorch = "
            f"{result[f'speedup_vs_torch_{precision}']:.2f}x")
  elif args.command == "aot":
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
