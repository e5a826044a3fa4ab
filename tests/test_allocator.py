"""``import absign_jax`` keeps XLA:CPU's freed temporaries mapped (glibc only).

Each probe runs in a fresh interpreter: the settings only take full effect before
JAX starts its threads, so they cannot be switched inside the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import absign_jax

pytestmark = pytest.mark.skipif(not absign_jax.allocator.status().applied,
                                reason="glibc malloc settings are not in force here")

# An AdamW step whose logits (4 x 128 x 32768 float32, 64 MiB) and their gradient are
# temporaries above glibc's largest mmap threshold.
PROBE = textwrap.dedent("""
    import resource
    import absign_jax  # first: before JAX starts its threads
    import numpy as np, optax
    from flax import nnx
    from absign_jax.llm import model as M
    cfg = M.LlamaConfig.preset("tiny").replace(vocab_size=32768, n_layers=2)
    parts = absign_jax.split_nnx(M.Llama(cfg, rngs=nnx.Rngs(0)))
    step = absign_jax.FullTrainStep(parts.loss_fn, optax.adamw(1e-3))
    state = step.init(parts.params, copy_inputs=False)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 129)).astype(np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    for _ in range(3):
      state, m = step(state, batch); m["loss"].block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      state, m = step(state, batch); m["loss"].block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print(absign_jax.allocator.status().applied, faults)
""")


def probe(**env) -> tuple[bool, float]:
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300, check=True)
  applied, faults = out.stdout.split()[-2:]
  return applied == "True", float(faults)


def test_freed_temporaries_stay_mapped_between_steps():
  kept, kept_faults = probe()
  system, system_faults = probe(**{absign_jax.allocator.OPT_OUT: "1"})
  assert kept and not system
  # The logits alone are 16,384 pages: the system allocator maps them anew each step.
  assert system_faults > 16_384
  assert kept_faults < 0.4 * system_faults


def test_the_status_says_what_was_done():
  status = absign_jax.allocator.keep_freed_memory()  # idempotent
  assert status == absign_jax.allocator.status()
  assert status.applied and status.reason in ("mallopt", "glibc environment variables")
