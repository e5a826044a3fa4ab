"""The Markdown report of a ``step_time.py`` result, from its JSON alone.

    python benchmarks/report.py runs/step_time/step_time_smollm2-135m.json

writes ``step_time_smollm2-135m.md`` beside the JSON (``--out`` elsewhere) and prints
it: the same Markdown the run wrote. A ``--memory-only`` result (``memory_*.json``)
gets its table of compiled sizes.

The report states ratios as figures (:data:`RATIOS`); which values the project aims
for is said in BENCHMARKS.md, not here. Imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, NamedTuple

Rows = dict[str, dict[str, Any]]


def fmt_mb(b):
  return "-" if b is None else f"{b / 2**20:,.1f}"


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def step_of(row: dict) -> float:
  """The step time a row's speed-up uses: the mean (block methods, whose mean is the
  visit-weighted one) or the median."""
  return row["mean_step_s"] if "block_median_s" in row else row["median_step_s"]


class Ratio(NamedTuple):
  """A ratio of row ``a`` to row ``b`` of a run: its name, its value from the two
  rows, how it is computed."""
  name: str
  a: str
  b: str
  value: Callable[[dict, dict], float | None]
  how: str


def _steps(a: str, b: str, how: str) -> Ratio:
  """Row ``a``'s step time over row ``b``'s (each the one its speed-up uses)."""
  return Ratio(f"{a} step / {b} step", a, b, lambda x, y: step_of(x) / step_of(y), how)


def _flops_per_s(x: dict, y: dict) -> float | None:
  x, y = x.get("flops_per_s"), y.get("flops_per_s")
  return None if x is None or y is None else x / y


RATIOS = (
    Ratio("absignsgd speed-up vs adamw", "absignsgd", "adamw",
          lambda a, _: a["speedup_vs_adamw"], "adamw median / absignsgd mean"),
    Ratio("absignsgd memory / adamw", "absignsgd", "adamw",
          lambda a, _: a["memory_ratio_vs_adamw"], "compiled bytes, largest program"),
    Ratio("absignsgd compile + 100 steps / 100 adamw steps", "absignsgd", "adamw",
          lambda a, w: a["compile_plus_100_steps_s"] / (100 * step_of(w)),
          "(absignsgd compile_s + 100 x mean) / (100 x adamw median), from this run's "
          "figures"),
    _steps("absignsgd", "forward", "absignsgd mean / forward median"),
    Ratio("absignsgd FLOP/s / forward FLOP/s", "absignsgd", "forward", _flops_per_s,
          "matmul FLOPs per second of each (absignsgd: the model's visit-weighted "
          "FLOPs over its mean step; forward: the compiled program's over its median)"),
    _steps("absignsgd", "torch_block_sign", "means over the same visit frequencies"),
    _steps("adamw", "torch_adamw", "medians"),
)


def ratios(rows: Rows) -> list[dict[str, Any]]:
  """The :data:`RATIOS` that a run's rows (``{name: row}``) can give."""
  out = []
  for ratio in RATIOS:
    if ratio.a in rows and ratio.b in rows:
      value = ratio.value(rows[ratio.a], rows[ratio.b])
      if value is not None:
        out.append({"ratio": ratio.name, "value": float(value), "how": ratio.how})
  return out


def markdown(r: dict) -> str:
  """The report of a timed run."""
  mi = r["machine"]
  env = [f"{k.upper()}={mi[k]}" for k in ("xla_flags", "ld_preload") if mi.get(k)]
  env.insert(0, f"allocator {mi.get('allocator', 'system')}")
  lines = [
      f"### Step time and memory: {r['preset']} (N = {r['n_layers']}, "
      f"{r['num_params'] / 1e6:.1f}M params, {r['dtype']}), batch {r['batch']} x "
      f"seq {r['seq']}, {r['layout']} layout, dispatch {r['dispatch']}",
      "",
      f"Machine: {mi['backend']} / {mi.get('cpu', mi['device'])} ({mi['cpu_count']} "
      f"cores), jax {mi['jax']}, flax {mi['flax']}, optax {mi['optax']}"
      + (f"; 1-min load average {mi['load_avg_start'][0]:.1f} at the start, "
         f"{mi['load_avg'][0]:.1f} at the end"
         if mi.get("load_avg_start") and "load_avg" in mi else "")
      + (f"; {', '.join(env)}" if env else "") + f". Run took {r['wall_s']:.0f} s.",
      f"Command: `{r['command']}`",
      "",
      "| method | median step (s) | mean step (s) | speed-up vs adamw | cost model | "
      "memory (MiB) | memory / adamw | opt state (MiB) | compile (s) | programs | "
      "compile + 100 steps (s) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in r["rows"]:
    lines.append(
        f"| {row['name']} | {row['median_step_s']:.4f} | {row['mean_step_s']:.4f} | "
        f"{_f(row['speedup_vs_adamw'], '.2f')}x | {row['model_speedup']:.2f}x | "
        f"{fmt_mb(row['memory_bytes'])} | {_f(row['memory_ratio_vs_adamw'], '.3f')} | "
        f"{fmt_mb(row['opt_state_bytes'])} | {row['compile_s']:.2f} | "
        f"{row['programs']} | {row['compile_plus_100_steps_s']:.1f} |")
  if r.get("torch_note"):
    lines += ["", f"PyTorch rows: {r['torch_note']}."]
  torch_rows = [row for row in r["rows"] if row.get("loss_check")]
  if torch_rows:
    row = torch_rows[0]
    lc = row["loss_check"]
    lines += ["", f"PyTorch rows: torch {row['torch']}, transformers "
              f"{row['transformers']}, LlamaForCausalLM with the JAX model's weights, "
              f"{row['torch_threads']} threads (torch.set_num_threads); loss on the "
              f"benchmark batch {lc['torch']:.6f} against JAX's {lc['jax']:.6f} "
              f"(relative difference {lc['relative_difference']:.1e}). Their memory is "
              "not a compiled program's and is not reported."]
  usage = [row for row in r["rows"] if row.get("cpu_user_s") is not None]
  if usage:
    lines += ["", "CPU per timed step (getrusage of the whole process, all threads):", "",
              "| method | wall (s) | user CPU (s) | kernel CPU (s) | minor page faults | "
              "involuntary switches |", "|---|---:|---:|---:|---:|---:|"]
    for row in usage:
      wall = (row["sequence_mean_step_s"] if "block_median_s" in row
              and row.get("sequence_mean_step_s") else row["mean_step_s"])
      lines.append(f"| {row['name']} | {wall:.4f} | {row['cpu_user_s']:.3f} | "
                   f"{row['cpu_sys_s']:.3f} | {row['minor_faults']:,.0f} | "
                   f"{row['involuntary_switches']:,.0f} |")
  efficiency = _efficiency(r)
  lines += efficiency
  gpu = [row for row in r["rows"] if row.get("device_memory")]
  if gpu:
    lines += ["", "Device peak memory (process peak after each method; methods run in "
              "ascending expected memory):", ""]
    lines += [f"- {row['name']}: "
              f"{fmt_mb(row['device_memory'].get('peak_bytes_in_use'))} MiB"
              for row in gpu]
  found = ratios({row["name"]: row for row in r["rows"]})
  if found:
    lines += ["", "Ratios:", "", "| ratio | value | how |", "|---|---:|---|"]
    lines += [f"| {x['ratio']} | {x['value']:.3f} | {x['how']} |" for x in found]
  cs = r.get("compile_study")
  if cs:
    lines += ["", "Compile study (empty caches, compilation included):", "",
              "| method | steps | wall-clock (s) | programs compiled | compile (s) |",
              "|---|---:|---:|---:|---:|"]
    for m in ("absignsgd", "adamw"):
      if m in cs:
        c = cs[m]
        lines.append(f"| {m} | {c['steps']} | {c['wall_s']:.2f} | "
                     f"{c['programs_compiled']} | {_f(c['compile_s'], '.2f')} |")
    if "absignsgd_faster" in cs:
      lines.append("")
      lines.append(f"absignsgd total {'<' if cs['absignsgd_faster'] else '>='} adamw "
                   f"total (adamw / absignsgd = {cs['ratio_adamw_over_absignsgd']:.2f}).")
  ds = r.get("dispatch_study")
  if ds:
    lines += ["", "Dispatch study (absignsgd depth-biased):", "",
              "| layout | dispatch | programs | compile (s) | mean step (s) | "
              "median step (s) | memory (MiB) | compile + 100 steps (s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in ds:
      lines.append(f"| {e['layout']} | {e['dispatch']} | {e['programs']} | "
                   f"{e['compile_s']:.2f} | {e['mean_step_s']:.4f} | "
                   f"{_f(e['median_step_s'], '.4f')} | {fmt_mb(e['memory_bytes'])} | "
                   f"{e['compile_plus_100_steps_s']:.1f} |")
  rs = r.get("residual_study")
  if rs:
    lines += ["", "Residual study (absignsgd depth-biased, layers kept above the "
              f"active one; timed interleaved with a forward of median "
              f"{rs[0]['forward_median_s']:.4f} s):", "",
              "| residuals (k) | mean step (s) | step / forward | memory (MiB) | "
              "memory / adamw |", "|---:|---:|---:|---:|---:|"]
    for e in rs:
      lines.append(f"| {e['residuals']} | {e['mean_step_s']:.4f} | "
                   f"{_f(e['step_over_forward'], '.3f')} | {fmt_mb(e['memory_bytes'])} "
                   f"| {_f(e['memory_ratio_vs_adamw'], '.3f')} |")
  lines += [
      "",
      "Mean step: full backprop and forward, the mean of the timed steps; block "
      "methods, the expected step time over a full schedule period (per-block medians "
      "weighted by the scheme's visit frequencies; torch_block_sign follows "
      "absignsgd's schedule). Speed-up: adamw's median over the mean (block methods) "
      "or the median (the others). Cost model, in layer forwards: full backprop 3N, "
      "block i N + (N-1-i) + 2; LoRA 2N; forward N. Memory: the compiled step's "
      "argument + output + temp - alias bytes (largest program). Compile + 100 steps: "
      "compile time plus 100 times the step time the speed-up uses, from this run's "
      "figures (the opt-in compile study measures it as wall-clock)."
      + (" FLOPs: the matmul FLOPs of one step, counted in the compiled program (hlo) "
         "or, where one program serves every block, from the layer shapes (model, "
         "visit-weighted); FLOP/s divides them by the step time the speed-up uses."
         if efficiency else ""),
  ]
  return "\n".join(lines) + "\n"


def _efficiency(r: dict) -> list[str]:
  """The FLOPs table: per step, per second and as a fraction of the matmul peak."""
  rows = [row for row in r["rows"] if row.get("flops") is not None]
  peak = r["machine"].get("matmul_peak")
  if not rows or not peak:
    return []
  lines = ["", f"Matmul FLOPs (peak: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s, a "
           f"{peak['size']} x {peak['size']} {peak['dtype']} matmul, the faster of its "
           "timings at the start and the end of the run):", "",
           "| method | GFLOP per step | from | GFLOP/s | fraction of peak |",
           "|---|---:|---|---:|---:|"]
  for row in rows:
    lines.append(f"| {row['name']} | {row['flops'] / 1e9:,.3f} | {row['flops_source']} "
                 f"| {row['flops_per_s'] / 1e9:,.2f} | {row['fraction_of_peak']:.3f} |")
  return lines


def memory_markdown(r: dict) -> str:
  """The report of a ``--memory-only`` result."""
  lines = [f"### Compiled memory (no run): {r['preset']} ({r['num_params'] / 1e6:,.1f}M "
           f"params, {r['dtype']}, remat={r['remat']}, loss_chunk={r['loss_chunk']}), "
           f"batch {r['batch']} x seq {r['seq']}, {r['layout']} layout, compiled for "
           f"{r['machine']['backend']}", "",
           "| method | memory (MiB) | memory / adamw | temp (MiB) | opt state (MiB) |",
           "|---|---:|---:|---:|---:|"]
  for row in r["rows"]:
    ratio = row["memory_ratio_vs_adamw"]
    lines.append(f"| {row['name']} | {fmt_mb(row['memory_bytes'])} | "
                 f"{'-' if ratio is None else f'{ratio:.3f}'} | "
                 f"{fmt_mb(row['memory_detail'].get('temp'))} | "
                 f"{fmt_mb(row['opt_state_bytes'])} |")
  return "\n".join(lines) + "\n"


def render(result: dict) -> str:
  """The Markdown of either kind of result (a timed run has ``wall_s``)."""
  return markdown(result) if "wall_s" in result else memory_markdown(result)


def write(result: dict, path: str) -> str:
  """Writes ``result``'s Markdown to ``path``; returns it."""
  md = render(result)
  with open(path, "w") as fh:
    fh.write(md)
  return md


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("result", help="a step_time_*.json or memory_*.json")
  p.add_argument("--out", default=None,
                 help="where to write the Markdown (default: the JSON's path with .md)")
  args = p.parse_args(argv)
  with open(args.result) as fh:
    result = json.load(fh)
  out = args.out or os.path.splitext(args.result)[0] + ".md"
  md = write(result, out)
  print(md, end="")
  return md


if __name__ == "__main__":
  main()
