"""Everything that matters on one GPU, in one command of at most 8 minutes.

    python benchmarks/gpu_suite.py --out runs/gpu_suite

Three parts, each a subprocess with its own time limit, so that one that fails or
runs out of memory leaves the others' figures:

1. the paper's point: qwen3-8b (random weights, real shapes), batch 16 x 512,
   bfloat16, remat, chunked cross-entropy, stacked layout, with absignsgd, block_adam,
   LoRA and AdamW: the device's peak memory, the step time and the compile time
   (``benchmarks/step_time.py``; the block methods save every 6th recomputed layer's
   input, ``--save-inputs-every 6``). Where a method does not fit, its compiled size
   from ``--memory-only`` stands in, marked as such;
2. the default benchmark, ``benchmarks/step_time.py --preset smollm2-135m``;
3. the fine-tuning program's default run, for its tokens/s and perplexity.

It writes ``gpu_suite.json`` (every part's own JSON, its command, return code and
seconds) and ``gpu_suite.md`` (one table). ``--smoke`` runs the same parts on the tiny
preset with a few steps, on any backend: the test suite runs it on the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_TIME = os.path.join(ROOT, "benchmarks", "step_time.py")
PAPER_METHODS = "absignsgd,block_adam,lora,adamw"
PAPER_MEMORY_GB = 20.29  # ABSignSGD's reported peak on Qwen3-8B at batch 16 x 512


def parts(out: str, smoke: bool, program_args: list[str]) -> list[dict[str, Any]]:
  """The suite's parts: a name, a command, its output folder and time limit (s).

  The limits add up to 7.75 minutes: the suite ends within 8 whatever happens.
  """
  py = sys.executable
  if smoke:
    model = ["--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2"]
    big = [*model, "--methods", PAPER_METHODS, "--save-inputs-every", "2"]
    default = [*model, "--methods", "forward,adamw,absignsgd"]
    limits = (200, 60, 100, 100)
  else:
    big = ["--preset", "qwen3-8b", "--batch", "16", "--seq", "512", "--steps", "5",
           "--methods", PAPER_METHODS, "--save-inputs-every", "6"]
    default = ["--preset", "smollm2-135m"]
    limits = (210, 45, 120, 90)
  return [
      {"name": "paper_point", "dir": os.path.join(out, "paper_point"),
       "command": [py, STEP_TIME, *big], "limit_s": limits[0]},
      {"name": "paper_point_memory", "dir": os.path.join(out, "paper_point_memory"),
       "command": [py, STEP_TIME, *big, "--memory-only"], "limit_s": limits[1]},
      {"name": "default_benchmark", "dir": os.path.join(out, "default_benchmark"),
       "command": [py, STEP_TIME, *default], "limit_s": limits[2]},
      {"name": "program", "dir": os.path.join(out, "program"),
       "command": [py, "-m", "absign_jax.llm", *program_args], "limit_s": limits[3]},
  ]


def run_part(part: dict[str, Any]) -> dict[str, Any]:
  """Runs one part; returns its record (its JSON result where it wrote one)."""
  os.makedirs(part["dir"], exist_ok=True)
  command = [*part["command"], "--out", part["dir"]]
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=part["limit_s"])
    rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
  except subprocess.TimeoutExpired as e:
    text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
    rc, tail = "timeout", (text(e.stdout) + text(e.stderr))[-2000:]
  record = {"name": part["name"], "command": " ".join(command), "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": tail}
  found = sorted(glob.glob(os.path.join(part["dir"], "step_time_*.json")) or glob.glob(
      os.path.join(part["dir"], "**", "summary.json"), recursive=True))
  if found:
    with open(found[0]) as fh:
      record["result"] = json.load(fh)
  return record


def _gb(value) -> str:
  return "" if value is None else f"{value / 1e9:.2f}"


def _s(value) -> str:
  return "" if value is None else f"{value:.3f}"


def table(records: list[dict[str, Any]]) -> str:
  """One Markdown table of every part's figures."""
  by_name = {r["name"]: r for r in records}
  lines = ["| part | method | peak device memory (GB) | compiled (GB) | step (s) | "
           "compile (s) | note |", "|---|---|---:|---:|---:|---:|---|"]
  memory_only = {row["name"]: row for row in by_name.get("paper_point_memory", {}).get(
      "result", {}).get("rows", [])}
  for name in ("paper_point", "default_benchmark"):
    rec = by_name.get(name, {})
    rows = rec.get("result", {}).get("rows", [])
    if not rows:
      lines.append(f"| {name} | | | | | | returncode {rec.get('returncode')} |")
    for row in rows:
      peak = (row.get("device_memory") or {}).get("peak_bytes_in_use")
      note = ""
      if name == "paper_point" and peak is not None:
        note = "below" if peak / 1e9 < PAPER_MEMORY_GB else "above"
        note += f" the paper's {PAPER_MEMORY_GB} GB"
      lines.append(f"| {name} | {row['name']} | {_gb(peak)} | "
                   f"{_gb(row.get('memory_bytes'))} | {_s(row.get('mean_step_s'))} | "
                   f"{_s(row.get('compile_s'))} | {note} |")
    if name == "paper_point":
      timed = {row["name"] for row in rows}
      for method, row in memory_only.items():
        if method not in timed:
          lines.append(f"| {name} | {method} | | {_gb(row.get('memory_bytes'))} | | | "
                       "did not run: compiled size only |")
  prog = by_name.get("program", {})
  summary = prog.get("result")
  if summary:
    lines.append(f"| program | {summary.get('optimizer', '')} | | | | | "
                 f"{summary.get('tokens_per_s', 0):.0f} tokens/s, perplexity "
                 f"{summary.get('ppl_before', 0):.3f} -> {summary.get('ppl_after', 0):.3f} |")
  else:
    lines.append(f"| program | | | | | | returncode {prog.get('returncode')} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="runs/gpu_suite")
  p.add_argument("--smoke", action="store_true",
                 help="the tiny preset and a few steps, on any backend")
  p.add_argument("--program-args", default="--steps 200",
                 help="the fine-tuning program's options (one string)")
  args = p.parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  records = []
  for part in parts(out, args.smoke, args.program_args.split()):
    print(f"[gpu_suite] {part['name']}: {' '.join(part['command'][1:])}", flush=True)
    records.append(run_part(part))
    print(f"[gpu_suite] {part['name']}: returncode {records[-1]['returncode']} in "
          f"{records[-1]['seconds']} s", flush=True)
  result = {"smoke": args.smoke, "seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d"), "parts": records}
  with open(os.path.join(out, "gpu_suite.json"), "w") as fh:
    json.dump(result, fh, indent=1)
  md = (f"### GPU suite ({result['date']}, {result['seconds']} s)\n\n"
        f"`python benchmarks/gpu_suite.py{' --smoke' if args.smoke else ''}`\n\n"
        + table(records))
  with open(os.path.join(out, "gpu_suite.md"), "w") as fh:
    fh.write(md)
  print(md)
  return result


if __name__ == "__main__":
  main()
