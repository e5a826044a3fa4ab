"""Step time, memory and compile time of ABSignSGD's partial-backprop step vs baselines.

In one run, on the same model, batch and machine:

* ``adamw``              optax.adamw, full backprop (:class:`absign_jax.FullTrainStep`)
* ``absignsgd``          depth-biased ABSignSGD, partial backprop (BlockTrainStep)
* ``absignsgd_uniform``  the same with uniform block selection
* ``block_adam``         BAdam-style block Adam, same partial backprop, cyclic order,
                         ``steps_per_block=1`` (the step's cost does not depend on K:
                         the Adam-state reset is a ``where`` computed every step)
* ``sign_sgd``           full-parameter sign descent, full backprop
* ``lora``               LoRA rank 8 on every attention and MLP projection, adamw on
                         the adapters, full backprop through the frozen base
                         (``benchmarks/lora.py``)

For every method: the per-step time (block until ready), the compiled program's size
(``memory_analysis()``: argument + output + temp - alias bytes), the optimizer state's
bytes, on GPU the device's peak memory, and the compile time of all its programs.
Then two studies: compile time + ``--compile-steps`` steps of absignsgd vs adamw
(wall-clock, from empty caches), and block dispatch (list layout per-block vs
``lax.switch``, stacked layout's dynamic program): compile time and step time.

What the figures mean (also written into the Markdown output):

* ``median_step_s``: median over the timed steps. For a block method these are a
  sequence of ``max(--steps, 2N)`` steps that follows the method's own block schedule.
* ``mean_step_s``: what a training run sees per step. Full backprop: the mean of the
  timed steps. Block methods: ``sum_i f_i t_i``, the expected step time over a full
  schedule period, with ``t_i`` the median time of block ``i`` (each block timed
  ``--block-repeats`` times, forced active) and ``f_i`` the scheme's exact long-run
  visit frequency (depth-biased: ``f_i ~ 1 / tau_i``; uniform and cyclic: ``1/N``).
  A depth-biased schedule's period is far longer than any run of a benchmark, and a
  short sequence over- or under-samples the rare shallow blocks; this weighting has
  neither problem. ``sequence_mean_step_s`` is the plain mean over the timed sequence.
* ``speedup_vs_adamw``: adamw's median step time over this method's ``mean_step_s``
  (block methods) or ``median_step_s`` (full-backprop methods: every step runs the
  same program, so the median is the robust estimate of that one cost).
* ``model_speedup``: SPEC §4's cost model, in layer forwards: full backprop ``3N``,
  block ``i`` ``N + (N-1-i) + 2``, averaged with ``f_i``. For LoRA: forward plus
  activation backprop through every layer, ``2N`` (adapters ignored).

Usage::

    python benchmarks/step_time.py --preset smollm2-135m --batch 4 --seq 128 \\
        --dtype float32 --out runs/step_time

Writes ``step_time_<preset>.json`` and ``.md`` under ``--out`` and prints the tables
last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora as lora_lib  # noqa: E402  (benchmarks/lora.py)

import absign_jax  # noqa: E402
from absign_jax import profiling  # noqa: E402
from absign_jax.llm.model import Llama, LlamaConfig  # noqa: E402

METHODS = ("adamw", "absignsgd", "absignsgd_uniform", "block_adam", "sign_sgd", "lora")
BLOCK_METHODS = ("absignsgd", "absignsgd_uniform", "block_adam")
# Run order: ascending expected memory, so that a device's (never reset) peak-memory
# counter read after each method is that method's own peak.
RUN_ORDER = ("absignsgd", "absignsgd_uniform", "block_adam", "lora", "sign_sgd", "adamw")
DEPTH_BIAS = 10.0
LORA_RANK = 8
DISPATCH_CONFIGS = ("list:per_block", "list:switch", "stacked:auto")


# ---------------------------------------------------------------------------------
# model, batch, optimizers
# ---------------------------------------------------------------------------------


class Model:
  """A Llama config's pure pieces: fresh parameters on demand, loss, layered loss."""

  def __init__(self, cfg: LlamaConfig, seed: int = 0):
    self.cfg = cfg
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed)))
    self.parts = absign_jax.split_nnx(abstract)
    # Eager initialisation (op by op, on the default device). A jitted init of the
    # list layout compiles for minutes on GPU (XLA's "very slow compile" alarm).
    # The parameters as the steps train them (split_nnx stacks list layers).
    self._init = lambda: absign_jax.split_nnx(Llama(cfg, rngs=nnx.Rngs(seed))).params

    def init_lora():
      model = Llama(cfg, rngs=nnx.Rngs(seed))
      lora_lib.add_lora(model, rank=LORA_RANK, rngs=nnx.Rngs(seed + 1))
      _, adapters, base = nnx.split(model, lora_lib.LoRAParam, ...)
      return adapters, base

    def lora_graphdef():
      model = Llama(cfg, rngs=nnx.Rngs(seed))
      lora_lib.add_lora(model, rank=LORA_RANK, rngs=nnx.Rngs(seed + 1))
      return model

    graphdef = nnx.split(nnx.eval_shape(lora_graphdef), lora_lib.LoRAParam, ...)[0]
    self.lora_loss = lora_lib.lora_loss(graphdef)
    self._init_lora = init_lora

  def params(self):
    """Fresh parameters (on the default device; built there, no host copy)."""
    return self._init()

  def lora(self):
    """Fresh ``(adapters, frozen base)``."""
    return self._init_lora()


def make_batch(cfg: LlamaConfig, batch: int, seq: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  x = r.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
          "mask": jnp.ones((batch, seq), jnp.float32)}


def make_tx(method: str):
  if method == "adamw":
    return optax.adamw(1e-5, weight_decay=0.01)
  if method == "absignsgd":
    return absign_jax.absignsgd(1e-5, depth_bias=DEPTH_BIAS)
  if method == "absignsgd_uniform":
    return absign_jax.absignsgd(1e-5, selection="uniform")
  if method == "block_adam":
    return absign_jax.block_adam(1e-5, steps_per_block=1, selection="cyclic")
  if method == "sign_sgd":
    return absign_jax.sign_sgd(1e-5)
  if method == "lora":
    return optax.adamw(1e-4, weight_decay=0.0)
  raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def visit_frequencies(method: str, n: int) -> np.ndarray:
  """Long-run visit frequency of each block under the method's selection scheme."""
  if method == "absignsgd":
    tau = np.array(absign_jax.blocks.selection.depth_biased_costs(n, DEPTH_BIAS), np.float64)
    f = 1.0 / tau
  else:  # uniform, cyclic
    f = np.ones(n)
  return f / f.sum()


def model_speedup(method: str, n: int) -> float:
  """SPEC §4's cost model: full backprop 3N; block i: N + (N-1-i) + 2."""
  if method in BLOCK_METHODS:
    f = visit_frequencies(method, n)
    cost = float(np.sum(f * np.array([n + (n - 1 - i) + 2 for i in range(n)])))
    return 3 * n / cost
  if method == "lora":
    return 3 * n / (2 * n)
  return 1.0


# ---------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------


def device_memory() -> dict | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - not every backend has it
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats}


def with_active(opt_state, block: int):
  """``opt_state`` with ``block`` made the active block (to time one block)."""
  is_bc = lambda s: isinstance(s, absign_jax.BlockCoordinateState)
  return jax.tree.map(
      lambda s: s._replace(active=jnp.asarray(block, jnp.int32)) if is_bc(s) else s,
      opt_state, is_leaf=is_bc)


class Runner:
  """Runs one training step and records the time of every call.

  ``state`` is the step's :class:`absign_jax.TrainState` (``step.init(params)``, or
  ``jax.eval_shape(step.init, params)`` to size programs from shapes alone).
  """

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch = step, state, batch

  @property
  def params(self):
    return self.state.params

  @property
  def opt_state(self):
    return self.state.opt_state

  def __call__(self, block: int | None = None) -> tuple[float, int | None]:
    """One step (with ``block`` forced active, if given); returns (seconds, block)."""
    if block is not None:
      self.state = self.state._replace(opt_state=with_active(self.opt_state, block))
    active = None
    try:
      active = int(absign_jax.active_block(self.opt_state))
    except ValueError:
      pass
    jax.block_until_ready(self.state)
    t = time.perf_counter()
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t, active

  def lower(self, block=None):
    return self.step.lower(self.state, self.batch, block=block)


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _mean(xs):
  return float(statistics.fmean(xs)) if xs else None


def make_runner(method: str, model: Model, batch: dict, layout_model: Model,
                dispatch: str, donate: bool = True) -> tuple[Runner, Any]:
  """A fresh step, parameters and optimizer state for ``method``."""
  tx = make_tx(method)
  if method == "lora":
    adapters, base = model.lora()
    step = absign_jax.FullTrainStep(model.lora_loss, tx, donate=donate)
    return Runner(step, step.init(adapters), {"data": batch, "base": base}), tx
  m = layout_model
  params = m.params()
  if method in BLOCK_METHODS:
    step = absign_jax.BlockTrainStep(m.parts.loss_fn, tx, layered=m.parts.layered,
                                     dispatch=dispatch, donate=donate)
  else:
    step = absign_jax.FullTrainStep(m.parts.loss_fn, tx, donate=donate)
  return Runner(step, step.init(params), batch), tx


def programs_of(runner: Runner, n: int) -> list[int | None]:
  """The distinct programs a step runs: one per block (per-block dispatch) or one."""
  step = runner.step
  if not isinstance(step, absign_jax.BlockTrainStep):
    return [None]
  spec = absign_jax.find_state(runner.opt_state).partition.spec(runner.params)
  rng = spec.stacked_range()
  if step.dispatch == "switch" or (step.layered is not None and rng == (0, n)):
    return [None]
  return list(range(n))


# ---------------------------------------------------------------------------------
# one method
# ---------------------------------------------------------------------------------


def aot_compile(runner, prog) -> float:
  """Seconds to trace, lower and compile one program ahead of time.

  The executable lands in the jit's cache, so the first call that follows does not
  compile again. Timed on its own, unlike "first call minus a step", so it does not
  inherit the noise of step times on a shared machine.
  """
  t = time.perf_counter()
  runner.lower(block=prog).compile()
  return time.perf_counter() - t


def warm_up(runner, n, compiled_first) -> dict:
  """Compiles every program of the step once (ahead of time) and runs it once.

  ``compiled_first``: {program: first-call seconds} already paid lazily (compile
  study). Returns the programs, their first-call times and AOT compile times.
  """
  programs = programs_of(runner, n)
  first_calls = dict(compiled_first or {})
  aot: dict = {}
  for prog in programs:
    if prog not in first_calls:
      aot[prog] = aot_compile(runner, prog)
      first_calls[prog] = runner(block=prog)[0] if prog is not None else runner()[0]
  return {"programs": programs, "first_calls": first_calls, "aot": aot}


def summarize_full(times, warm) -> dict:
  med = _median(times)
  (prog,) = warm["first_calls"]
  compile_s = warm["aot"].get(prog, max(warm["first_calls"][prog] - med, 0.0))
  return {"median_step_s": med, "mean_step_s": _mean(times),
          "sequence_mean_step_s": _mean(times), "timed_steps": len(times),
          "compile_s": compile_s, "programs": 1,
          "first_call_s": warm["first_calls"][prog]}


def summarize_block(method, n, per_block, seq, seq_blocks, warm, log) -> dict:
  t_block = np.array([statistics.median(per_block[b]) for b in range(n)])
  f = visit_frequencies(method, n)
  first_calls, aot = warm["first_calls"], warm["aot"]
  steady = {prog: (t_block[prog] if prog is not None else float(np.median(t_block)))
            for prog in first_calls}
  # Programs compiled ahead of time: their AOT time; compiled lazily by the compile
  # study: first call minus the program's steady step time.
  compile_s = sum(aot[p] if p in aot else max(first_calls[p] - steady[p], 0.0)
                  for p in first_calls)
  log(f"  {method}: blocks {t_block.min():.4f}..{t_block.max():.4f} s, "
      f"schedule {seq_blocks[:12]}...")
  return {"median_step_s": _median(seq), "mean_step_s": float(np.sum(f * t_block)),
          "sequence_mean_step_s": _mean(seq), "timed_steps": len(seq),
          "block_median_s": [float(x) for x in t_block],
          "visit_frequency": [float(x) for x in f],
          "sequence_blocks": seq_blocks,
          "compile_s": compile_s, "programs": len(warm["programs"]),
          "first_call_s": float(sum(first_calls.values()))}


def time_methods(runners: dict, n: int, steps: int, repeats: int) -> tuple:
  """Times every method, interleaved step by step so that all see the same load.

  Rounds of ``for b in blocks: for method: one step`` (block methods: block ``b``
  forced active; full backprop: a plain step), ``repeats`` rounds; then the block
  methods' scheduled sequences, also interleaved. With one runner this is the
  sequential measurement.
  """
  blocky = [m for m in runners if m in BLOCK_METHODS]
  full = [m for m in runners if m not in BLOCK_METHODS]
  per_block = {m: {b: [] for b in range(n)} for m in blocky}
  full_times: dict[str, list[float]] = {m: [] for m in full}
  for _ in range(repeats):
    for b in range(n):
      for m, r in runners.items():
        if m in blocky:
          per_block[m][b].append(r(block=b)[0])
        else:
          full_times[m].append(r()[0])
  while full and len(full_times[full[0]]) < max(steps, 1):
    for m in full:
      full_times[m].append(runners[m]()[0])
  seq = {m: [] for m in blocky}
  seq_blocks = {m: [] for m in blocky}
  for _ in range(max(steps, 2 * n) if blocky else 0):
    for m in blocky:
      dt, b = runners[m]()
      seq[m].append(dt)
      seq_blocks[m].append(b)
  return per_block, full_times, seq, seq_blocks


def measure(method, runner, n, steps, repeats, compiled_first, log) -> dict:
  """Warm-up and timings of one method on its own (the sequential measurement)."""
  warm = warm_up(runner, n, compiled_first)
  per_block, full_times, seq, seq_blocks = time_methods({method: runner}, n, steps,
                                                        repeats)
  if method in BLOCK_METHODS:
    return summarize_block(method, n, per_block[method], seq[method],
                           seq_blocks[method], warm, log)
  return summarize_full(full_times[method], warm)


def runner_memory(runner, n) -> dict:
  """The largest program's sizes (per-block dispatch: blocks 0 and N-1).

  A single program is lowered for block 0: the same program for every block, and a
  block that works without reading the (possibly abstract) optimizer state.
  """
  progs = [0] if programs_of(runner, n) == [None] else sorted({0, n - 1})
  sizes = [profiling.program_memory(runner.lower(block=p).compile()) for p in progs]
  sizes = [s for s in sizes if s["total"] is not None]
  return max(sizes, key=lambda s: s["total"]) if sizes else {"total": None}


def compile_study_run(runner, n, steps) -> dict:
  """Wall-clock of ``steps`` steps from empty caches (compilation included)."""
  jax.clear_caches()
  gc.collect()
  first: dict = {}
  times = []
  is_block = isinstance(runner.step, absign_jax.BlockTrainStep)
  programs = programs_of(runner, n)
  t0 = time.perf_counter()
  for _ in range(steps):
    dt, b = runner()
    times.append(dt)
    key = (b if programs != [None] else None) if is_block else None
    first.setdefault(key, dt)
  wall = time.perf_counter() - t0
  return {"steps": steps, "wall_s": wall, "step_times": times, "first_calls": first,
          "programs_compiled": len(first)}


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="smollm2-135m",
                 choices=["tiny", "gpt2-small", "smollm2-135m", "qwen3-8b"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="default: the preset's (float32; bfloat16 for qwen3-8b)")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)}")
  p.add_argument("--steps", type=int, default=20,
                 help="timed steps (full backprop); block methods time a scheduled "
                      "sequence of max(steps, 2N)")
  p.add_argument("--block-repeats", type=int, default=3,
                 help="forced-active timings of every block (block methods)")
  p.add_argument("--layout", default=None, choices=["list", "stacked"],
                 help="default: stacked for qwen3-8b, list otherwise")
  p.add_argument("--dispatch", default="auto", choices=["auto", "per_block", "switch"])
  p.add_argument("--interleave", default="auto", choices=["auto", "on", "off"],
                 help="time all methods interleaved step by step, so that they see "
                      "the same machine load (all stay in memory at once); auto: on "
                      "for the CPU, off on accelerators")
  p.add_argument("--compile-steps", type=int, default=100,
                 help="compile study: steps of absignsgd vs adamw from empty caches "
                      "(0: skip)")
  p.add_argument("--dispatch-study", default=",".join(DISPATCH_CONFIGS),
                 help="layout:dispatch configurations of absignsgd to compare "
                      "('' or 'none': skip)")
  p.add_argument("--remat", default=None, choices=["on", "off"],
                 help="default: the preset's")
  p.add_argument("--loss-chunk", type=int, default=None,
                 help="tokens per chunk of the cross-entropy (default: the preset's)")
  p.add_argument("--memory-only", action="store_true",
                 help="compile every method's programs from abstract shapes and report "
                      "their memory_analysis() sizes; allocates no parameters and times "
                      "nothing, so any preset runs on any machine (sizes are the "
                      "compiling backend's)")
  p.add_argument("--allow-big-cpu", action="store_true",
                 help="let qwen3-8b run without an accelerator (needs > 100 GB)")
  p.add_argument("--out", default="runs/step_time")
  args = p.parse_args(argv)
  args.argv = argv
  return args


def main(argv=None):
  args = parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
  backend = jax.default_backend()
  if args.memory_only:
    return memory_only(args, methods)
  if args.preset == "qwen3-8b" and backend == "cpu" and not args.allow_big_cpu:
    raise SystemExit("qwen3-8b needs an accelerator (about 16 GB of bf16 weights, "
                     "65 GB for adamw); pass --allow-big-cpu to run it on the CPU anyway.")
  jax.config.update("jax_enable_compilation_cache", False)  # honest compile times
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

  base_cfg, layout = config_for(args)
  n = base_cfg.n_layers
  models = {}

  def model_for(lay):
    if lay not in models:
      models[lay] = Model(base_cfg.replace(scan_layers=(lay == "stacked")))
    return models[lay]

  model = model_for(layout)
  batch = make_batch(base_cfg, args.batch, args.seq)
  os.makedirs(args.out, exist_ok=True)

  def log(msg):
    print(msg, flush=True)

  log(f"step_time: {args.preset} ({base_cfg.num_params() / 1e6:.1f}M params, N={n}, "
      f"{base_cfg.dtype}, remat={base_cfg.remat}, loss_chunk={base_cfg.loss_chunk}), "
      f"batch {args.batch} x seq {args.seq}, layout {layout}, dispatch {args.dispatch}, "
      f"{backend}: {jax.devices()[0].device_kind}")

  rows: dict[str, dict] = {}
  compile_study: dict[str, dict] = {}
  order = [m for m in RUN_ORDER if m in methods]
  interleave = (args.interleave == "on"
                or (args.interleave == "auto" and backend == "cpu"))
  runners, warms = {}, {}
  for method in order:
    log(f"[{method}]")
    runner, tx = make_runner(method, model, batch, model, args.dispatch)
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
      row.update(measure(method, runner, n, args.steps, args.block_repeats,
                         compiled_first, log))
    mem = runner_memory(runner, n)
    row["memory_bytes"] = mem["total"]
    row["memory_detail"] = mem
    row["opt_state_bytes"] = profiling.tree_bytes(runner.opt_state)
    row["param_bytes"] = profiling.tree_bytes(runner.params)
    if method == "lora":
      row["trainable_params"] = lora_lib.num_lora_params(runner.params)
    row["device_memory"] = device_memory()
    row["model_speedup"] = model_speedup(method, n)
    rows[method] = row
    if interleave:
      runners[method] = runner
    else:
      log(f"  median {row['median_step_s']:.4f} s, mean {row['mean_step_s']:.4f} s, "
          f"memory {fmt_mb(row['memory_bytes'])} MB, compile {row['compile_s']:.2f} s")
    del runner
    gc.collect()
  if interleave:
    if compile_study:
      # A compile study clears JAX's caches: programs warmed up before it are gone.
      log("[recompiling what the compile study cleared (untimed)]")
      for runner in runners.values():
        for prog in programs_of(runner, n):
          runner(block=prog)
    log(f"[timing {', '.join(runners)}, interleaved step by step]")
    per_block, full_times, seq, seq_blocks = time_methods(
        runners, n, args.steps, args.block_repeats)
    for method in runners:
      if method in BLOCK_METHODS:
        rows[method].update(summarize_block(method, n, per_block[method], seq[method],
                                            seq_blocks[method], warms[method], log))
      else:
        rows[method].update(summarize_full(full_times[method], warms[method]))
      row = rows[method]
      log(f"  {method}: median {row['median_step_s']:.4f} s, mean "
          f"{row['mean_step_s']:.4f} s, compile {row['compile_s']:.2f} s")
    runners.clear()
    gc.collect()

  # speed-ups and memory ratios against adamw
  ref = rows.get("adamw")
  for method, row in rows.items():
    if ref:
      t = row["mean_step_s"] if method in BLOCK_METHODS else row["median_step_s"]
      row["speedup_vs_adamw"] = ref["median_step_s"] / t
      row["memory_ratio_vs_adamw"] = (row["memory_bytes"] / ref["memory_bytes"]
                                      if row["memory_bytes"] and ref["memory_bytes"]
                                      else None)
    else:
      row["speedup_vs_adamw"] = row["memory_ratio_vs_adamw"] = None

  compile_summary = summarize_compile_study(compile_study, rows)
  dispatch = dispatch_study(args, n, model_for, batch, layout, rows, log)

  result = {
      "preset": args.preset, "n_layers": n, "num_params": base_cfg.num_params(),
      "batch": args.batch, "seq": args.seq, "dtype": base_cfg.dtype,
      "remat": base_cfg.remat, "loss_chunk": base_cfg.loss_chunk, "layout": layout,
      "dispatch": args.dispatch, "steps": args.steps, "interleaved": interleave,
      "block_repeats": args.block_repeats,
      "machine": dict(machine_info(), load_avg_start=load_start),
      "command": "python benchmarks/step_time.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "rows": [rows[m] for m in methods if m in rows],
      "compile_study": compile_summary,
      "dispatch_study": dispatch,
  }
  base = os.path.join(args.out, f"step_time_{args.preset}")
  with open(base + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  md = markdown(result)
  with open(base + ".md", "w") as fh:
    fh.write(md)
  print(f"\nwrote {base}.json and {base}.md\n")
  print(md)
  return result


def config_for(args) -> tuple[LlamaConfig, str]:
  """The preset with the command line's overrides, and the layout."""
  layout = args.layout or ("stacked" if args.preset == "qwen3-8b" else "list")
  overrides: dict[str, Any] = {"max_seq_len": max(args.seq, 8)}
  if args.dtype:
    overrides["dtype"] = args.dtype
  if args.remat:
    overrides["remat"] = args.remat == "on"
  if args.loss_chunk is not None:
    overrides["loss_chunk"] = args.loss_chunk
  return LlamaConfig.preset(args.preset, **overrides), layout


def memory_only(args, methods: list[str]) -> dict:
  """Compiled sizes of every method's largest program, from shapes alone."""
  cfg, layout = config_for(args)
  n = cfg.n_layers
  model = Model(cfg.replace(scan_layers=(layout == "stacked")))
  shape = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    tree)
  params = shape(model.parts.params)
  batch = shape(make_batch(cfg, args.batch, args.seq))
  rows = []
  for method in methods:
    tx = make_tx(method)
    if method == "lora":
      adapters, base = jax.eval_shape(model.lora)
      step = absign_jax.FullTrainStep(model.lora_loss, tx)
      runner = Runner(step, jax.eval_shape(step.init, adapters),
                      {"data": batch, "base": base})
    elif method in BLOCK_METHODS:
      step = absign_jax.BlockTrainStep(model.parts.loss_fn, tx,
                                       layered=model.parts.layered,
                                       dispatch=args.dispatch)
      runner = Runner(step, jax.eval_shape(step.init, params), batch)
    else:
      step = absign_jax.FullTrainStep(model.parts.loss_fn, tx)
      runner = Runner(step, jax.eval_shape(step.init, params), batch)
    mem = runner_memory(runner, n)
    rows.append({"name": method, "memory_bytes": mem["total"], "memory_detail": mem,
                 "opt_state_bytes": profiling.tree_bytes(runner.opt_state),
                 "param_bytes": profiling.tree_bytes(runner.params)})
    print(f"[{method}] {fmt_mb(mem['total'])} MiB", flush=True)
  ref = next((r for r in rows if r["name"] == "adamw"), None)
  for r in rows:
    r["memory_ratio_vs_adamw"] = (r["memory_bytes"] / ref["memory_bytes"]
                                  if ref and r["memory_bytes"] else None)
  result = {"preset": args.preset, "n_layers": n, "num_params": cfg.num_params(),
            "batch": args.batch, "seq": args.seq, "dtype": cfg.dtype, "remat": cfg.remat,
            "loss_chunk": cfg.loss_chunk, "layout": layout,
            "machine": machine_info(), "rows": rows,
            "command": "python benchmarks/step_time.py " + " ".join(
                sys.argv[1:] if args.argv is None else args.argv)}
  lines = [f"### Compiled memory (no run): {args.preset} ({cfg.num_params() / 1e6:,.1f}M "
           f"params, {cfg.dtype}, remat={cfg.remat}, loss_chunk={cfg.loss_chunk}), "
           f"batch {args.batch} x seq {args.seq}, {layout} layout, compiled for "
           f"{jax.default_backend()}", "",
           "| method | memory (MiB) | memory / adamw | temp (MiB) | opt state (MiB) |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    ratio = r["memory_ratio_vs_adamw"]
    lines.append(f"| {r['name']} | {fmt_mb(r['memory_bytes'])} | "
                 f"{'-' if ratio is None else f'{ratio:.3f}'} | "
                 f"{fmt_mb(r['memory_detail'].get('temp'))} | "
                 f"{fmt_mb(r['opt_state_bytes'])} |")
  md = "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"memory_{args.preset}")
  with open(base + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  with open(base + ".md", "w") as fh:
    fh.write(md)
  print(f"\nwrote {base}.json and {base}.md\n")
  print(md)
  return result


def summarize_compile_study(cs: dict, rows: dict) -> dict | None:
  if not cs:
    return None
  out = {}
  for method, run in cs.items():
    out[method] = {
        "steps": run["steps"], "wall_s": run["wall_s"],
        "programs_compiled": run["programs_compiled"],
        "compile_s": rows[method]["compile_s"] if method in rows else None,
    }
  if "absignsgd" in out and "adamw" in out:
    out["absignsgd_faster"] = out["absignsgd"]["wall_s"] < out["adamw"]["wall_s"]
    out["ratio_adamw_over_absignsgd"] = out["adamw"]["wall_s"] / out["absignsgd"]["wall_s"]
  return out


def effective_dispatch(layout: str, dispatch: str) -> str:
  """What BlockTrainStep runs: per-block programs, one switch, or the dynamic program."""
  if dispatch == "switch":
    return "switch"
  return "dynamic" if layout == "stacked" else "per_block"


def dispatch_study(args, n, model_for, batch, layout, rows, log) -> list[dict] | None:
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
      runner, _ = make_runner("absignsgd", m, batch, m, disp)
      r = measure("absignsgd", runner, n, 0, args.block_repeats, {}, log)
      entry = {k: r[k] for k in ("compile_s", "programs", "mean_step_s",
                                 "median_step_s")}
      entry["memory_bytes"] = runner_memory(runner, n)["total"]
      del runner
      gc.collect()
    entry.update(layout=lay, dispatch=disp)
    if args.compile_steps:
      entry["compile_plus_steps_s"] = (entry["compile_s"]
                                       + args.compile_steps * entry["mean_step_s"])
    log(f"  compile {entry['compile_s']:.2f} s ({entry['programs']} programs), "
        f"mean step {entry['mean_step_s']:.4f} s")
    out.append(entry)
  return out


def machine_info() -> dict:
  info = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "flax": _version("flax"), "optax": optax.__version__}
  try:
    info["load_avg"] = os.getloadavg()
  except OSError:
    pass
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          info["cpu"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return info


def _version(mod):
  try:
    return __import__(mod).__version__
  except Exception:  # noqa: BLE001
    return None


def fmt_mb(b):
  return "-" if b is None else f"{b / 2**20:,.1f}"


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
  mi = r["machine"]
  lines = [
      f"### Step time and memory: {r['preset']} (N = {r['n_layers']}, "
      f"{r['num_params'] / 1e6:.1f}M params, {r['dtype']}), batch {r['batch']} x "
      f"seq {r['seq']}, {r['layout']} layout, dispatch {r['dispatch']}",
      "",
      f"Machine: {mi['backend']} / {mi.get('cpu', mi['device'])} ({mi['cpu_count']} "
      f"cores), jax {mi['jax']}, flax {mi['flax']}, optax {mi['optax']}"
      + (f"; 1-min load average {mi['load_avg_start'][0]:.1f} at the start, "
         f"{mi['load_avg'][0]:.1f} at the end"
         if mi.get("load_avg_start") and "load_avg" in mi else "") + ".",
      f"Command: `{r['command']}`",
      "",
      "| method | median step (s) | mean step (s) | speed-up vs adamw | cost model | "
      "memory (MiB) | memory / adamw | opt state (MiB) | compile (s) | programs |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in r["rows"]:
    lines.append(
        f"| {row['name']} | {row['median_step_s']:.4f} | {row['mean_step_s']:.4f} | "
        f"{_f(row['speedup_vs_adamw'], '.2f')}x | {row['model_speedup']:.2f}x | "
        f"{fmt_mb(row['memory_bytes'])} | {_f(row['memory_ratio_vs_adamw'], '.3f')} | "
        f"{fmt_mb(row['opt_state_bytes'])} | {row['compile_s']:.2f} | "
        f"{row['programs']} |")
  gpu = [row for row in r["rows"] if row.get("device_memory")]
  if gpu:
    lines += ["", "Device peak memory (process peak after each method; methods run in "
              "ascending expected memory):", ""]
    lines += [f"- {row['name']}: "
              f"{fmt_mb(row['device_memory'].get('peak_bytes_in_use'))} MiB"
              for row in gpu]
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
              "median step (s) | memory (MiB) | compile + steps (s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in ds:
      lines.append(f"| {e['layout']} | {e['dispatch']} | {e['programs']} | "
                   f"{e['compile_s']:.2f} | {e['mean_step_s']:.4f} | "
                   f"{_f(e['median_step_s'], '.4f')} | {fmt_mb(e['memory_bytes'])} | "
                   f"{_f(e.get('compile_plus_steps_s'), '.1f')} |")
  lines += [
      "",
      "Mean step: full backprop, the mean of the timed steps; block methods, the "
      "expected step time over a full schedule period (per-block medians weighted by "
      "the scheme's visit frequencies). Speed-up: adamw's median over the mean (block "
      "methods) or the median (full backprop). Cost model: SPEC §4 (3N vs "
      "N + (N-1-i) + 2; LoRA 2N). Memory: the compiled step's argument + output + "
      "temp - alias bytes (largest program).",
  ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
