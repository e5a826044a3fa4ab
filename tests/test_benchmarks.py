"""Smoke test of ``benchmarks/step_time.py`` on the tiny preset (all methods, studies)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("adamw", "absignsgd", "absignsgd_uniform", "block_adam", "sign_sgd", "lora")
# A smoke test checks what the script writes, not how fast XLA's code is: cheaper
# compiles (the same programs, less optimised) and small batches keep it short.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SMALL = ["--batch", "2", "--seq", "16"]


def _env():
  return {**os.environ, "XLA_FLAGS": FAST_XLA,
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_step_time_tiny(tmp_path):
  out = tmp_path / "tmp"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"),
       "--preset", "tiny", "--steps", "3", *SMALL, "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  # The Markdown table comes last.
  assert "| method | median step (s)" in proc.stdout
  assert proc.stdout.rstrip().endswith(".")

  result = json.loads((out / "step_time_tiny.json").read_text())
  assert (out / "step_time_tiny.md").exists()
  rows = {r["name"]: r for r in result["rows"]}
  assert set(rows) == set(METHODS)
  n = result["n_layers"]
  for name, r in rows.items():
    for key in ("median_step_s", "mean_step_s", "speedup_vs_adamw", "model_speedup",
                "memory_bytes", "memory_ratio_vs_adamw", "opt_state_bytes", "compile_s"):
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (name, key)
    assert r["median_step_s"] > 0 and r["mean_step_s"] > 0 and r["memory_bytes"] > 0
    assert r["compile_s"] >= 0 and r["opt_state_bytes"] >= 0
  assert rows["adamw"]["speedup_vs_adamw"] == 1.0
  assert rows["adamw"]["memory_ratio_vs_adamw"] == 1.0
  # Cost model (SPEC §4): full backprop 1x, blocks faster, depth bias fastest.
  assert rows["sign_sgd"]["model_speedup"] == 1.0
  assert 1.0 < rows["absignsgd_uniform"]["model_speedup"] < rows["absignsgd"]["model_speedup"]
  assert rows["block_adam"]["model_speedup"] == rows["absignsgd_uniform"]["model_speedup"]
  # Block methods: every block timed, one program for all blocks (the list layout is
  # cut at its layers and stacked for training).
  for name in ("absignsgd", "absignsgd_uniform", "block_adam"):
    assert len(rows[name]["block_median_s"]) == n
    assert rows[name]["programs"] == 1
    assert rows[name]["timed_steps"] >= 2 * n
  # Optimizer state: adamw holds two moments of every parameter, absignsgd none.
  assert rows["adamw"]["opt_state_bytes"] >= 2 * rows["adamw"]["param_bytes"]
  assert rows["absignsgd"]["opt_state_bytes"] < 0.01 * rows["adamw"]["opt_state_bytes"]
  # Studies.
  cs = result["compile_study"]
  assert cs["absignsgd"]["steps"] == cs["adamw"]["steps"] == 100
  assert cs["absignsgd"]["wall_s"] > 0 and cs["adamw"]["wall_s"] > 0
  ds = {(e["layout"], e["dispatch"]): e for e in result["dispatch_study"]}
  assert set(ds) == {("list", "per_block"), ("list", "switch"), ("stacked", "auto")}
  assert ds[("list", "per_block")]["programs"] == 1  # stacked for training: one program
  assert ds[("list", "switch")]["programs"] == 1
  assert ds[("stacked", "auto")]["programs"] == 1
  for e in ds.values():
    assert e["compile_s"] >= 0 and e["mean_step_s"] > 0

  # --memory-only compiles the same programs from shapes alone: the same sizes, no run.
  mem_out = tmp_path / "mem"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "step_time.py"),
       "--preset", "tiny", "--memory-only", *SMALL, "--out", str(mem_out)],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.rstrip().splitlines()[-1].startswith("| lora |")
  mem_rows = {r["name"]: r for r in
              json.loads((mem_out / "memory_tiny.json").read_text())["rows"]}
  for name in METHODS:
    assert mem_rows[name]["memory_bytes"] == rows[name]["memory_bytes"], name
    assert mem_rows[name]["opt_state_bytes"] == rows[name]["opt_state_bytes"], name
