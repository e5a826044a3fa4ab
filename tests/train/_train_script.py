"""Trains a small model with a checkpoint after every step (helper of test_checkpoint).

Used as a subprocess that the test kills with SIGKILL mid-run, then runs again with
``--resume``; and imported by the test for the same setup in-process.

    python tests/train/_train_script.py --dir CKPT --steps 30 [--resume] [--out FINAL.npz]
        [--reference REF.npz] [--cache JAX_CACHE_DIR]

Prints ``saved K`` after starting the save of step K (flushed), ``resumed K`` when it
continues from checkpoint K. ``--out`` writes the final state's leaves as raw bytes, the data position
(``data_step``) and the blocks of the steps this process ran; ``--reference`` then
also trains the same number of steps from scratch, without checkpoints, in the same
process (same compiled step) and writes the same record (blocks of the same steps).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

N_LAYERS = 2
BATCH, SEQ = 4, 16
LR = 1e-3


def build(precision: str = "bf16-sr", seed: int = 0) -> tuple[Any, Any, Any]:
  """``(step, initial-state factory, batches factory)`` of the test model (2 layers).

  The optimizer is ``optax.inject_hyperparams(absignsgd)`` (its hyperparameter state
  is checkpointed too) with weight decay; the precision policy decides the weights'
  dtype and rounding.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import absign_jax
  from absign_jax import BlockTrainStep, split_nnx
  from tests.models import Batches, Config, TinyLM

  pol = absign_jax.policy(precision)
  # bfloat16 and float32 models compute in their dtype; float16 weights in float32.
  dtype = jnp.bfloat16 if pol.param_dtype == jnp.bfloat16 else jnp.float32
  cfg = Config(n_layers=N_LAYERS, dtype=dtype)
  parts = split_nnx(TinyLM(cfg, rngs=nnx.Rngs(seed)))
  tx = optax.inject_hyperparams(absign_jax.absignsgd, static_args=("depth_bias",))(
      learning_rate=LR, weight_decay=0.1)
  # One program for both layers (compiles fastest: the subprocess test is timed).
  step = BlockTrainStep(parts.loss_fn, tx, dispatch="switch", seed=seed,
                        **pol.step_options())

  def make_state():
    return step.init(pol.cast_params(split_nnx(TinyLM(cfg, rngs=nnx.Rngs(seed))).params))

  del jax
  return step, make_state, lambda: Batches(cfg.vocab, BATCH, SEQ, seed=seed)


def leaf_bytes(state) -> dict[str, np.ndarray]:
  """Every leaf of ``state`` as raw bytes (exact comparison, any dtype)."""
  import jax
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {f"{i:04d}{jax.tree_util.keystr(p)}": np.frombuffer(
      np.ascontiguousarray(np.asarray(x)).tobytes(), np.uint8) for i, (p, x) in
          enumerate(flat)}


def train(step, state, batches, start: int, stop: int, ckpt=None, log=None):
  """Steps ``start+1 .. stop``; saves each (async) when ``ckpt`` is given."""
  from absign_jax import active_block
  blocks = []
  for k in range(start, stop):
    blocks.append(int(active_block(state.opt_state)))
    state, _ = step(state, next(batches))
    if ckpt is not None:
      ckpt.save(k + 1, state, {"batches": batches.state()})
      if log:
        print(f"saved {k + 1}", flush=True)
  return state, blocks


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", required=True)
  ap.add_argument("--steps", type=int, required=True)
  ap.add_argument("--resume", action="store_true")
  ap.add_argument("--out")
  ap.add_argument("--reference")
  ap.add_argument("--cache")
  args = ap.parse_args(argv)

  import jax
  if args.cache:
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # The repository root: the package and tests.models.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  from absign_jax import Checkpointer

  step, make_state, make_batches = build()
  state, batches = make_state(), make_batches()
  start = 0
  with Checkpointer(args.dir, max_to_keep=2) as ckpt:
    if args.resume:
      restored = ckpt.restore_latest(state)
      if restored is not None:
        state, start = restored.state, restored.step
        batches.restore(restored.data_state["batches"])
        print(f"resumed {start}", flush=True)
    print("started", flush=True)
    state, blocks = train(step, state, batches, start, args.steps, ckpt, log=True)
  if args.out:
    np.savez(args.out, data_step=np.asarray(batches.step), blocks=np.asarray(blocks),
             **leaf_bytes(state))
  if args.reference:
    ref_batches = make_batches()
    ref, ref_blocks = train(step, make_state(), ref_batches, 0, args.steps)
    np.savez(args.reference, data_step=np.asarray(ref_batches.step),
             blocks=np.asarray(ref_blocks[start:]), **leaf_bytes(ref))
  print("done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
