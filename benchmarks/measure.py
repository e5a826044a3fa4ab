"""How ``step_time.py`` measures: step times, compiled memory, FLOPs, CPU usage, studies.

:func:`run` measures every method of a run and returns one result (the JSON that
``report.py`` turns into Markdown); :func:`memory_only` compiles every method's
programs from shapes alone and returns their sizes. The pieces:

* :func:`warm_up` compiles each of a runner's programs ahead of time (the compile
  time) and runs it once; :func:`time_methods` times the methods interleaved, with the
  CPU usage of every call; :func:`summarize_full` and :func:`summarize_block` reduce
  the times to a row (block methods: per-block medians weighted by the schedule's
  visit frequencies).
* :func:`runner_memory`: the largest program's ``memory_analysis()`` sizes.
* :func:`step_flops`: the matmul FLOPs of a step, from the compiled program where it
  has one count for every step, else from :class:`cost_model.FlopModel`.
* The opt-in studies: :func:`compile_study_run`, :func:`dispatch_study`,
  :func:`residual_study`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable

import absign_jax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_model  # noqa: E402  (benchmarks/cost_model.py)
import lora as lora_lib  # noqa: E402  (benchmarks/lora.py)
import runners as rn  # noqa: E402  (benchmarks/runners.py)
import torch_ref  # noqa: E402  (benchmarks/torch_ref.py)
from report import fmt_mb, step_of  # noqa: E402  (benchmarks/report.py)

from absign_jax import profiling  # noqa: E402

Log = Callable[[str], None]
COMPILE_PLUS = 100  # "compilation plus 100 steps"
# The matmul that measures the machine's peak (profiling.matmul_peak), in the model's
# dtype.
PEAK_SIZE = 2048


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _mean(xs):
  return float(statistics.fmean(xs)) if xs else None


def device_memory() -> dict | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - not every backend has it
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats}


# ---------------------------------------------------------------------------------
# one method: compile, time, size
# ---------------------------------------------------------------------------------


def aot_compile(runner, prog) -> tuple[float, Any]:
  """Seconds to trace, lower and compile one program ahead of time, and the program.

  The executable lands in the jit's cache, so the first call that follows does not
  compile again. Timed on its own, unlike "first call minus a step", so it does not
  inherit the noise of step times on a shared machine.
  """
  t = time.perf_counter()
  compiled = runner.lower(block=prog).compile()
  return time.perf_counter() - t, compiled


def warm_up(runner, n, compiled_first) -> dict:
  """Compiles every program of the step once (ahead of time) and runs it once.

  ``compiled_first``: {program: first-call seconds} already paid lazily (compile
  study). Returns the programs, their first-call times, AOT compile times and
  compiled executables (for their memory analysis).
  """
  programs = rn.programs_of(runner, n)
  first_calls = dict(compiled_first or {})
  aot: dict = {}
  executables: dict = {}
  for prog in programs:
    if prog not in first_calls:
      aot[prog], executables[prog] = aot_compile(runner, prog)
      first_calls[prog] = runner(block=prog)[0] if prog is not None else runner()[0]
  return {"programs": programs, "first_calls": first_calls, "aot": aot,
          "executables": executables}


def usage_summary(usage: list) -> dict:
  """Per-step means of the CPU usage deltas (:class:`absign_jax.profiling.CpuUsage`)."""
  if not usage:
    return {}
  return {"cpu_user_s": _mean([u.user_s for u in usage]),
          "cpu_sys_s": _mean([u.sys_s for u in usage]),
          "minor_faults": _mean([u.minor_faults for u in usage]),
          "involuntary_switches": _mean([u.involuntary_switches for u in usage])}


def summarize_full(times, warm) -> dict:
  med = _median(times)
  if warm is None:  # eager (PyTorch): nothing compiled
    return {"median_step_s": med, "mean_step_s": _mean(times),
            "sequence_mean_step_s": _mean(times), "timed_steps": len(times),
            "compile_s": 0.0, "programs": 0}
  (prog,) = warm["first_calls"]
  compile_s = warm["aot"].get(prog, max(warm["first_calls"][prog] - med, 0.0))
  return {"median_step_s": med, "mean_step_s": _mean(times),
          "sequence_mean_step_s": _mean(times), "timed_steps": len(times),
          "compile_s": compile_s, "programs": 1,
          "first_call_s": warm["first_calls"][prog]}


def summarize_block(method, n, per_block, seq, seq_blocks, warm, log: Log) -> dict:
  t_block = np.array([statistics.median(per_block[b]) for b in range(n)])
  f = cost_model.visit_frequencies(method, n)
  out = {"median_step_s": _median(seq) if seq else float(np.median(t_block)),
         "mean_step_s": float(np.sum(f * t_block)),
         "sequence_mean_step_s": _mean(seq),
         "timed_steps": len(seq) + sum(len(v) for v in per_block.values()),
         "block_median_s": [float(x) for x in t_block],
         "visit_frequency": [float(x) for x in f],
         "sequence_blocks": seq_blocks}
  log(f"  {method}: blocks {t_block.min():.4f}..{t_block.max():.4f} s, "
      f"schedule {seq_blocks[:12]}...")
  if warm is None:  # eager (PyTorch)
    return dict(out, compile_s=0.0, programs=0)
  first_calls, aot = warm["first_calls"], warm["aot"]
  steady = {prog: (t_block[prog] if prog is not None else float(np.median(t_block)))
            for prog in first_calls}
  # Programs compiled ahead of time: their AOT time; compiled lazily by the compile
  # study: first call minus the program's steady step time.
  compile_s = sum(aot[p] if p in aot else max(first_calls[p] - steady[p], 0.0)
                  for p in first_calls)
  return dict(out, compile_s=compile_s, programs=len(warm["programs"]),
              first_call_s=float(sum(first_calls.values())))


def time_methods(runners: dict, n: int, steps: int, repeats: int,
                 sequence_steps: int) -> tuple:
  """Times every method, interleaved so that all see the same machine load.

  ``max(steps, 1)`` rounds; each round runs one step of every full-backprop method
  and a share of the block timings (``repeats`` forced-active timings of every block
  of every block method, spread over the rounds, the methods in turn at each
  block). Then ``sequence_steps`` rounds of the block methods' own schedules (a
  method in ``cost_model.SCHEDULE`` runs the block its leader just ran: the same
  sequence). With one runner this is the sequential measurement. Every call's CPU
  usage (``getrusage``) is recorded too.
  """
  blocky = [m for m in runners if m in rn.PER_BLOCK_TIMED]
  full = [m for m in runners if m not in rn.PER_BLOCK_TIMED]
  per_block = {m: {b: [] for b in range(n)} for m in blocky}
  full_times: dict[str, list[float]] = {m: [] for m in full}
  usage: dict[str, list] = {m: [] for m in runners}

  def call(m, block=None):
    u = profiling.cpu_usage()
    dt, b = runners[m](block=block)
    usage[m].append(profiling.cpu_usage() - u)
    return dt, b

  todo = [b for _ in range(repeats) for b in range(n)] if blocky else []
  rounds = max(steps, 1) if full else 1
  chunks = np.array_split(np.asarray(todo, np.int64), rounds)
  for r in range(rounds):
    for m in full:
      full_times[m].append(call(m)[0])
    for b in chunks[r]:
      for m in blocky:
        per_block[m][int(b)].append(call(m, int(b))[0])
  seq = {m: [] for m in blocky}
  seq_blocks = {m: [] for m in blocky}
  last: dict[str, int] = {}
  for _ in range(sequence_steps if blocky else 0):
    for m in blocky:  # a follower (SCHEDULE) comes after the method it follows
      dt, b = call(m, last.get(cost_model.SCHEDULE.get(m)))
      last[m] = b
      seq[m].append(dt)
      seq_blocks[m].append(b)
  return per_block, full_times, seq, seq_blocks, usage


def measure(method, runner, n, args, compiled_first, log: Log) -> dict:
  """Warm-up and timings of one method on its own (the sequential measurement).

  PyTorch runners are eager: nothing to compile (their first call is made when they
  are built).
  """
  warm = None if method in rn.TORCH_METHODS else warm_up(runner, n, compiled_first)
  per_block, full_times, seq, seq_blocks, usage = time_methods(
      {method: runner}, n, args.steps, args.block_repeats, args.sequence_steps)
  if method in rn.PER_BLOCK_TIMED:
    out = summarize_block(method, n, per_block[method], seq[method],
                          seq_blocks[method], warm, log)
  else:
    out = summarize_full(full_times[method], warm)
  out.update(usage_summary(usage[method]))
  out["_warm"] = warm
  return out


def _compiled(runner, prog, executables: dict, block: int | None = None):
  """Program ``prog`` of ``runner`` (None: its one program), compiled for ``block``
  (default: ``prog``); reused from, and kept in, ``executables``."""
  if executables.get(prog) is None:
    executables[prog] = runner.lower(block=prog if block is None else block).compile()
  return executables[prog]


def runner_memory(runner, n, executables: dict | None = None) -> dict:
  """The largest program's sizes (per-block dispatch: blocks 0 and N-1).

  A single program is lowered for block 0: the same program for every block, and a
  block that works without reading the (possibly abstract) optimizer state.
  Programs already compiled (``executables``, from :func:`warm_up`) are reused.
  """
  executables = {} if executables is None else executables
  single = rn.programs_of(runner, n) == [None]
  progs = [0] if single else sorted({0, n - 1})
  sizes = []
  for p in progs:
    compiled = _compiled(runner, None if single else p, executables, block=p)
    sizes.append(profiling.program_memory(compiled))
  sizes = [s for s in sizes if s["total"] is not None]
  return max(sizes, key=lambda s: s["total"]) if sizes else {"total": None}


def step_flops(method: str, runner, n: int, flops: cost_model.FlopModel,
               executables: dict, save_inputs_every: int = 1) -> dict:
  """Matmul FLOPs of one step of ``method`` and where the figure comes from.

  The forward and the full-backprop steps run one program whose FLOPs are the same
  every step: :func:`absign_jax.profiling.compiled_flops` counts them (``"hlo"``).
  A block step's one stacked program serves every block: the layers below the active
  one run in a loop of run-time length and those above in conditionals, so its count
  is no step's (it counts the loop once and every conditional layer as running). Its
  figure is :class:`cost_model.FlopModel`'s, averaged over the blocks with their
  visit frequencies, with the step's kept layers and ``save_inputs_every``
  (``"model, visit-weighted"``). The PyTorch rows: the model for the same step
  (autograd keeps every activation; the loss is not chunked).
  """
  if method in rn.TORCH_METHODS:
    plain = flops._replace(chunked_head=False)
    if method == "torch_forward":
      return {"flops": plain.forward(), "flops_source": "model"}
    if method == "torch_adamw":
      return {"flops": plain.full_step(), "flops_source": "model"}
    f = cost_model.visit_frequencies(method, n)
    return {"flops": plain.expected_block_step(f),
            "flops_source": "model, visit-weighted"}
  if method in rn.BLOCK_METHODS:
    f = cost_model.visit_frequencies(method, n)
    expected = flops.expected_block_step(f, runner.kept_layers(), save_inputs_every)
    return {"flops": expected, "flops_source": "model, visit-weighted"}
  (prog,) = rn.programs_of(runner, n)
  count = profiling.compiled_flops(_compiled(runner, prog, executables))
  source = "hlo"
  if count["unknown_trip_loops"]:
    source += f" (lower bound: {count['unknown_trip_loops']} loop(s) of unknown length)"
  return {"flops": count["flops"], "flops_source": source}


def compile_study_run(runner, n, steps) -> dict:
  """Wall-clock of ``steps`` steps from empty caches (compilation included)."""
  jax.clear_caches()
  gc.collect()
  first: dict = {}
  times = []
  is_block = isinstance(runner.step, absign_jax.BlockTrainStep)
  programs = rn.programs_of(runner, n)
  t0 = time.perf_counter()
  for _ in range(steps):
    dt, b = runner()
    times.append(dt)
    key = (b if programs != [None] else None) if is_block else None
    first.setdefault(key, dt)
  wall = time.perf_counter() - t0
  return {"steps": steps, "wall_s": wall, "step_times": times, "first_calls": first,
          "programs_compiled": len(first)}


def summarize_compile_study(cs: dict, rows: dict) -> dict | None:
  if not cs:
    return None
  out = {}
  for method, run_ in cs.items():
    out[method] = {
        "steps": run_["steps"], "wall_s": run_["wall_s"],
        "programs_compiled": run_["programs_compiled"],
        "compile_s": rows[method]["compile_s"] if method in rows else None,
    }
  if "absignsgd" in out and "adamw" in out:
    out["absignsgd_faster"] = out["absignsgd"]["wall_s"] < out["adamw"]["wall_s"]
    out["ratio_adamw_over_absignsgd"] = out["adamw"]["wall_s"] / out["absignsgd"]["wall_s"]
  return out


# ---------------------------------------------------------------------------------
# the other studies
# ---------------------------------------------------------------------------------


def effective_dispatch(layout: str, dispatch: str) -> str:
  """What BlockTrainStep runs: per-block programs, one switch, or the dynamic program."""
  if dispatch == "switch":
    return "switch"
  return "dynamic" if layout == "stacked" else "per_block"


def dispatch_study(args, n, model_for, batch, layout, rows,
                   log: Log) -> list[dict] | None:
  spec = args.dispatch_study.strip()
  if not spec or spec == "none":
    return None
  out = []
  for config in spec.split(","):
    lay, disp = config.split(":")
    log(f"[dispatch study: absignsgd, {lay} layout, {disp}]")
    main = rows.get("absignsgd")
    if (main is not None and lay == layout
        and effective_dispatch(lay, disp) == effective_dispatch(layout, args.dispatch)):
      entry = {k: main[k] for k in ("compile_s", "programs", "mean_step_s",
                                    "median_step_s", "memory_bytes")}
    else:
      m = model_for(lay)
      runner, _ = rn.make_runner("absignsgd", m, batch, m, disp)
      only_blocks = argparse.Namespace(steps=1, block_repeats=args.block_repeats,
                                       sequence_steps=0)
      r = measure("absignsgd", runner, n, only_blocks, {}, log)
      entry = {k: r[k] for k in ("compile_s", "programs", "mean_step_s",
                                 "median_step_s")}
      entry["memory_bytes"] = runner_memory(runner, n, r["_warm"]["executables"])["total"]
      del runner
      gc.collect()
    entry.update(layout=lay, dispatch=disp)
    entry["compile_plus_100_steps_s"] = (entry["compile_s"]
                                         + COMPILE_PLUS * entry["mean_step_s"])
    log(f"  compile {entry['compile_s']:.2f} s ({entry['programs']} programs), "
        f"mean step {entry['mean_step_s']:.4f} s")
    out.append(entry)
  return out


def residual_study(args, n, model_for, batch, layout, rows,
                   log: Log) -> list[dict] | None:
  """absignsgd's mean step and compiled bytes for each ``--residual-study`` k.

  Every k's step and the forward are timed interleaved, block by block (each block
  ``--block-repeats`` times per k), so that all see the same machine load: on a
  shared VM, timings taken one configuration after the other drifted by up to 50%
  over a few minutes. ``step_over_forward`` divides by the forward timed alongside.
  """
  if not args.residual_ks:
    return None
  m = model_for(layout)
  forward, _ = rn.make_runner("forward", m, batch, m, args.dispatch)
  forward()
  runners, memory = {}, {}
  for k in args.residual_ks:
    log(f"[residual study: absignsgd, residuals={k}: compiling]")
    runners[k], _ = rn.make_runner("absignsgd", m, batch, m, args.dispatch, residuals=k)
    warm = warm_up(runners[k], n, {})  # compiles once, runs once
    memory[k] = runner_memory(runners[k], n, warm["executables"])["total"]
  log(f"[residual study: timing k = {args.residual_ks} and the forward, interleaved]")
  times = {k: [[] for _ in range(n)] for k in runners}
  forward_times = []
  for _ in range(args.block_repeats):
    for b in range(n):
      forward_times.append(forward()[0])
      for k, runner in runners.items():
        times[k][b].append(runner(block=b)[0])
  f = cost_model.visit_frequencies("absignsgd", n)
  forward_s = _median(forward_times)
  adamw = rows.get("adamw")
  out = []
  for k in args.residual_ks:
    medians = [_median(t) for t in times[k]]
    mean = float(np.sum(f * np.asarray(medians)))
    out.append({
        "residuals": k, "mean_step_s": mean, "block_median_s": medians,
        "forward_median_s": forward_s, "step_over_forward": mean / forward_s,
        "memory_bytes": memory[k],
        "memory_ratio_vs_adamw": (memory[k] / adamw["memory_bytes"]
                                  if adamw and adamw.get("memory_bytes") else None)})
    log(f"  residuals={k}: mean step {mean:.4f} s ({mean / forward_s:.3f}x the "
        f"forward), {fmt_mb(memory[k])} MiB")
  del runners, forward
  gc.collect()
  return out


# ---------------------------------------------------------------------------------
# a run
# ---------------------------------------------------------------------------------


def configure_jax(compilation_cache: str | None) -> None:
  """JAX's persistent compilation cache in ``compilation_cache``, or none at all (so
  that compile times are compilations)."""
  if compilation_cache:
    jax.config.update("jax_compilation_cache_dir", compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  else:
    jax.config.update("jax_enable_compilation_cache", False)


def _config(args):
  return rn.config_for(args.preset, args.seq, family=args.family, layout=args.layout,
                       dtype=args.dtype,
                       remat=None if args.remat is None else args.remat == "on",
                       loss_chunk=args.loss_chunk, model=args.model)


def _torch_note(methods: list[str], backend: str, cfg) -> str | None:
  """Why the PyTorch rows are skipped, or None."""
  if not methods:
    return None
  note = torch_ref.available()
  if note is None and backend != "cpu":
    note = f"skipped: the PyTorch rows run on the CPU, JAX here on {backend}"
  if note is None and cfg.dtype != "float32":
    note = "skipped: the PyTorch rows are float32 only"
  if note is None and cfg.arch != "llama":
    note = f"skipped: the PyTorch rows build LlamaForCausalLM, not {cfg.arch}"
  return note


def run(args: argparse.Namespace, methods: list[str], allocator: str,
        command: str, log: Log) -> dict:
  """Measures ``methods`` as ``step_time.py``'s options ``args`` say; the result.

  ``allocator`` and ``command`` are recorded as they are.
  """
  backend = jax.default_backend()
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  t_start = time.perf_counter()

  base_cfg, layout, name = _config(args)
  n = base_cfg.n_layers
  # The reference of every "fraction of peak", on the same cores as the steps: timed
  # at the start and again at the end, the faster counts.
  peak = profiling.matmul_peak(size=PEAK_SIZE, dtype=jnp.dtype(base_cfg.dtype))
  models = {}

  def model_for(lay):
    if lay not in models:
      cfg = (base_cfg if isinstance(base_cfg, rn.FlaxGPTShape)
             else base_cfg.replace(scan_layers=(lay == "stacked")))
      models[lay] = rn.load_model(cfg, args.model)
    return models[lay]

  model = model_for(layout)
  batch = rn.make_batch(base_cfg, args.batch, args.seq)
  flops = cost_model.FlopModel.of(rn.layer_matmuls(base_cfg), n, args.batch, args.seq,
                                  base_cfg.loss_chunk)

  log(f"step_time: {name} ({base_cfg.num_params() / 1e6:.1f}M params, N={n}, "
      f"{base_cfg.dtype}, remat={base_cfg.remat}, loss_chunk={base_cfg.loss_chunk}), "
      f"batch {args.batch} x seq {args.seq}, layout {layout}, dispatch {args.dispatch}, "
      f"{backend}: {jax.devices()[0].device_kind}; matmul peak "
      f"{peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['size']}^3, {peak['dtype']})")

  torch_methods = [m for m in rn.TORCH_METHODS if m in methods]
  torch_note = _torch_note(torch_methods, backend, base_cfg)
  if torch_note is not None:
    log(f"[{', '.join(torch_methods)}] {torch_note}")
    torch_methods = []

  rows: dict[str, dict] = {}
  compile_study: dict[str, dict] = {}
  order = [m for m in rn.RUN_ORDER if m in methods and m not in rn.TORCH_METHODS]
  interleave = (args.interleave == "on"
                or (args.interleave == "auto" and backend == "cpu"))
  runners, warms = {}, {}
  jax_loss = None
  for method in order:
    log(f"[{method}]")
    runner, _ = rn.make_runner(method, model, batch, model, args.dispatch,
                               save_inputs_every=args.save_inputs_every)
    row: dict[str, Any] = {"name": method}
    compiled_first: dict = {}
    if args.compile_steps > 0 and method in ("absignsgd", "adamw"):
      cs = compile_study_run(runner, n, args.compile_steps)
      compile_study[method] = cs
      log(f"  compile study: {cs['steps']} steps from empty caches in "
          f"{cs['wall_s']:.2f} s ({cs['programs_compiled']} programs compiled)")
      compiled_first = cs["first_calls"]
    if interleave:
      t0 = time.perf_counter()
      warms[method] = warm_up(runner, n, compiled_first)
      log(f"  {len(warms[method]['programs'])} program(s) ready "
          f"({time.perf_counter() - t0:.1f} s of warm-up here)")
    else:
      row.update(measure(method, runner, n, args, compiled_first, log))
      warms[method] = row.pop("_warm")
    mem = runner_memory(runner, n, warms[method]["executables"])
    row["memory_bytes"] = mem["total"]
    row["memory_detail"] = mem
    row["opt_state_bytes"] = profiling.tree_bytes(runner.opt_state)
    row["param_bytes"] = profiling.tree_bytes(runner.params)
    if method == "lora":
      row["trainable_params"] = lora_lib.num_lora_params(runner.params)
    if method == "forward":
      jax_loss = float(runner.fn(runner.params, batch))
      row["loss"] = jax_loss
    row["device_memory"] = device_memory()
    row["model_speedup"] = cost_model.model_speedup(method, n,
                                                    method in rn.PER_BLOCK_TIMED)
    row.update(step_flops(method, runner, n, flops, warms[method]["executables"],
                          args.save_inputs_every))
    rows[method] = row
    if interleave:
      runners[method] = runner
    else:
      log(f"  median {row['median_step_s']:.4f} s, mean {row['mean_step_s']:.4f} s, "
          f"memory {fmt_mb(row['memory_bytes'])} MB, compile {row['compile_s']:.2f} s")
    del runner
    gc.collect()
  if torch_methods:
    if jax_loss is None:
      fwd = jax.jit(model.parts.loss_fn)
      jax_loss = float(fwd(model.params(), batch))
    t_runners = {}
    for method in torch_methods:
      log(f"[{method}]")
      t_runners[method], fields = rn.torch_runner(method, model, batch, jax_loss, log,
                                                  threads=args.torch_threads)
      rows[method] = {
          "name": method, "loss_check": fields.pop("loss_check"),
          "first_call_s": fields.pop("first_call_s"), "memory_bytes": None,
          "memory_detail": None, "param_bytes": fields.pop("param_bytes"),
          "opt_state_bytes": fields.pop("opt_state_bytes"), "device_memory": None,
          "model_speedup": cost_model.model_speedup(method, n,
                                                    method in rn.PER_BLOCK_TIMED),
          **fields, **step_flops(method, None, n, flops, {})}
    if interleave:
      runners.update(t_runners)
    else:
      for method, r in t_runners.items():
        rows[method].update(measure(method, r, n, args, {}, log))
        rows[method].pop("_warm")
    for method in t_runners:
      warms[method] = None
    del t_runners
  if interleave:
    if compile_study:
      # A compile study clears JAX's caches: programs warmed up before it are gone.
      log("[recompiling what the compile study cleared (untimed)]")
      for method, runner in runners.items():
        if method not in rn.TORCH_METHODS:
          for prog in rn.programs_of(runner, n):
            runner(block=prog)
    log(f"[timing {', '.join(runners)}, interleaved step by step]")
    t0 = time.perf_counter()
    per_block, full_times, seq, seq_blocks, usage = time_methods(
        runners, n, args.steps, args.block_repeats, args.sequence_steps)
    log(f"  {time.perf_counter() - t0:.1f} s")
    for method in runners:
      if method in rn.PER_BLOCK_TIMED:
        rows[method].update(summarize_block(method, n, per_block[method], seq[method],
                                            seq_blocks[method], warms[method], log))
      else:
        rows[method].update(summarize_full(full_times[method], warms[method]))
      rows[method].update(usage_summary(usage[method]))
      row = rows[method]
      log(f"  {method}: median {row['median_step_s']:.4f} s, mean "
          f"{row['mean_step_s']:.4f} s, compile {row['compile_s']:.2f} s")
    runners.clear()
    gc.collect()
  warms.clear()

  # speed-ups and memory ratios against adamw; compile + 100 steps; FLOP/s
  peak_end = profiling.matmul_peak(size=PEAK_SIZE, dtype=jnp.dtype(base_cfg.dtype))
  peak = dict(max(peak, peak_end, key=lambda p: p["flops_per_s"]),
              start_flops_per_s=peak["flops_per_s"],
              end_flops_per_s=peak_end["flops_per_s"])
  ref = rows.get("adamw")
  for method, row in rows.items():
    row["compile_plus_100_steps_s"] = row["compile_s"] + COMPILE_PLUS * step_of(row)
    if ref:
      row["speedup_vs_adamw"] = ref["median_step_s"] / step_of(row)
      row["memory_ratio_vs_adamw"] = (row["memory_bytes"] / ref["memory_bytes"]
                                      if row["memory_bytes"] and ref["memory_bytes"]
                                      else None)
    else:
      row["speedup_vs_adamw"] = row["memory_ratio_vs_adamw"] = None
    # Over the step time the speed-up uses: a block method's FLOPs are the
    # visit-weighted mean, as its mean step is.
    row["flops_per_s"] = row["flops"] / step_of(row)
    row["fraction_of_peak"] = row["flops_per_s"] / peak["flops_per_s"]

  compile_summary = summarize_compile_study(compile_study, rows)
  dispatch = dispatch_study(args, n, model_for, batch, layout, rows, log)
  residual = residual_study(args, n, model_for, batch, layout, rows, log)

  return {
      "preset": name, "family": args.family, "n_layers": n,
      "num_params": base_cfg.num_params(),
      "batch": args.batch, "seq": args.seq, "dtype": base_cfg.dtype,
      "remat": base_cfg.remat, "loss_chunk": base_cfg.loss_chunk, "layout": layout,
      "model": args.model, "dispatch": args.dispatch, "steps": args.steps,
      "sequence_steps": args.sequence_steps, "interleaved": interleave,
      "block_repeats": args.block_repeats,
      "compilation_cache": args.compilation_cache,
      "machine": dict(profiling.machine_info(), load_avg_start=load_start,
                      xla_flags=os.environ.get("XLA_FLAGS"),
                      allocator=allocator, ld_preload=os.environ.get("LD_PRELOAD"),
                      matmul_peak=peak),
      "command": command,
      "rows": [rows[m] for m in rn.METHODS if m in rows],
      "torch_note": torch_note,
      "compile_study": compile_summary,
      "dispatch_study": dispatch,
      "residual_study": residual,
      "wall_s": time.perf_counter() - t_start,
  }


def memory_only(args: argparse.Namespace, methods: list[str], command: str,
                log: Log) -> dict:
  """Compiled sizes of every method's largest program, from shapes alone."""
  cfg, layout, name = _config(args)
  n = cfg.n_layers
  model = rn.Model(cfg.replace(scan_layers=(layout == "stacked")))
  batch = rn.make_batch(cfg, args.batch, args.seq)
  rows = []
  for method in methods:
    runner = rn.abstract_runner(method, model, batch, args.dispatch,
                                args.save_inputs_every)
    mem = runner_memory(runner, n)
    rows.append({"name": method, "memory_bytes": mem["total"], "memory_detail": mem,
                 "opt_state_bytes": profiling.tree_bytes(runner.opt_state),
                 "param_bytes": profiling.tree_bytes(runner.params)})
    log(f"[{method}] {fmt_mb(mem['total'])} MiB")
  ref = next((r for r in rows if r["name"] == "adamw"), None)
  for r in rows:
    r["memory_ratio_vs_adamw"] = (r["memory_bytes"] / ref["memory_bytes"]
                                  if ref and r["memory_bytes"] else None)
  return {"preset": name, "n_layers": n, "num_params": cfg.num_params(),
          "batch": args.batch, "seq": args.seq, "dtype": cfg.dtype, "remat": cfg.remat,
          "loss_chunk": cfg.loss_chunk, "layout": layout,
          "machine": profiling.machine_info(), "rows": rows, "command": command}
