"""Every example runs (with few steps) and prints what it promises."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 120) -> str:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env.setdefault("JAX_PLATFORMS", "cpu")
  proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def loss_fell(out: str) -> tuple[float, float]:
  m = re.search(r"loss fell from ([\d.]+) to ([\d.]+)", out)
  assert m, out
  return float(m.group(1)), float(m.group(2))


def test_every_example_is_tested():
  tested = {"quickstart_optax.py", "nnx_training_loop.py", "inspect_schedule.py",
            "any_flax_model.py", "tunix_drop_in.py", "multiprocess_launch.py"}  # the last one runs in tests/train/test_data_parallel.py
  assert {p.name for p in EXAMPLES.glob("*.py")} <= tested


def test_quickstart_optax():
  out = run_example("quickstart_optax.py", "40")
  first, last = loss_fell(out)
  assert last < 0.9 * first
  assert re.search(r"step\s+0\s+layer 3\s+loss", out)  # the deepest layer goes first


def test_nnx_training_loop():
  out = run_example("nnx_training_loop.py", "--steps", "30", "--layers", "4")
  assert "4 blocks (list layout)" in out
  assert re.search(r"step\s+0\s+block 3 \(layers\.3\)\s+lr 0\.00e\+00", out)  # warm-up
  first, last = loss_fell(out)
  assert last < first
  visits = re.search(r"visits per layer \(shallow -> deep\): \[([\d, ]+)\]", out)
  counts = [int(v) for v in visits.group(1).split(",")]
  assert sum(counts) == 31 and counts[-1] == max(counts)


def test_any_flax_model():
  out = run_example("any_flax_model.py", "--steps", "24", "--layers", "3")
  assert "3 blocks," in out
  first, last = loss_fell(out)
  assert last < first
  assert "compiled step programs: 1" in out  # every block, one program
  assert "MiniGPT with 3 blocks in an nnx.List" in out  # back in its own layout


def test_inspect_schedule():
  out = run_example("inspect_schedule.py", "--layers", "36", "--steps", "20000")
  assert "depth_biased  first picks: 35 34 33 32 31 35 30 29 34 28 27 33" in out
  assert "descending    first picks: 35 34 33 32 31 30 29 28 27 26 25 24" in out
  assert "cyclic        first picks: 0 1 2 3 4 5 6 7 8 9 10 11" in out
  m = re.search(r"deepest/shallowest visits: measured ([\d.]+), "
                r"predicted N\(1\+c\)/\(N\+c\) = ([\d.]+)", out)
  assert m, out
  measured, predicted = float(m.group(1)), float(m.group(2))
  assert predicted == pytest.approx(36 * 11 / 46, abs=0.01)
  assert measured == pytest.approx(predicted, rel=0.02)
  err = re.search(r"max relative error of the frequencies: ([\d.]+)%", out)
  assert float(err.group(1)) < 3.0


def test_tunix_drop_in():
  if importlib.util.find_spec("tunix") is None:
    pytest.skip("needs google-tunix (the install is in examples/tunix_drop_in.py)")
  out = run_example("tunix_drop_in.py", "--steps", "6", "--layers", "3")
  trainer, fast = re.findall(r"loss fell from ([\d.]+) to ([\d.]+)", out)
  assert float(trainer[1]) < float(trainer[0]) and float(fast[1]) < float(fast[0])
  assert "compiled step programs: 1;" in out  # every layer, one program
  assert "merged back: Llama3 with 3 layers" in out
