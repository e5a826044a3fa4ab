"""How the step time and compiled memory of AdamW, ABSignSGD, BAdam and LoRA scale.

The study runs ``benchmarks/step_time.py`` once per piece, a (model, sequence length)
pair of the grid, each in its own process, and gathers the pieces into one report:

* models: SmolLM2-135M (``smollm2-135m``), Gemma 3 270M (``gemma3-270m``) and a Llama
  of 1.24B parameters (``llama-1b``, Llama 3.2 1B's shape), random weights, float32;
* sequence lengths 128, 512 and 2048 at batch 4;
* rows ``forward``, ``adamw``, ``absignsgd``, ``block_adam`` and ``lora``.

A piece is **timed** (step times and compiled bytes) when the estimate below says it
fits the machine: AdamW's step at most ``--max-step-s``, the timed run at most
``--max-piece-s`` (with ``--steps``/``--sequence-steps``, or else with 2 of each) and
its resident memory at most ``--max-memory-gb``. Otherwise it is **memory-only**
(``step_time.py --memory-only``: compiled bytes from shapes, nothing allocated or
timed). The reason is written into the result; ``--timed-pieces`` and
``--memory-only-pieces`` override the choice. A piece whose JSON exists is read, not
run again (``--force`` reruns it), so an interrupted study resumes where it stopped.

The estimate, for the float32 programs that ``step_time.py`` compiles by default:

* time: FLOPs per token of a layer's forward ``2 x its parameters + 4 T x heads x
  head_dim`` (the attention scores of every key), of the head ``2 x vocab x dim``;
  AdamW ``3x`` the forward, LoRA ``2x``, block ``i`` of ``N`` ``(2N + 1 - i)`` layer
  forwards and ``2.5x`` the head's; divided by ``--gflops`` (75: AdamW's rate on
  SmolLM2-135M at batch 4 x 128, 5.7 s a step on a 2-core AMD EPYC with glibc's
  malloc). A timed piece runs every method once to warm up, ``--steps`` steps of the
  full-backprop methods, every block of every block method once (``step_time.py``
  times block methods block by block) and ``--sequence-steps`` scheduled steps, plus
  start-up, weight initialisation and compilation (8 s per method);
* memory: AdamW's compiled bytes ``16 x params`` (weights, gradients, two moments)
  ``+ 8 x layer params + 4 x tokens x (layers x (12 dim + 6 mlp + 4 heads x head_dim
  + 2.5 heads x T) + 3 vocab)``, the constants fitted to XLA:CPU's compiled sizes of
  the three models at the three lengths, which it overestimates by up to 35%. ``step_time.py`` times the methods interleaved on
  the CPU, all in memory at once: the timed run also holds one copy of the weights per
  other method and the host's copy.

With the defaults the study times SmolLM2-135M at 128 (5 + 5 steps, about 6 minutes)
and Gemma 3 270M at 128 (2 + 2 steps, about 8 minutes) and compiles the other seven
pieces for their sizes (about a minute each; 40-55 s measured): about 20 minutes in
all on a 2-core 24 GB CPU machine, by the estimate (``--dry-run`` prints the plan and
its estimate).

Writes under ``--out``: one folder per piece (``<model>_seq<T>``, with
``step_time.py``'s JSON and Markdown and the run's log), ``scaling.json`` (every
piece: parameters, tokens per step, mode, reason, estimate and per method the step
time, compiled bytes and their ratios to AdamW's), ``scaling.md`` (one table per
metric, the trends in sentences computed from the figures) and the plots
``scaling_speedup.png`` and ``scaling_memory.png`` (each ratio against parameters, a
line per sequence length, and against tokens per step, a line per model).

Usage::

    python benchmarks/scaling.py --out runs/scaling                  # the default study
    python benchmarks/scaling.py --dry-run                           # the plan only
    python benchmarks/scaling.py --models smollm2-135m --seqs 128,512 \\
        --timed-pieces smollm2-135m:512 --steps 2 --sequence-steps 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import jax

from absign_jax import profiling
from absign_jax.llm import registry
from absign_jax.llm.model import PRESETS, LlamaConfig

STEP_TIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_time.py")
MODELS = ("smollm2-135m", "gemma3-270m", "llama-1b")
SEQS = (128, 512, 2048)
BATCH = 4
METHODS = ("forward", "adamw", "absignsgd", "block_adam", "lora")
# step_time.py's JAX rows: the forward and the registry's benchmarked optimizers.
KNOWN_METHODS = ("forward",) + tuple(
    n for n, o in registry.OPTIMIZERS.items() if o.benchmarked)
REFERENCE = "adamw"
TIMED, MEMORY_ONLY = "timed", "memory-only"
# Options the study sets on every piece; --step-time-args may not repeat them.
STUDY_OPTIONS = ("--preset", "--batch", "--seq", "--methods", "--out", "--memory-only",
                 "--steps", "--sequence-steps")
# Carried from a piece's rows where step_time.py reports them.
EXTRA_FIELDS = ("flops", "flops_per_s", "fraction_of_peak")

# The estimate (see the module docstring).
GFLOPS = 75.0
START_S = 15.0      # a piece's process: imports, model shapes, writing its output
COMPILE_S = 8.0     # per method
INIT_PARAMS_PER_S = 50e6  # eager random initialisation of the weights
REDUCED_STEPS = 2
HOLD = 0.05  # a ratio within 5% from first to last holds


# ---------------------------------------------------------------------------------
# the estimate and the plan
# ---------------------------------------------------------------------------------


def _is_block(method: str) -> bool:
  return method in registry.OPTIMIZERS and registry.get(method).block


def _layer_params(cfg: LlamaConfig) -> float:
  """Parameters of one transformer layer (the embedding, head and final norm out)."""
  emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
  return (cfg.num_params() - emb - cfg.dim) / cfg.n_layers


def estimate(cfg: LlamaConfig, batch: int, seq: int, methods: Sequence[str],
             steps: int, sequence_steps: int, gflops: float = GFLOPS,
             interleaved: bool = True) -> dict[str, float]:
  """Seconds and bytes a piece is expected to take (see the module docstring).

  Returns:
    ``adamw_step_s``, ``adamw_bytes`` (its compiled size), ``resident_bytes`` (what
    the timed run holds at once), ``timed_s`` and ``memory_only_s`` (the whole
    ``step_time.py`` run either way).
  """
  n, tokens, p = cfg.n_layers, batch * seq, cfg.num_params()
  layer_p = _layer_params(cfg)
  f_layer = 2 * layer_p + 4 * seq * cfg.n_heads * cfg.head_size
  f_head = 2 * cfg.vocab_size * cfg.dim
  per_s = tokens / (gflops * 1e9)
  fwd = (n * f_layer + f_head) * per_s
  blocks = [((2 * n + 1 - i) * f_layer + 2.5 * f_head) * per_s for i in range(n)]
  block_mean = sum(blocks) / n
  cost = {m: block_mean if _is_block(m) else
          {"forward": fwd, "lora": 2 * fwd}.get(m, 3 * fwd) for m in methods}
  full = [m for m in methods if not _is_block(m)]
  n_block = len(methods) - len(full)
  timed = (START_S + COMPILE_S * len(methods) + p / INIT_PARAMS_PER_S
           + sum(cost.values()) + (fwd if "forward" in methods else 0.0)
           + steps * sum(cost[m] for m in full)
           + n_block * (sum(blocks) + sequence_steps * block_mean))
  per_token = (cfg.n_layers * (12 * cfg.dim + 6 * cfg.hidden_dim
                               + 4 * cfg.n_heads * cfg.head_size
                               + 2.5 * cfg.n_heads * seq) + 3 * cfg.vocab_size)
  adamw_bytes = 16 * p + 8 * n * layer_p + 4 * tokens * per_token
  others = (len(methods) - (REFERENCE in methods)) if interleaved else 0
  return {"adamw_step_s": 3 * fwd, "adamw_bytes": adamw_bytes,
          "resident_bytes": adamw_bytes + 4 * p * (others + 1),
          "timed_s": timed, "memory_only_s": START_S + COMPILE_S * len(methods)}


def _gb(b: float) -> str:
  return f"{b / 1e9:.1f} GB"


def _min(s: float) -> str:
  return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def plan_piece(model: str, seq: int, args, forced: str | None,
               interleaved: bool) -> dict[str, Any]:
  """Whether a piece is timed, with how many steps, and why."""
  cfg = LlamaConfig.preset(model)
  ladder = [(args.steps, args.sequence_steps),
            (min(args.steps, REDUCED_STEPS), min(args.sequence_steps, REDUCED_STEPS))]
  ests = [estimate(cfg, args.batch, seq, args.methods, s, q, args.gflops, interleaved)
          for s, q in ladder]
  i = next((k for k, e in enumerate(ests) if e["timed_s"] <= args.max_piece_s),
           len(ests) - 1)
  (steps, seq_steps), est = ladder[i], ests[i]
  checks = [
      (est["adamw_step_s"] <= args.max_step_s,
       f"adamw step {est['adamw_step_s']:.1f} s", f"{args.max_step_s:g} s"),
      (est["timed_s"] <= args.max_piece_s,
       f"timed run {_min(est['timed_s'])}", _min(args.max_piece_s)),
      (est["resident_bytes"] <= args.max_memory_gb * 1e9,
       f"timed run's memory {_gb(est['resident_bytes'])}", f"{args.max_memory_gb:g} GB"),
  ]
  fits = all(ok for ok, _, _ in checks)
  said = "; ".join(f"{what} {'<=' if ok else '>'} {limit}" for ok, what, limit in checks)
  if forced:
    mode = forced
    reason = (f"asked for (--{'timed' if forced == TIMED else 'memory-only'}-pieces);"
              f" estimate: {said}")
  else:
    mode = TIMED if fits else MEMORY_ONLY
    reason = f"estimate: {said}"
  if i > 0:
    reason += f" (a timed run with {ladder[i][0]} + {ladder[i][1]} steps)"
  return {"model": model, "seq": seq, "batch": args.batch,
          "params": cfg.num_params(), "n_layers": cfg.n_layers,
          "tokens_per_step": args.batch * seq, "mode": mode, "reason": reason,
          "steps": steps if mode == TIMED else None,
          "sequence_steps": seq_steps if mode == TIMED else None,
          "estimate": dict(est, expected_s=est["timed_s"] if mode == TIMED
                           else est["memory_only_s"])}


def plan(args) -> list[dict[str, Any]]:
  """Every piece of the grid, the models by size and the lengths ascending."""
  interleaved = jax.default_backend() == "cpu"  # step_time.py's --interleave auto
  pieces = []
  for model in args.models:
    for seq in args.seqs:
      key = f"{model}:{seq}"
      forced = (TIMED if key in args.timed_pieces
                else MEMORY_ONLY if key in args.memory_only_pieces else None)
      pieces.append(plan_piece(model, seq, args, forced, interleaved))
  return pieces


# ---------------------------------------------------------------------------------
# running and reading the pieces
# ---------------------------------------------------------------------------------


def piece_dir(out: str, piece: dict) -> str:
  return os.path.join(out, f"{piece['model']}_seq{piece['seq']}")


def _result_paths(out: str, piece: dict) -> dict[str, str]:
  d = piece_dir(out, piece)
  return {TIMED: os.path.join(d, f"step_time_{piece['model']}.json"),
          MEMORY_ONLY: os.path.join(d, f"memory_{piece['model']}.json")}


def _usable(path: str, piece: dict, methods: Sequence[str]) -> str | None:
  """Why the result at ``path`` does not answer ``piece`` (None: it does)."""
  try:
    with open(path) as fh:
      result = json.load(fh)
  except (OSError, ValueError) as e:
    return f"unreadable ({e})"
  names = {r.get("name") for r in result.get("rows", [])}
  if (result.get("batch"), result.get("seq")) != (piece["batch"], piece["seq"]):
    return (f"it is for batch {result.get('batch')} x seq {result.get('seq')}, not "
            f"{piece['batch']} x {piece['seq']}")
  missing = [m for m in methods if m not in names]
  return f"it has no rows {missing}" if missing else None


def piece_command(piece: dict, args) -> list[str]:
  cmd = [sys.executable, STEP_TIME, "--preset", piece["model"],
         "--batch", str(piece["batch"]), "--seq", str(piece["seq"]),
         "--methods", ",".join(args.methods), "--out", piece_dir(args.out, piece)]
  if piece["mode"] == TIMED:
    cmd += ["--steps", str(piece["steps"]),
            "--sequence-steps", str(piece["sequence_steps"])]
  else:
    cmd.append("--memory-only")
  return cmd + args.step_time_args


def run_piece(piece: dict, args, log) -> None:
  """Runs ``step_time.py`` for ``piece``, its output streamed to the log file and
  ours; fills in ``piece``'s ``wall_s`` (and ``error`` when the run fails)."""
  d = piece_dir(args.out, piece)
  os.makedirs(d, exist_ok=True)
  cmd = piece_command(piece, args)
  piece["command"] = shlex.join(["python", os.path.relpath(STEP_TIME)] + cmd[2:])
  log_path = os.path.join(d, "step_time.log")
  t0 = time.perf_counter()
  last = ""
  with open(log_path, "w") as fh, subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
    for line in proc.stdout:
      fh.write(line)
      log("    | " + line.rstrip("\n"))
      last = line.strip() or last
  piece["wall_s"] = time.perf_counter() - t0
  where = f"(log: {os.path.relpath(log_path, args.out)})"
  result = _result_paths(args.out, piece)[piece["mode"]]
  if proc.returncode:
    # The last line holds argparse's error or the exception.
    piece["error"] = f"step_time.py exited with {proc.returncode} {where}: {last[-400:]}"
  elif not os.path.exists(result):
    piece["error"] = f"step_time.py wrote no {os.path.basename(result)} {where}"


def collect(piece: dict, path: str, out: str, methods: Sequence[str]) -> None:
  """Reads a piece's ``step_time.py`` JSON into ``piece["rows"]``: per method the
  step time the speed-up uses, compiled bytes and both ratios to AdamW's."""
  with open(path) as fh:
    result = json.load(fh)
  piece["result"] = os.path.relpath(path, out)
  piece["measured"] = datetime.datetime.fromtimestamp(
      os.path.getmtime(path)).isoformat(timespec="seconds")
  piece["piece_machine"] = result.get("machine")
  piece["piece_command"] = result.get("command")
  if piece["mode"] == TIMED:  # the steps the result was timed with (it may be older)
    piece["steps"] = result.get("steps", piece["steps"])
    piece["sequence_steps"] = result.get("sequence_steps", piece["sequence_steps"])
  rows = {r["name"]: r for r in result["rows"]}
  ref = rows.get(REFERENCE, {})
  out = {}
  for m in methods:
    r = rows.get(m)
    if r is None:
      continue
    timed = r.get("median_step_s") is not None
    step = (r["mean_step_s"] if _is_block(m) else r["median_step_s"]) if timed else None
    speedup = r.get("speedup_vs_adamw")
    if speedup is None and step and ref.get("median_step_s"):
      speedup = ref["median_step_s"] / step
    mem_ratio = r.get("memory_ratio_vs_adamw")
    if mem_ratio is None and r.get("memory_bytes") and ref.get("memory_bytes"):
      mem_ratio = r["memory_bytes"] / ref["memory_bytes"]
    out[m] = {"step_s": step, "median_step_s": r.get("median_step_s"),
              "mean_step_s": r.get("mean_step_s"),
              "memory_bytes": r.get("memory_bytes"), "speedup_vs_adamw": speedup,
              "memory_ratio_vs_adamw": mem_ratio,
              **{k: r[k] for k in EXTRA_FIELDS if r.get(k) is not None}}
  piece["rows"] = out


def run_study(pieces: list[dict], args, log) -> None:
  """Reads or runs every piece, in order."""
  for k, piece in enumerate(pieces, 1):
    paths = _result_paths(args.out, piece)
    name = f"[{k}/{len(pieces)}] {piece['model']} seq {piece['seq']}"
    # A timed result answers a memory-only piece too; a memory-only one only that.
    kinds = [TIMED] + ([MEMORY_ONLY] if piece["mode"] == MEMORY_ONLY else [])
    found = None
    if not args.force:
      for kind in kinds:
        if os.path.exists(paths[kind]):
          why = _usable(paths[kind], piece, args.methods)
          if why is None:
            found = kind
            break
          log(f"{name}: not reading {os.path.relpath(paths[kind], args.out)}: {why}")
    if found:
      if found != piece["mode"]:
        piece["reason"] += "; a timed result was already there"
      piece.update(mode=found, source="read")
      log(f"{name}: {found}, read from {os.path.relpath(paths[found], args.out)}")
    else:
      log(f"{name}: {piece['mode']} ({piece['reason']}), expected "
          f"{_min(piece['estimate']['expected_s'])}")
      run_piece(piece, args, log)
      piece["source"] = "run"
      if "error" in piece:
        log(f"{name}: FAILED: {piece['error']}")
        continue
      log(f"{name}: done in {_min(piece['wall_s'])}")
    collect(piece, paths[piece["mode"]], args.out, args.methods)


# ---------------------------------------------------------------------------------
# trends, tables, plots
# ---------------------------------------------------------------------------------

METRICS = {  # key -> (table title, sentence name, format, higher is the win)
    "step_s": ("Step time (s): the median (full backprop, forward) or the "
               "schedule-weighted mean (block methods)", "step time", "{:.3f}", None),
    "speedup_vs_adamw": ("Speed-up vs adamw (adamw's median step / the method's step)",
                         "speed-up", "{:.2f}x", True),
    "memory_bytes": ("Compiled memory (MiB): argument + output + temp - alias bytes of "
                     "the largest program", "memory", None, None),
    "memory_ratio_vs_adamw": ("Memory / adamw (compiled bytes)", "memory ratio",
                              "{:.3f}", False),
}


def fmt_params(p: float) -> str:
  if p >= 1e9:
    return f"{p / 1e9:.2f}B"
  if p >= 1e6:
    return f"{p / 1e6:.0f}M" if p >= 1e8 else f"{p / 1e6:.1f}M"
  return f"{p / 1e3:.0f}K"


def _fmt(metric: str, v: Any) -> str:
  if v is None:
    return "-"
  if metric == "memory_bytes":
    return f"{v / 2**20:,.1f}"
  return METRICS[metric][2].format(v)


def trainers(methods: Sequence[str]) -> list[str]:
  """The methods compared with AdamW in the trends and plots."""
  return [m for m in methods if m not in (REFERENCE, "forward")]


def _trend(method: str, metric: str, points: list[tuple[str, float]], where: str,
           along: str) -> str:
  """One sentence: ``points`` are (label, value) from the smallest to the largest."""
  name, spec, higher_wins = METRICS[metric][1:]
  vals = [spec.format(v) for _, v in points]
  (first_at, first), (last_at, last) = points[0], points[-1]
  change = last / first - 1
  if abs(change) <= HOLD:
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    motion = (f"stays between {spec.format(lo)} and {spec.format(hi)} from {first_at} "
              f"to {last_at}")
    verdict = "holds"
  else:
    middle = "".join(f" through {v} at {at}" for (at, _), v in
                     zip(points[1:-1], vals[1:-1]))
    ys = [v for _, v in points]
    steps = [b - a for a, b in zip(ys, ys[1:])]
    monotonic = all(d >= 0 for d in steps) or all(d <= 0 for d in steps)
    motion = (f"{'rises' if change > 0 else 'falls'}"
              f"{'' if monotonic else ', not monotonically,'} from {vals[0]} at "
              f"{first_at}{middle} to {vals[-1]} at {last_at}")
    verdict = "grows" if (change > 0) == higher_wins else "shrinks"
  return f"{where}{method}'s {name} {motion}: its win over adamw {verdict} with {along}."


def trends(pieces: list[dict], methods: Sequence[str]) -> dict[str, list[str]]:
  """Sentences from the figures: each ratio along model size at every length, and
  along the length for every model (where two or more pieces have it)."""
  models = sorted({p["model"] for p in pieces},
                  key=lambda m: PRESETS[m].num_params())
  seqs = sorted({p["seq"] for p in pieces})
  by = {(p["model"], p["seq"]): p for p in pieces}
  out: dict[str, list[str]] = {}

  def value(method, metric, model, seq):
    return by.get((model, seq), {}).get("rows", {}).get(method, {}).get(metric)

  for metric in ("speedup_vs_adamw", "memory_ratio_vs_adamw"):
    lines = []
    for m in trainers(methods):
      for seq in seqs:
        pts = [(fmt_params(PRESETS[model].num_params()), value(m, metric, model, seq))
               for model in models]
        pts = [(a, v) for a, v in pts if v is not None]
        if len(pts) >= 2:
          lines.append(_trend(m, metric, pts, f"At seq {seq}, ", "model size"))
      for model in models:
        pts = [(f"seq {seq}", value(m, metric, model, seq)) for seq in seqs]
        pts = [(a, v) for a, v in pts if v is not None]
        if len(pts) >= 2:
          lines.append(_trend(m, metric, pts, f"On {model}, ", "sequence length"))
    if not lines:
      have = [f"{p['model']} at {p['seq']}" for p in pieces
              if any(r.get(metric) for r in p.get("rows", {}).values())]
      lines.append(f"No trend: fewer than two pieces along any axis have a "
                   f"{METRICS[metric][1]} (pieces with one: "
                   f"{', '.join(have) or 'none'}).")
    out[metric] = lines
  return out


def markdown(study: dict) -> str:
  pieces, methods = study["pieces"], study["methods"]
  cols = [f"{p['model']}, {p['seq']}" for p in pieces]
  lines = [
      f"# Scaling: step time and memory against adamw, batch {study['batch']}", "",
      f"{study['date']}. Command: `{study['command']}`", "",
      f"Machine: {_machine(study['machine'])}.", "",
      "## Pieces", "",
      "| model | seq | params | tokens / step | mode | steps | source | run (s) | why |",
      "|---|---:|---:|---:|---|---|---|---:|---|"]
  for p in pieces:
    steps = f"{p['steps']} + {p['sequence_steps']}" if p["steps"] else "-"
    wall = f"{p['wall_s']:.0f}" if p.get("wall_s") else "-"
    why = p["reason"] + (f" **FAILED: {p['error']}**" if p.get("error") else "")
    lines.append(f"| {p['model']} | {p['seq']} | {fmt_params(p['params'])} | "
                 f"{p['tokens_per_step']:,} | {p['mode']} | {steps} | "
                 f"{p.get('source', '-')} | {wall} | {why} |")
  lines += ["", "Steps: timed steps of the full-backprop methods + steps of the block "
            "methods along their schedules (besides one timing of every block). "
            "Memory-only pieces compile every method from shapes and time nothing."]
  other = sorted({_machine(p["piece_machine"]) for p in pieces if p.get("piece_machine")}
                 - {_machine(study["machine"])})
  if other:
    lines += ["", f"Some pieces ran on another machine: {'; '.join(other)}."]
  for metric, (title, *_rest) in METRICS.items():
    lines += ["", f"## {title}", "", "| method | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for m in methods:
      cells = [_fmt(metric, p.get("rows", {}).get(m, {}).get(metric)) for p in pieces]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
  if any(r.get("flops_per_s") for p in pieces for r in p.get("rows", {}).values()):
    lines += ["", "## Matmul rate: GFLOP/s (fraction of the machine's peak)", "",
              "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in methods:
      cells = []
      for p in pieces:
        r = p.get("rows", {}).get(m, {})
        rate, frac = r.get("flops_per_s"), r.get("fraction_of_peak")
        cells.append("-" if rate is None else f"{rate / 1e9:.1f}" + (
            "" if frac is None else f" ({frac:.2f})"))
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "## Where the win grows, holds or shrinks", "",
            "The models differ in more than size (vocabulary, widths, attention), so "
            "\"with model size\" follows these models in order of parameters.", ""]
  for metric, sentences in study["trends"].items():
    lines += [f"{METRICS[metric][1].capitalize()} (a change within "
              f"{HOLD:.0%} from first to last holds):", ""]
    lines += [f"* {s}" for s in sentences] + [""]
  lines += ["Plots: `scaling_speedup.png`, `scaling_memory.png`."]
  return "\n".join(lines) + "\n"


def _machine(info: dict) -> str:
  return (f"{info.get('backend')} / {info.get('cpu') or info.get('device')} "
          f"({info.get('cpu_count')} cores), jax {info.get('jax')}")


def plot(study: dict, metric: str, path: str) -> None:
  """A row of two panels per method: ``metric`` against parameters (a line per
  sequence length) and against tokens per step (a line per model)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  pieces = [p for p in study["pieces"] if p.get("rows")]
  methods = trainers(study["methods"])
  title, name = METRICS[metric][:2]
  fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.2 * len(methods)),
                           squeeze=False)
  for row, m in zip(axes, methods):
    for ax, x_key, group_key, label in (
        (row[0], "params", "seq", lambda g: f"seq {g}"),
        (row[1], "tokens_per_step", "model", str)):
      groups = sorted({p[group_key] for p in pieces},
                      key=lambda g: PRESETS[g].num_params() if group_key == "model"
                      else g)
      drawn = False
      for g in groups:
        pts = sorted((p[x_key], p["rows"].get(m, {}).get(metric)) for p in pieces
                     if p[group_key] == g)
        pts = [(x, y) for x, y in pts if y]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=label(g))
          drawn = True
      ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
      ax.set_ylim(bottom=0)
      ax.set_xscale("log")
      ax.set_xlabel("parameters" if x_key == "params" else "tokens per step")
      ax.set_ylabel(f"{m}: {name}")
      if drawn:
        ax.legend(fontsize=8)
      else:
        ax.text(0.5, 0.5, "no timed pieces" if metric == "speedup_vs_adamw"
                else "no data", ha="center", va="center", transform=ax.transAxes)
  fig.suptitle(f"{title}; batch {study['batch']}; dashed: adamw", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def _list(p, flag: str, text: str, convert=str) -> list:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items:
    p.error(f"{flag}: give a comma-separated list, got {text!r}")
  return [convert(s) for s in items]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS),
                 help=f"presets, comma-separated (default: {','.join(MODELS)})")
  p.add_argument("--seqs", default=",".join(map(str, SEQS)),
                 help="sequence lengths, comma-separated (default: %(default)s)")
  p.add_argument("--batch", type=int, default=BATCH)
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"step_time.py rows; must include {REFERENCE} "
                      f"(default: %(default)s)")
  p.add_argument("--timed-pieces", default="", metavar="MODEL:SEQ,...",
                 help="pieces to time whatever the estimate says")
  p.add_argument("--memory-only-pieces", default="", metavar="MODEL:SEQ,...",
                 help="pieces to compile for their sizes only")
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps of the full-backprop methods (step_time.py --steps; "
                      "2 where the estimate needs fewer)")
  p.add_argument("--sequence-steps", type=int, default=5,
                 help="scheduled steps of the block methods (step_time.py "
                      "--sequence-steps; 2 where the estimate needs fewer)")
  p.add_argument("--gflops", type=float, default=GFLOPS,
                 help="the estimate's AdamW rate in GFLOP/s (default: %(default)s, a "
                      "2-core CPU)")
  p.add_argument("--max-step-s", type=float, default=30.0,
                 help="time a piece only if AdamW's step is estimated at most this")
  p.add_argument("--max-piece-s", type=float, default=480.0,
                 help="... and the whole timed run at most this")
  p.add_argument("--max-memory-gb", type=float, default=16.0,
                 help="... and the timed run's memory at most this")
  p.add_argument("--step-time-args", default="", metavar="ARGS",
                 help="more step_time.py options for every piece, one string (e.g. "
                      "'--compilation-cache DIR'); not those the study sets")
  p.add_argument("--force", action="store_true",
                 help="rerun pieces whose results exist")
  p.add_argument("--dry-run", action="store_true",
                 help="print the plan and its estimate; run and write nothing")
  p.add_argument("--out", default="runs/scaling")
  args = p.parse_args(argv)

  args.models = _list(p, "--models", args.models)
  unknown = [m for m in args.models if m not in PRESETS]
  if unknown:
    p.error(f"--models: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")

  def positive(s):
    if not s.isdigit() or int(s) < 1:
      p.error(f"--seqs: {s!r} is not a positive integer")
    return int(s)

  args.seqs = sorted(set(_list(p, "--seqs", args.seqs, positive)))
  args.methods = list(dict.fromkeys(_list(p, "--methods", args.methods)))
  bad = [m for m in args.methods if m not in KNOWN_METHODS]
  if bad:
    p.error(f"--methods: unknown method(s) {bad}; choose from {','.join(KNOWN_METHODS)}")
  if REFERENCE not in args.methods:
    p.error(f"--methods must include {REFERENCE}: every ratio is against it")
  for name in ("batch", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be at least 1")
  if args.sequence_steps < 0:
    p.error("--sequence-steps must be >= 0")
  for name in ("gflops", "max_step_s", "max_piece_s", "max_memory_gb"):
    if not getattr(args, name) > 0:
      p.error(f"--{name.replace('_', '-')} must be positive")

  grid = {f"{m}:{s}" for m in args.models for s in args.seqs}
  for flag in ("timed_pieces", "memory_only_pieces"):
    keys = [k.strip() for k in getattr(args, flag).split(",") if k.strip()]
    outside = [k for k in keys if k not in grid]
    if outside:
      p.error(f"--{flag.replace('_', '-')}: {outside} not in the grid; name pieces "
              f"MODEL:SEQ with a model of --models and a length of --seqs, e.g. "
              f"{args.models[0]}:{args.seqs[0]}")
    setattr(args, flag, set(keys))
  both = args.timed_pieces & args.memory_only_pieces
  if both:
    p.error(f"{sorted(both)} both in --timed-pieces and --memory-only-pieces")

  try:
    args.step_time_args = shlex.split(args.step_time_args)
  except ValueError as e:
    p.error(f"--step-time-args: {e}")
  clash = [a for a in args.step_time_args if a.split("=")[0] in STUDY_OPTIONS]
  if clash:
    p.error(f"--step-time-args: {clash} set by the study itself; use the study's "
            f"own options ({', '.join(STUDY_OPTIONS)} are set per piece)")
  args.argv = sys.argv[1:] if argv is None else list(argv)
  return args


def main(argv=None) -> dict:
  """Runs (or resumes) the study; returns what ``scaling.json`` holds."""
  args = parse_args(argv)

  def log(msg):
    print(msg, flush=True)

  pieces = plan(args)
  expected = sum(p["estimate"]["expected_s"] for p in pieces)
  command = "python benchmarks/scaling.py " + shlex.join(args.argv)
  if args.dry_run:
    for p in pieces:
      log(f"{p['model']} seq {p['seq']}: {p['mode']}, expected "
          f"{_min(p['estimate']['expected_s'])}; {p['reason']}")
    log(f"estimated total: {_min(expected)} (pieces already done take none)")
    return {"pieces": pieces, "estimated_s": expected}

  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  run_study(pieces, args, log)
  study = {
      "command": command,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": profiling.machine_info(),
      "batch": args.batch, "models": args.models, "seqs": args.seqs,
      "methods": args.methods,
      "settings": {k: getattr(args, k) for k in (
          "steps", "sequence_steps", "gflops", "max_step_s", "max_piece_s",
          "max_memory_gb", "step_time_args")},
      "estimated_s": expected, "wall_s": time.perf_counter() - t0,
      "pieces": pieces,
  }
  study["trends"] = trends(pieces, args.methods)
  with open(os.path.join(args.out, "scaling.json"), "w") as fh:
    json.dump(study, fh, indent=1)
  md = markdown(study)
  with open(os.path.join(args.out, "scaling.md"), "w") as fh:
    fh.write(md)
  plot(study, "speedup_vs_adamw", os.path.join(args.out, "scaling_speedup.png"))
  plot(study, "memory_ratio_vs_adamw", os.path.join(args.out, "scaling_memory.png"))
  log(f"\nwrote {os.path.join(args.out, 'scaling.json')}, scaling.md and the plots\n")
  log(md)
  failed = [p for p in pieces if p.get("error")]
  if failed:
    raise SystemExit("pieces failed: " + "; ".join(
        f"{p['model']} seq {p['seq']}: {p['error']}" for p in failed))
  return study


if __name__ == "__main__":
  main()
