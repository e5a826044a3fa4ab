"""``benchmarks/gpu_suite.py --smoke``: the GPU command's parts run, on the CPU, at tiny
scale, and its JSON and table hold every part's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import SUBPROCESS_XLA
from tests.llm._tiny_program import CHATML, write_tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_command_runs_every_part_at_tiny_scale(tmp_path):
  model = tmp_path / "tiny.gguf"
  write_tiny_gguf(model, chat_template=CHATML)
  program = f"--model {model} --steps 2 --seq 16 --batch 2 --eval-seqs 2"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--smoke",
       "--out", str(tmp_path / "suite"), "--program-args", program],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": SUBPROCESS_XLA})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "suite" / "gpu_suite.json").read_text())
  parts = {p["name"]: p for p in result["parts"]}
  assert set(parts) == {"paper_point", "paper_point_memory", "default_benchmark",
                        "program"}
  for name, part in parts.items():
    assert part["returncode"] == 0, (name, part["output_tail"])
  paper = {r["name"] for r in parts["paper_point"]["result"]["rows"]}
  assert paper == {"absignsgd", "block_adam", "lora", "adamw"}
  assert "tokens_per_s" in parts["program"]["result"]
  table = (tmp_path / "suite" / "gpu_suite.md").read_text()
  for method in ("absignsgd", "block_adam", "lora", "adamw"):
    assert f"| paper_point | {method} |" in table
  assert "tokens/s" in table
