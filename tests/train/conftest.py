"""The multi-device subprocesses, started once and shared by the test modules here.

* ``tests/train/_dp_worker.py`` on 8 simulated CPU devices (every check, one
  process: the data-parallel votes and the sharded ``(data, fsdp)`` meshes);
* ``examples/multiprocess_launch.py``: 2 processes joined by ``jax.distributed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Faster XLA compiles; the programs (and their collectives) are the same.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TIMEOUT_S = 420


def subprocess_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA)
  env.update(extra)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="session")
def procs():
  """Starts the 8-device worker and the 2-process launch; yields their Popen."""
  worker = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "train", "_dp_worker.py")],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  launch = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "examples", "multiprocess_launch.py"),
       "--num-processes", "2", "--steps", "2", "--layers", "2", "--layout", "list",
       "--aggregation", "majority", "--timeout", "240"],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  started = {"worker": worker, "launch": launch}
  yield started
  for p in started.values():  # only the processes this fixture started
    if p.poll() is None:
      p.kill()
      p.communicate()


@pytest.fixture(scope="session")
def checks(procs):
  """``{check name: result dict}`` from the 8-device worker."""
  try:
    out, err = procs["worker"].communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    procs["worker"].kill()
    out, err = procs["worker"].communicate()
    pytest.fail(f"8-device worker timed out after {TIMEOUT_S}s:\n{err[-3000:]}")
  results = {}
  for line in out.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      results[r["check"]] = r
  assert results, f"no results from the 8-device worker:\n{err[-3000:]}"
  return results
