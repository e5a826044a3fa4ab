"""``ABSIGN_JAX_KEEP_FREED_MEMORY=1``: ``import absign_jax`` keeps XLA:CPU's freed
temporaries mapped (glibc only).

Each probe runs in a fresh interpreter: the settings only take full effect before
JAX starts its threads, so they cannot be switched inside the test process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import absign_jax


def _glibc() -> bool:
  try:
    ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    return sys.platform.startswith("linux")
  except (OSError, AttributeError):
    return False


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's malloc settings only")

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
  kept, kept_faults = probe(**{absign_jax.allocator.OPT_IN: "1"})
  system, system_faults = probe(**{absign_jax.allocator.OPT_IN: "0"})
  assert kept and not system
  # The logits alone are 16,384 pages: the system allocator maps them anew each step.
  assert system_faults > 16_384
  assert kept_faults < 0.4 * system_faults


def test_the_settings_are_opt_in():
  env = {k: v for k, v in os.environ.items() if k != absign_jax.allocator.OPT_IN}
  code = "import absign_jax; print(absign_jax.allocator.status())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=120, check=True).stdout
  assert "applied=False" in out and "not requested" in out
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, absign_jax.allocator.OPT_IN: "1"}, timeout=120,
                       check=True).stdout
  assert "applied=True" in out and "before_jax=True" in out
