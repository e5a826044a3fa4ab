"""The multi-device subprocesses, shared by the test modules here.

* ``tests/train/_dp_worker.py`` on 8 simulated CPU devices (every check, one
  process: the data-parallel votes and the sharded ``(data, fsdp)`` meshes), run
  once per test run even when xdist gives the two modules to different workers;
* ``examples/multiprocess_launch.py``: 2 processes joined by ``jax.distributed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import SUBPROCESS_XLA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 420


def subprocess_env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA)
  env.update(extra)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def once_per_run(request, tmp_path_factory, name: str, compute):
  """``compute()`` (JSON-serialisable) once per test run: xdist workers share the
  first one's result through a file under the run's common temporary directory."""
  if not hasattr(request.config, "workerinput"):  # not an xdist worker
    return compute()
  from filelock import FileLock

  root = tmp_path_factory.getbasetemp().parent  # one per run, shared by its workers
  path = root / f"{name}.json"
  with FileLock(str(root / f"{name}.lock")):
    if path.exists():
      return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result))
    return result


def run_8_device_worker() -> dict:
  """``{check name: result dict}`` from ``_dp_worker.py`` on 8 simulated devices."""
  worker = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "train", "_dp_worker.py")],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    out, err = worker.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    worker.kill()
    out, err = worker.communicate()
    return {"_error": f"8-device worker timed out after {TIMEOUT_S}s:\n{err[-3000:]}"}
  results = {}
  for line in out.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      results[r["check"]] = r
  if not results:
    return {"_error": f"no results from the 8-device worker:\n{err[-3000:]}"}
  return results


@pytest.fixture(scope="session")
def checks(request, tmp_path_factory):
  """``{check name: result dict}`` from the 8-device worker, run once per test run."""
  results = once_per_run(request, tmp_path_factory, "dp_worker", run_8_device_worker)
  if "_error" in results:
    pytest.fail(results["_error"])
  return results


@pytest.fixture(scope="session")
def launch():
  """``examples/multiprocess_launch.py``: 2 processes joined by ``jax.distributed``;
  yields the Popen of the launch."""
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "examples", "multiprocess_launch.py"),
       "--num-processes", "2", "--steps", "2", "--layers", "2", "--layout", "list",
       "--aggregation", "majority", "--timeout", "240"],
      cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()
