"""Stand-in main job until the training script lands: tiny CAV-MAE on random inputs.

Builds the tiny pretraining model, takes a few Adam steps on one fixed random batch and
prints the losses, so a fresh install can see the whole model, masking and both losses
run forward and backward. `python -m avmae_jax.demo [--steps N] [--batch_size B]`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avmae_jax import api
from avmae_jax import models


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  module = models.build(dict(kind="cav_mae", **models.size_fields("tiny")))
  params = api.init_params(module, args.seed)
  rng = np.random.default_rng(args.seed)
  audio = jnp.asarray(rng.standard_normal((args.batch_size, 1024, 128)), jnp.float32)
  frames = jnp.asarray(rng.standard_normal((args.batch_size, 224, 224, 3)), jnp.float32)
  optimizer = optax.adam(1e-3, b1=0.95, b2=0.999)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      out = module.apply({"params": p}, audio, frames, rngs={"masking": key})
      return out["loss"], out
    grads, out = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, out

  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"tiny CAV-MAE, {n_params:,} parameters, batch {args.batch_size}, "
        f"backend {jax.default_backend()}")
  key = jax.random.key(args.seed)
  start = time.perf_counter()
  for i in range(args.steps):
    params, opt_state, out = step(params, opt_state, jax.random.fold_in(key, i))
    print(f"step {i + 1:3d}  loss {float(out['loss']):.4f}  mae_a {float(out['loss_mae_a']):.4f}"
          f"  mae_v {float(out['loss_mae_v']):.4f}  nce {float(out['nce']):.4f}"
          f"  c_acc {float(out['c_acc']):.3f}")
  print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
