"""Page faults and kernel time per training step under each allocator of
:mod:`absign_jax.allocator`.

    python benchmarks/allocator_faults.py                                # mimalloc (auto)
    ABSIGN_JAX_ALLOCATOR=glibc python benchmarks/allocator_faults.py     # glibc, kept
    ABSIGN_JAX_ALLOCATOR=system python benchmarks/allocator_faults.py    # glibc's own

SmolLM2-135M's shapes (random weights), float32, batch 4 x 128, stacked layout: two
warm-up steps, then the minor page faults, kernel and user CPU seconds and wall
seconds per step over ``--steps`` steps, for AdamW and absignsgd, each in its own
process run of this script (``--method``).
"""

import absign_jax  # first: the allocator settings must precede JAX's threads

import argparse
import json
import resource
import time

import jax
import numpy as np
import optax
from flax import nnx

from absign_jax.llm import model as model_lib


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--method", default="adamw", choices=["adamw", "absignsgd"])
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args(argv)
  cfg = model_lib.LlamaConfig.preset("smollm2-135m")
  parts = absign_jax.split_nnx(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  if args.method == "adamw":
    step = absign_jax.FullTrainStep(parts.loss_fn, optax.adamw(1e-4))
  else:
    step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(1e-3),
                                     layered=parts.layered)
  state = step.init(parts.params, copy_inputs=False)
  x = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 129)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": np.ones((4, 128), np.float32)}
  for _ in range(2):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
  r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  n = args.steps
  result = {"method": args.method, "allocator": absign_jax.allocator.status()._asdict(),
            "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
            "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / n,
            "user_s_per_step": (r1.ru_utime - r0.ru_utime) / n,
            "wall_s_per_step": (t1 - t0) / n, "max_rss_mb": r1.ru_maxrss / 1024}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  absign_jax.allocator.configure_process()
  main()
