"""The host allocator, so XLA:CPU's per-step temporaries cost no page faults.

XLA:CPU allocates a step's temporaries with ``malloc`` and frees them at its end.
With glibc's defaults, blocks above 32 MiB are fresh ``mmap`` regions and freed
memory goes back to the system, so every step maps its temporaries anew and the
kernel serves a page fault for every page it touches: for AdamW on SmolLM2-135M,
about 480,000 faults and seconds of kernel time per step (BENCHMARKS.md has the
measured figures). glibc cannot be told to keep blocks that large (it caps its
``mmap`` threshold at 32 MiB).

:func:`configure_process` fixes that for a program: it restarts the running command
once, with `mimalloc <https://github.com/microsoft/mimalloc>`_ preloaded (from the
``cmeel-mimalloc`` wheel, installed with the ``llm`` extra) and told never to
return freed memory to the system (``MIMALLOC_PURGE_DELAY=-1``). Each step then
reuses the pages of the step before. ``python -m absign_jax.llm`` and the
benchmarks call it first thing; a training script of your own can too::

    if __name__ == "__main__":
      absign_jax.allocator.configure_process()  # restarts this command once
      main()

The environment variable :data:`CHOICE` selects the allocator:

``auto`` (the default)
  mimalloc when the wheel is installed, else the system's.
``mimalloc``
  mimalloc; :func:`configure_process` raises if the wheel is missing.
``glibc``
  glibc's malloc with freed memory kept (:func:`keep_freed_memory`, applied by
  ``import absign_jax``): one arena, no ``mmap`` for large blocks, no trimming. No
  restart and no extra package, but one fragmenting heap: its peak can be well
  above glibc's own.
``system``
  leave the allocator alone.

:func:`status` says what is in force.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import NamedTuple

__all__ = ["AllocatorStatus", "CHOICE", "CHOICES", "ENVIRONMENT", "MIMALLOC_OPTIONS",
           "choice", "configure_process", "keep_freed_memory", "mimalloc_library",
           "status"]

CHOICE = "ABSIGN_JAX_ALLOCATOR"
"""The environment variable that selects the allocator (one of :data:`CHOICES`)."""

CHOICES = ("auto", "mimalloc", "glibc", "system")

MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}
"""mimalloc's settings for a restarted process (a value already set is kept)."""

ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
               "MALLOC_TRIM_THRESHOLD_": str(2**62)}
"""The ``glibc`` choice as glibc environment variables, read when a process starts."""

_RESTARTED = "ABSIGN_JAX_ALLOCATOR_RESTARTED"  # set in the restarted process
_MIMALLOC_WHEEL = "cmeel-mimalloc"

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


class AllocatorStatus(NamedTuple):
  """The allocator in force.

  Attributes:
    name: ``"mimalloc"``, ``"glibc (freed memory kept)"`` or ``"system"``.
    applied: whether freed memory is kept (mimalloc or the glibc settings).
    before_jax: the glibc settings were made before JAX was imported (fully
      effective); True for mimalloc, which is in place from the start.
    reason: how it was set up, or why nothing was.
  """

  name: str
  applied: bool
  before_jax: bool
  reason: str


_status: AllocatorStatus | None = None


def choice() -> str:
  """The allocator the environment asks for (:data:`CHOICE`; ``auto`` when unset).

  Raises:
    ValueError: the variable holds something other than :data:`CHOICES`.
  """
  value = os.environ.get(CHOICE, "auto").strip().lower() or "auto"
  if value not in CHOICES:
    raise ValueError(f"{CHOICE}={value!r} is not one of {', '.join(CHOICES)}; "
                     f"unset it for the default (auto)")
  return value


def mimalloc_library() -> str | None:
  """Path of ``libmimalloc.so`` from the ``cmeel-mimalloc`` wheel, None if absent."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    files = metadata.distribution(_MIMALLOC_WHEEL).files or []
  except metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name.startswith("libmimalloc.so"):
      path = str(f.locate())
      if os.path.exists(path):
        return path
  return None


def _mimalloc_loaded() -> bool:
  try:
    with open("/proc/self/maps") as maps:
      return "libmimalloc" in maps.read()
  except OSError:
    return False


def _glibc_from_environment() -> bool:
  env = os.environ
  try:
    trim = int(env.get("MALLOC_TRIM_THRESHOLD_", "0"))
  except ValueError:
    return False
  return (env.get("MALLOC_ARENA_MAX") == "1" and env.get("MALLOC_MMAP_MAX_") == "0"
          and trim >= 2**40)


def keep_freed_memory() -> AllocatorStatus:
  """Sets glibc's malloc to keep freed memory mapped (the ``glibc`` choice).

  One arena (``M_ARENA_MAX = 1``: per-thread arenas are ``mmap``-ed heaps that glibc
  unmaps when they empty), no ``mmap`` for large blocks (``M_MMAP_MAX = 0``) and no
  trimming (``M_TRIM_THRESHOLD`` = the largest size). Fully effective only before
  JAX starts its threads (``import absign_jax`` first); a process that imported JAX
  before may have per-thread arenas that still unmap. There, set
  :data:`ENVIRONMENT` before starting Python instead. Idempotent; a no-op on other
  C libraries.

  Returns:
    The :class:`AllocatorStatus` (also available from :func:`status`).
  """
  global _status
  name = "glibc (freed memory kept)"
  if _status is not None and _status.name == name:
    return _status
  before_jax = "jax" not in sys.modules
  if _glibc_from_environment():
    _status = AllocatorStatus(name, True, True, "glibc environment variables")
    return _status
  if not sys.platform.startswith("linux"):
    return _set_status("system", f"not glibc ({sys.platform})", before_jax)
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return _set_status("system", "not glibc", before_jax)
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # M_TRIM_THRESHOLD takes a size_t through an int: -1 is the largest size.
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    return _set_status("system", "mallopt refused", before_jax)
  _status = AllocatorStatus(name, True, before_jax, "mallopt")
  return _status


def _set_status(name: str, reason: str, before_jax: bool = True) -> AllocatorStatus:
  global _status
  _status = AllocatorStatus(name, name != "system", before_jax, reason)
  return _status


def configure_process() -> AllocatorStatus:
  """Puts this process under the allocator :data:`CHOICE` asks for.

  For mimalloc, that means restarting: a running process cannot swap its
  ``malloc``. Unless mimalloc is already loaded, this replaces the process
  (``os.execv``) with the same command (``sys.orig_argv``) and ``LD_PRELOAD``
  naming the library, plus :data:`MIMALLOC_OPTIONS`. Call it at the top of a
  program's entry point, before any work (arguments are parsed again, output so
  far stays); never from library code or an interactive session. The restarted
  process's call returns its status; a restart that did not load mimalloc (the
  loader refused the library) is not tried again and says so.

  Returns:
    The :class:`AllocatorStatus` (also available from :func:`status`).

  Raises:
    ValueError: :data:`CHOICE` is invalid.
    RuntimeError: :data:`CHOICE` is ``mimalloc`` and the wheel is not installed, or
      the platform cannot preload it.
  """
  wanted = choice()
  if wanted == "system":
    return _set_status("system", f"{CHOICE}=system")
  if wanted == "glibc":
    return keep_freed_memory()
  if _mimalloc_loaded():
    return _set_status("mimalloc", "preloaded" if not os.environ.get(_RESTARTED)
                       else "restarted with LD_PRELOAD")
  library = mimalloc_library() if sys.platform.startswith("linux") else None
  if library is None:
    why = (f"the {_MIMALLOC_WHEEL} wheel is not installed (pip install {_MIMALLOC_WHEEL})"
           if sys.platform.startswith("linux") else f"no LD_PRELOAD on {sys.platform}")
    if wanted == "mimalloc":
      raise RuntimeError(f"{CHOICE}=mimalloc but {why}; or set {CHOICE}=auto")
    return _set_status("system", why)
  if os.environ.get(_RESTARTED):
    return _set_status("system", f"LD_PRELOAD={library} did not load")
  env = dict(os.environ)
  preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
  env["LD_PRELOAD"] = ":".join([library] + preload)
  for key, value in MIMALLOC_OPTIONS.items():
    env.setdefault(key, value)
  env[_RESTARTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)
  raise AssertionError("unreachable")  # execve does not return


def status() -> AllocatorStatus:
  """The allocator in force in this process."""
  if _status is not None:
    return _status
  if _mimalloc_loaded():
    return AllocatorStatus("mimalloc", True, True, "preloaded")
  if _glibc_from_environment():
    return AllocatorStatus("glibc (freed memory kept)", True, True,
                           "glibc environment variables")
  return AllocatorStatus("system", False, True, "not configured")
