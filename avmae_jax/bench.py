r"""Benchmarks that print measured figures; the last line of each is one JSON object.

  python -m avmae_jax.bench model --config configs/cav_mae_pretrain.py:size=base --batch_size 2
      compiled forward+backward of the model alone (random inputs, no optimizer, no input
      pipeline): step_ms, samples_per_s, analytic flops_per_sample, achieved TFLOP/s.
  python -m avmae_jax.bench data ...
      prepare and input-pipeline throughput (see avmae_jax/data/benchmark.py).

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
from avmae_jax.models import flops as flops_lib


def _loss_fn(module, mode):
  if models.kind_of(module) == "cav_mae":
    def loss(params, audio, frames, labels, key):
      del labels
      return module.apply({"params": params}, audio, frames, rngs={"masking": key})["loss"]
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
  b = args.batch_size
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.standard_normal((b, module.audio_length, module.num_mel_bins)),
                      jnp.float32)
  frames = jnp.asarray(rng.standard_normal((b, module.img_size, module.img_size,
                                            module.in_chans)), jnp.float32)
  labels = jnp.zeros((b, getattr(module, "num_classes", 1)), jnp.float32)
  params = api.init_params(module, seed=0)
  step = jax.jit(jax.value_and_grad(_loss_fn(module, mode)))
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
  sub.add_parser("data", help="prepare and input-pipeline throughput", add_help=False)
  args, rest = parser.parse_known_args(argv)
  if args.command == "data":
    from avmae_jax.data import benchmark  # pylint: disable=import-outside-toplevel
    return benchmark.main(rest)
  if rest:
    parser.error(f"unrecognised arguments: {' '.join(rest)}")
  if args.batch_size < 1 or args.steps < 1:
    parser.error("--batch_size and --steps must be positive")
  result = bench_model(args)
  print(f"{result['kind']} {result['dtype']} batch {result['batch_size']} on "
        f"{result['backend']} ({result['device_kind']}): {result['step_ms']:.1f} ms/step, "
        f"{result['samples_per_s']:.2f} samples/s, {result['achieved_tflops']:.3f} TFLOP/s "
        f"(compile {result['compile_s']:.1f} s)")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
