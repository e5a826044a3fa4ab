"""Keeps freed host memory mapped, so XLA:CPU's per-step temporaries cost no page faults.

XLA:CPU allocates a step's temporaries with ``malloc`` and frees them at its end. With
glibc's defaults, blocks above 32 MiB are fresh ``mmap`` regions and freed memory is
returned to the system, so every step maps its temporaries anew and touches them
page by page: a page fault for every page of the temporaries, and the kernel time to
serve them, in every step (BENCHMARKS.md has the measured counts). glibc's tunables
fix that when set before the process's threads first allocate:

* one arena (``M_ARENA_MAX = 1``): per-thread arenas are ``mmap``-ed heaps that glibc
  unmaps when they empty;
* no ``mmap`` for large blocks (``M_MMAP_MAX = 0``): they come from the heap;
* no trimming (``M_TRIM_THRESHOLD`` = the largest size): freed heap memory stays
  mapped for the next step.

With them, a step reuses the pages of the steps before: once the heap has grown to
its high-water mark (in the first steps), no page faults and almost no kernel time.
The cost: the process keeps its peak heap mapped until it exits, all threads share
one arena, and one heap without ``mmap`` fragments, so that high-water mark can be
well above glibc's own peak (BENCHMARKS.md has both measured). That is why they are
opt-in.

Set ``ABSIGN_JAX_KEEP_FREED_MEMORY=1`` (:data:`OPT_IN`) in the environment and
``import absign_jax`` applies them (on Linux with glibc), before it imports JAX. They
are fully effective when ``absign_jax`` is imported before ``jax`` (as ``python -m
absign_jax.llm`` and the benchmarks do); a process that imported JAX first may
already have threads with arenas of their own, which then still unmap. There, set
the equivalent glibc environment variables (:data:`ENVIRONMENT`) before starting
Python instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import NamedTuple

__all__ = ["AllocatorStatus", "ENVIRONMENT", "OPT_IN", "keep_freed_memory", "requested",
           "status"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

OPT_IN = "ABSIGN_JAX_KEEP_FREED_MEMORY"
"""Set this environment variable to 1 for ``import absign_jax`` to apply the settings."""

ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
               "MALLOC_TRIM_THRESHOLD_": str(2**62)}
"""The same settings as glibc environment variables, read when a process starts."""


class AllocatorStatus(NamedTuple):
  """What :func:`keep_freed_memory` did.

  Attributes:
    applied: the settings are in force (set here, or by :data:`ENVIRONMENT`).
    before_jax: they were set before JAX was imported (fully effective).
    reason: why not, when ``applied`` is False; how, when it is True.
  """

  applied: bool
  before_jax: bool
  reason: str


_status = AllocatorStatus(False, False, f"not requested ({OPT_IN} is not set)")


def requested() -> bool:
  """Whether the environment asks ``import absign_jax`` to apply the settings."""
  return os.environ.get(OPT_IN, "") not in ("", "0")


def _from_environment() -> bool:
  """Whether the process started with the settings of :data:`ENVIRONMENT`."""
  env = os.environ
  try:
    trim = int(env.get("MALLOC_TRIM_THRESHOLD_", "0"))
  except ValueError:
    return False
  return (env.get("MALLOC_ARENA_MAX") == "1" and env.get("MALLOC_MMAP_MAX_") == "0"
          and trim >= 2**40)


def keep_freed_memory() -> AllocatorStatus:
  """Sets glibc's malloc to keep freed memory mapped (see the module docstring).

  Idempotent; a no-op on other C libraries.

  Returns:
    The :class:`AllocatorStatus` (also available from :func:`status`).
  """
  global _status
  if _status.applied:
    return _status
  before_jax = "jax" not in sys.modules
  if _from_environment():
    _status = AllocatorStatus(True, True, "glibc environment variables")
  elif not sys.platform.startswith("linux"):
    _status = AllocatorStatus(False, before_jax, f"not glibc ({sys.platform})")
  else:
    try:
      libc = ctypes.CDLL(None)
      libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
      mallopt = libc.mallopt
    except (OSError, AttributeError):
      _status = AllocatorStatus(False, before_jax, "not glibc")
    else:
      mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
      # M_TRIM_THRESHOLD takes a size_t through an int: -1 is the largest size.
      ok = all(mallopt(param, value) == 1 for param, value in (
          (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
      _status = AllocatorStatus(ok, before_jax, "mallopt" if ok else "mallopt refused")
  return _status


def status() -> AllocatorStatus:
  """What :func:`keep_freed_memory` did in this process."""
  return _status
