"""The host allocator (``absign_jax.allocator``): mimalloc by a restart, glibc's
settings on import, and the system's; each keeps or maps XLA:CPU's temporaries.

Each probe runs in a fresh interpreter: an allocator cannot be switched inside the
test process.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

import absign_jax
from absign_jax import allocator


def _glibc() -> bool:
  try:
    ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    return sys.platform.startswith("linux")
  except (OSError, AttributeError):
    return False


glibc_only = pytest.mark.skipif(not _glibc(), reason="glibc's malloc settings only")
needs_mimalloc = pytest.mark.skipif(allocator.mimalloc_library() is None,
                                    reason="the cmeel-mimalloc wheel is not installed")

# An AdamW step whose logits (4 x 128 x 32768 float32, 64 MiB) and their gradient are
# temporaries above glibc's largest mmap threshold. The probe configures its process
# as a program's entry point does (a restart, for mimalloc).
PROBE = textwrap.dedent("""
    import resource, sys
    import absign_jax  # first: before JAX starts its threads
    status = absign_jax.allocator.configure_process()
    import numpy as np, optax
    from flax import nnx
    from absign_jax.llm import model as M
    cfg = M.LlamaConfig.preset("tiny").replace(vocab_size=32768, n_layers=2)
    parts = absign_jax.split_nnx(M.Llama(cfg, rngs=nnx.Rngs(0)))
    step = absign_jax.FullTrainStep(parts.loss_fn, optax.adamw(1e-3))
    state = step.init(parts.params, copy_inputs=False)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 129)).astype(np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    # (glibc's kept heap grows over the first steps: three before counting)
    for _ in range(3):
      state, m = step(state, batch); m["loss"].block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      state, m = step(state, batch); m["loss"].block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    print(repr(sys.argv[1:]), "|", status.name, "|", faults)
""")


def probe(choice: str, *args: str) -> tuple[str, float, list[str]]:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.CHOICE)}
  out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                       text=True, env={**env, allocator.CHOICE: choice}, timeout=300,
                       check=True)
  argv, name, faults = out.stdout.strip().splitlines()[-1].split(" | ")
  return name, float(faults), eval(argv)  # pylint: disable=eval-used


# The logits alone are 16,384 pages: glibc's defaults map them (and their gradient)
# anew in every step (BENCHMARKS.md, "The allocator", has the measured counts).
LOGIT_PAGES = 4 * 128 * 32768 * 4 // 4096


@pytest.fixture(scope="module")
def system_faults():
  name, faults, _ = probe("system")
  assert name == "system"
  return faults


@glibc_only
def test_system_choice_maps_the_temporaries_anew(system_faults):
  assert system_faults > LOGIT_PAGES


@needs_mimalloc
def test_mimalloc_restart_keeps_temporaries_mapped_and_the_command():
  name, faults, argv = probe("auto", "--steps", "3 4")
  assert name == "mimalloc"
  assert argv == ["--steps", "3 4"]  # the restarted command is the same
  assert faults < 0.05 * LOGIT_PAGES


@glibc_only
def test_glibc_choice_keeps_temporaries_mapped(system_faults):
  name, faults, _ = probe("glibc")
  assert name == "glibc (freed memory kept)"
  # Fewer, not none: the kept heap still grows over the first steps, by an amount
  # that depends on the order of allocations (10-14k faults a step measured on a
  # 2-core VM).
  assert faults < 0.6 * system_faults


def test_bad_choice_is_refused_in_one_line(monkeypatch):
  monkeypatch.setenv(allocator.CHOICE, "jemalloc")
  with pytest.raises(ValueError, match="ABSIGN_JAX_ALLOCATOR='jemalloc' is not one of"):
    allocator.configure_process()


not_under_mimalloc = pytest.mark.skipif(allocator.status().name == "mimalloc",
                                        reason="this test process runs under mimalloc")


@not_under_mimalloc
def test_mimalloc_required_but_missing_names_the_wheel(monkeypatch):
  monkeypatch.setenv(allocator.CHOICE, "mimalloc")
  monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
  with pytest.raises(RuntimeError, match="pip install cmeel-mimalloc"):
    allocator.configure_process()


@not_under_mimalloc
def test_auto_without_mimalloc_falls_back_to_the_system(monkeypatch):
  monkeypatch.setenv(allocator.CHOICE, "auto")
  monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
  status = allocator.configure_process()
  assert (status.name, status.applied) == ("system", False)
  assert "cmeel-mimalloc" in status.reason or "LD_PRELOAD" in status.reason


@glibc_only
def test_glibc_settings_apply_on_import_only_when_chosen():
  env = {k: v for k, v in os.environ.items() if k != allocator.CHOICE}
  code = "import absign_jax; print(absign_jax.allocator.status())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=120, check=True).stdout
  assert "glibc" not in out
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, allocator.CHOICE: "glibc"}, timeout=120,
                       check=True).stdout
  assert "applied=True" in out and "before_jax=True" in out
