"""Step time, memory and compile time of ABSignSGD's partial-backprop step vs baselines.

In one run, on the same model, batch and machine (``absignsgd_uniform`` and
``sign_sgd`` only with ``--methods all`` or by name):

* ``forward``            the model's forward and loss only (jitted): the floor
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
* ``torch_forward``      PyTorch: the same model's forward and loss under ``no_grad``
* ``torch_adamw``        PyTorch: transformers' LlamaForCausalLM with the same weights,
                         ``torch.optim.AdamW``, full backprop (``benchmarks/torch_ref.py``)
* ``torch_block_sign``   PyTorch: the one-layer sign step with partial backprop by
                         ``requires_grad``, following absignsgd's block sequence

For every method: the per-step time (block until ready), the CPU time and page faults
per step (``getrusage``), the compiled program's size (``memory_analysis()``:
argument + output + temp - alias bytes), the optimizer state's bytes, on GPU the
device's peak memory, and the compile time of all its programs. Opt-in studies:
``--compile-steps`` (compile time + that many steps of absignsgd vs adamw,
wall-clock from empty caches), ``--dispatch-study`` (block dispatch: list layout
per-block vs ``lax.switch``, stacked layout's dynamic program) and
``--residual-study`` (absignsgd's step and memory for several numbers of layers
kept above the active one, ``BlockTrainStep(residuals=k)``).

What the figures mean (also written into the Markdown output):

* ``median_step_s``: median over the timed steps. For a block method these are the
  ``--sequence-steps`` steps that follow the method's own block schedule (without
  them: the forced per-block timings).
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
* ``model_speedup``: The cost model, in layer forwards: full backprop ``3N``,
  block ``i`` ``N + (N-1-i) + 2``, averaged with ``f_i``. For LoRA: forward plus
  activation backprop through every layer, ``2N`` (adapters ignored); forward ``N``.
* ``compile_plus_100_steps_s``: ``compile_s + 100 x`` the step time the speed-up
  uses, from this run's measured figures (not a separate wall-clock run; that is the
  opt-in compile study).

``--family flax-gpt`` runs the same measurement on a model the library does not own:
the GPT of ``examples/any_flax_model.py`` (written as Flax NNX's examples write one:
``nnx.List`` of blocks with ``nnx.MultiHeadAttention``, LayerNorm, a GELU MLP),
sized like the preset (width, heads, MLP width, layers, vocabulary), cut by
``absign_jax.cut_nnx``. Its rows are the forward, the full-backprop and the block
methods (LoRA and the PyTorch rows build a Llama). ``--compare-to`` a Llama run's
JSON adds the targets "within 10% of the Llama's ratios".

Usage::

    python benchmarks/step_time.py --preset smollm2-135m --out runs/step_time
    python benchmarks/step_time.py --preset smollm2-135m --family flax-gpt \
        --methods forward,adamw,absignsgd \
        --compare-to runs/step_time/step_time_smollm2-135m.json

Writes ``step_time_<preset>.json`` and ``.md`` under ``--out`` and prints the tables
last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, NamedTuple

# absign_jax first: it sets the allocator to keep XLA:CPU's freed temporaries mapped
# (absign_jax.allocator), which must happen before JAX starts its threads.
import absign_jax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "examples"))
import any_flax_model  # noqa: E402  (examples/any_flax_model.py)
import lora as lora_lib  # noqa: E402  (benchmarks/lora.py)
import torch_ref  # noqa: E402  (benchmarks/torch_ref.py)

from absign_jax import profiling  # noqa: E402
from absign_jax.llm import registry  # noqa: E402
from absign_jax.llm.config import RunConfig  # noqa: E402
from absign_jax.llm.model import Llama, LlamaConfig  # noqa: E402

TORCH_METHODS = ("torch_forward", "torch_adamw", "torch_block_sign")
# The optimizers are the registry's (absign_jax/llm/registry.py); adamw first, the
# reference of every other row.
_OPTIMIZERS = tuple(n for n, o in registry.OPTIMIZERS.items() if o.benchmarked)
METHODS = (("forward", "adamw") + tuple(m for m in _OPTIMIZERS if m != "adamw")
           + TORCH_METHODS)
# The rows a run times unless --methods says otherwise (--methods all: every row):
# those the targets read, and BAdam beside them; absignsgd_uniform and sign_sgd are
# context, opt-in, so that the default run fits in 10 minutes on a 2-core CPU.
DEFAULT_METHODS = ("forward", "adamw", "absignsgd", "block_adam", "lora") + TORCH_METHODS
BLOCK_METHODS = tuple(m for m in _OPTIMIZERS if registry.get(m).block)
# Timed block by block (forced active), weighted by visit frequencies.
PER_BLOCK_TIMED = BLOCK_METHODS + ("torch_block_sign",)
# The schedule a method follows (its visit frequencies).
SCHEDULE = {"torch_block_sign": "absignsgd"}
# Run order: ascending expected memory, so that a device's (never reset) peak-memory
# counter read after each method is that method's own peak; PyTorch last.
# (Other optimizers: before adamw, whose state is the largest.)
_BY_MEMORY = ("forward", "absignsgd", "absignsgd_uniform", "block_adam", "lora",
              "sign_sgd")
RUN_ORDER = (_BY_MEMORY
             + tuple(m for m in _OPTIMIZERS if m not in _BY_MEMORY + ("adamw",))
             + ("adamw",) + TORCH_METHODS)
DEPTH_BIAS = 10.0
LORA_RANK = 8
LR, WEIGHT_DECAY = 1e-5, 0.01
DISPATCH_CONFIGS = ("list:per_block", "list:switch", "stacked:auto")
COMPILE_PLUS = 100  # the target's "compilation plus 100 steps"
LOSS_RTOL = 1e-4  # PyTorch's loss against the JAX model's, before timing
# Every row but those that build a Llama (LoRA's adapters, PyTorch's model).
FLAX_GPT_METHODS = tuple(m for m in METHODS if m != "lora" and m not in TORCH_METHODS)
COMPARE_TOLERANCE = 0.10  # another model's ratios: within 10% of the Llama's


# ---------------------------------------------------------------------------------
# model, batch, optimizers
# ---------------------------------------------------------------------------------


class Model:
  """A Llama's pure pieces and its weights: fresh copies on demand, loss, layered loss.

  The weights are built (or read) once, kept on the host, and copied to the device
  for every method (each donates its own parameters).
  """

  def __init__(self, cfg: LlamaConfig, seed: int = 0, module: Llama | None = None):
    self.cfg = cfg if module is None else module.config
    abstract = nnx.eval_shape(lambda: Llama(self.cfg, rngs=nnx.Rngs(seed)))
    self.parts = absign_jax.split_nnx(abstract)
    self._module, self._host, self._seed = module, None, seed

    def lora_graphdef():
      m = Llama(self.cfg, rngs=nnx.Rngs(seed))
      lora_lib.add_lora(m, rank=LORA_RANK, rngs=nnx.Rngs(seed + 1))
      return m

    graphdef = nnx.split(nnx.eval_shape(lora_graphdef), lora_lib.LoRAParam, ...)[0]
    self.lora_loss = lora_lib.lora_loss(graphdef)

  def module(self) -> Llama:
    """A fresh model with the weights (its own device arrays).

    The weights are built on the first call (eagerly, op by op: a jitted init of
    the list layout compiles for minutes on GPU) and kept on the host.
    """
    if self._host is None:
      module = self._module or Llama(self.cfg, rngs=nnx.Rngs(self._seed))
      self._graphdef, state = nnx.split(module)
      self._host = jax.tree.map(np.asarray, state)
      self._module = None
    return nnx.merge(self._graphdef, jax.tree.map(jnp.array, self._host))

  def params(self):
    """Fresh parameters (a device copy), as the steps train them (``split_nnx``
    presents list layers stacked)."""
    return absign_jax.split_nnx(self.module()).params

  def lora(self, model: Llama | None = None):
    """Fresh ``(adapters, frozen base)`` (on ``model``, default a fresh copy)."""
    model = self.module() if model is None else model
    lora_lib.add_lora(model, rank=LORA_RANK, rngs=nnx.Rngs(self._seed + 1))
    _, adapters, base = nnx.split(model, lora_lib.LoRAParam, ...)
    return adapters, base

  def lora_shapes(self):
    """The shapes of :meth:`lora`'s result; builds nothing."""
    return jax.eval_shape(lambda: self.lora(Llama(self.cfg, rngs=nnx.Rngs(self._seed))))


class FlaxGPTShape(NamedTuple):
  """The benchmark's view of ``examples/any_flax_model.py``'s GPT (what ``main`` reads
  of a :class:`LlamaConfig`)."""
  gpt: any_flax_model.GPTConfig
  remat: bool = False
  loss_chunk: int | None = None
  arch: str = "flax-gpt"

  @classmethod
  def like(cls, cfg: LlamaConfig, seq: int) -> "FlaxGPTShape":
    """A GPT with the Llama's width, heads, MLP width, layers and vocabulary."""
    return cls(any_flax_model.GPTConfig(
        vocab=cfg.vocab_size, max_len=max(seq, 8), dim=cfg.dim, heads=cfg.n_heads,
        ff=cfg.hidden_dim, layers=cfg.n_layers, dtype=cfg.dtype))

  n_layers = property(lambda self: self.gpt.layers)
  vocab_size = property(lambda self: self.gpt.vocab)
  dtype = property(lambda self: self.gpt.dtype)

  def num_params(self) -> int:
    return self.gpt.num_params()


class FlaxGPTModel:
  """The GPT of ``examples/any_flax_model.py`` cut by ``absign_jax.cut_nnx``: the
  same ``parts`` / ``params()`` as :class:`Model` (no LoRA)."""

  def __init__(self, shape: FlaxGPTShape, seed: int = 0):
    self.cfg = shape
    self.parts = any_flax_model.cut(any_flax_model.MiniGPT(shape.gpt,
                                                           rngs=nnx.Rngs(seed)))
    self._host = jax.tree.map(np.asarray, self.parts.params)
    self.parts = self.parts._replace(params=None)  # the host copy is the one kept

  def params(self):
    return jax.tree.map(jnp.array, self._host)


def make_batch(cfg: LlamaConfig, batch: int, seq: int, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  x = r.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
          "mask": jnp.ones((batch, seq), jnp.float32)}


# The benchmark's options of the registry's optimizers (they set a step's cost, not its
# quality): LR, weight decay for adamw only, BAdam one step per block in ascending
# order, LoRA at 1e-4.
TX_OPTIONS = {"adamw": dict(weight_decay=WEIGHT_DECAY),
              "block_adam": dict(switch_every=1, block_order="ascending"),
              "lora": dict(lr=1e-4)}


def make_tx(method: str):
  """The optax transformation of optimizer ``method`` (the registry's factory)."""
  entry = registry.get(method)  # (ValueError: no optimizer, e.g. "forward")
  config = RunConfig(**{"lr": None if entry.parameter_free else LR,
                        "depth_bias": DEPTH_BIAS, **TX_OPTIONS.get(method, {})})
  return entry.make(config.lr, config)


def visit_frequencies(method: str, n: int) -> np.ndarray:
  """Long-run visit frequency of each block under the method's selection scheme."""
  if SCHEDULE.get(method, method) == "absignsgd":
    tau = np.array(absign_jax.blocks.selection.depth_biased_costs(n, DEPTH_BIAS), np.float64)
    f = 1.0 / tau
  else:  # uniform, cyclic
    f = np.ones(n)
  return f / f.sum()


def model_speedup(method: str, n: int) -> float:
  """The cost model: full backprop 3N; block i: N + (N-1-i) + 2."""
  if method in PER_BLOCK_TIMED:
    f = visit_frequencies(method, n)
    cost = float(np.sum(f * np.array([n + (n - 1 - i) + 2 for i in range(n)])))
    return 3 * n / cost
  if method == "lora":
    return 3 * n / (2 * n)
  if method in ("forward", "torch_forward"):
    return 3.0
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


class ForwardRunner:
  """The model's forward and loss only, jitted (no gradient, no update): the floor."""

  def __init__(self, loss_fn, params, batch):
    self.fn = jax.jit(loss_fn)
    self.params, self.batch, self.opt_state = params, batch, ()
    self.step = None

  def __call__(self, block: int | None = None) -> tuple[float, None]:
    del block
    t = time.perf_counter()
    jax.block_until_ready(self.fn(self.params, self.batch))
    return time.perf_counter() - t, None

  def lower(self, block=None):
    del block
    return self.fn.lower(self.params, self.batch)


def _median(xs):
  return float(statistics.median(xs)) if xs else None


def _mean(xs):
  return float(statistics.fmean(xs)) if xs else None


def make_runner(method: str, model: Model, batch: dict, layout_model: Model,
                dispatch: str, donate: bool = True,
                residuals: int | None = None,
                save_inputs_every: int = 1) -> tuple[Any, Any]:
  """A fresh step, parameters and optimizer state for ``method`` (JAX methods);
  ``residuals``: the block step's residual policy (None: the library's default);
  ``save_inputs_every``: see :class:`absign_jax.BlockTrainStep`."""
  if method == "forward":
    return ForwardRunner(layout_model.parts.loss_fn, layout_model.params(), batch), None
  tx = make_tx(method)
  if method == "lora":
    adapters, base = model.lora()
    step = absign_jax.FullTrainStep(model.lora_loss, tx, donate=donate)
    return Runner(step, step.init(adapters), {"data": batch, "base": base}), tx
  m = layout_model
  params = m.params()
  if method in BLOCK_METHODS:
    step = absign_jax.BlockTrainStep(m.parts.loss_fn, tx, layered=m.parts.layered,
                                     dispatch=dispatch, donate=donate,
                                     residuals=residuals,
                                     save_inputs_every=save_inputs_every)
  else:
    step = absign_jax.FullTrainStep(m.parts.loss_fn, tx, donate=donate)
  return Runner(step, step.init(params), batch), tx


def programs_of(runner, n: int) -> list[int | None]:
  """The distinct programs a step runs: one per block (per-block dispatch) or one."""
  step = getattr(runner, "step", None)
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
  programs = programs_of(runner, n)
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


def summarize_block(method, n, per_block, seq, seq_blocks, warm, log) -> dict:
  t_block = np.array([statistics.median(per_block[b]) for b in range(n)])
  f = visit_frequencies(method, n)
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
method in ``SCHEDULE`` runs the block its leader just ran: the same sequence). With
  one runner this is the sequential measurement. Every call's CPU usage
  (``getrusage``) is recorded too.
  """
  blocky = [m for m in runners if m in PER_BLOCK_TIMED]
  full = [m for m in runners if m not in PER_BLOCK_TIMED]
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
      dt, b = call(m, last.get(SCHEDULE.get(m)))
      last[m] = b
      seq[m].append(dt)
      seq_blocks[m].append(b)
  return per_block, full_times, seq, seq_blocks, usage


def measure(method, runner, n, args, compiled_first, log) -> dict:
  """Warm-up and timings of one method on its own (the sequential measurement).

  PyTorch runners are eager: nothing to compile (their first call is made when they
  are built).
  """
  warm = None if method in TORCH_METHODS else warm_up(runner, n, compiled_first)
  per_block, full_times, seq, seq_blocks, usage = time_methods(
      {method: runner}, n, args.steps, args.block_repeats, args.sequence_steps)
  if method in PER_BLOCK_TIMED:
    out = summarize_block(method, n, per_block[method], seq[method],
                          seq_blocks[method], warm, log)
  else:
    out = summarize_full(full_times[method], warm)
  out.update(usage_summary(usage[method]))
  out["_warm"] = warm
  return out


def runner_memory(runner, n, executables: dict | None = None) -> dict:
  """The largest program's sizes (per-block dispatch: blocks 0 and N-1).

  A single program is lowered for block 0: the same program for every block, and a
  block that works without reading the (possibly abstract) optimizer state.
  Programs already compiled (``executables``, from :func:`warm_up`) are reused.
  """
  executables = executables or {}
  single = programs_of(runner, n) == [None]
  progs = [0] if single else sorted({0, n - 1})
  sizes = []
  for p in progs:
    compiled = executables.get(None if single else p)
    if compiled is None:
      compiled = runner.lower(block=p).compile()
    sizes.append(profiling.program_memory(compiled))
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
# PyTorch rows
# ---------------------------------------------------------------------------------


def torch_runners(methods, model: Model, batch: dict, rows: dict, jax_loss: float,
                  log) -> dict:
  """The PyTorch rows' runners, after checking that PyTorch's loss equals ours.

  Raises ``SystemExit`` when the losses differ by more than ``LOSS_RTOL`` (relative):
  then the two would not time the same model.
  """
  n = model.cfg.n_layers
  rng = np.random.default_rng(0)
  freq = visit_frequencies("absignsgd", n)
  out = {}
  host_batch = {k: np.asarray(v) for k, v in batch.items()}
  for method in methods:
    log(f"[{method}]")
    t0 = time.perf_counter()
    tmodel = torch_ref.build(model.module())
    loss_t = torch_ref.eval_loss(tmodel, torch_ref.torch_batch(host_batch))
    rel = abs(loss_t - jax_loss) / max(abs(jax_loss), 1e-12)
    log(f"  PyTorch loss {loss_t:.6f} vs JAX {jax_loss:.6f} (relative difference "
        f"{rel:.2e}); built in {time.perf_counter() - t0:.1f} s")
    if not rel <= LOSS_RTOL:
      raise SystemExit(f"{method}: PyTorch's loss {loss_t} differs from the JAX "
                       f"model's {jax_loss} by {rel:.2e} (relative), more than "
                       f"{LOSS_RTOL}: the two do not compute the same function.")
    if method == "torch_forward":
      r = torch_ref.ForwardRunner(tmodel, host_batch)
      first = r()[0]
    elif method == "torch_adamw":
      r = torch_ref.AdamWRunner(tmodel, host_batch, LR, WEIGHT_DECAY)
      first = r()[0]
    else:
      # Without absignsgd in the run to follow: draws from its visit frequencies.
      r = torch_ref.BlockSignRunner(tmodel, host_batch, LR,
                                    next_block=lambda: int(rng.choice(n, p=freq)))
      first = r(block=0)[0]
    rows[method] = {
        "name": method,
        "loss_check": {"jax": jax_loss, "torch": loss_t, "relative_difference": rel},
        "first_call_s": first, "memory_bytes": None, "memory_detail": None,
        "param_bytes": sum(p.numel() * p.element_size() for p in tmodel.parameters()),
        "opt_state_bytes": r.state_bytes() if hasattr(r, "state_bytes") else 0,
        "device_memory": None, "model_speedup": model_speedup(method, n),
        **torch_ref.versions()}
    out[method] = r
  return out


# ---------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------


def step_of(row: dict) -> float:
  """The step time a row's speed-up uses: mean (block methods) or median."""
  return row["mean_step_s"] if row["name"] in PER_BLOCK_TIMED else row["median_step_s"]


# The ratios the targets read, also compared across runs (--compare-to):
RATIOS = {  # name -> (the ratio from a run's rows, how it is computed)
    "absignsgd speed-up vs adamw": (lambda r: r["absignsgd"]["speedup_vs_adamw"],
                                    "adamw median / absignsgd mean"),
    "absignsgd memory vs adamw": (lambda r: r["absignsgd"]["memory_ratio_vs_adamw"],
                                  "compiled bytes"),
    "absignsgd step / forward": (lambda r: step_of(r["absignsgd"]) / step_of(r["forward"]),
                                 "absignsgd mean / forward median"),
}


def check_targets(rows: dict) -> list[dict]:
  """The step-time targets that this run's rows can decide, with their margins."""
  a, w, f = rows.get("absignsgd"), rows.get("adamw"), rows.get("forward")
  tb, ta = rows.get("torch_block_sign"), rows.get("torch_adamw")
  out = []

  def add(target, value, limit, below, how):
    if value is None:
      return
    out.append({"target": target, "value": float(value), "limit": limit,
                "met": bool(value <= limit if below else value >= limit), "how": how})

  ratio = {name: fn for name, (fn, _) in RATIOS.items()}
  if a and w:
    add("absignsgd >= 2.0x faster per step than adamw",
        ratio["absignsgd speed-up vs adamw"](rows), 2.0, False,
        "adamw median / absignsgd mean")
    add("absignsgd memory <= 0.30x adamw's", ratio["absignsgd memory vs adamw"](rows),
        0.30, True, "compiled bytes, largest program")
    add(f"compile + {COMPILE_PLUS} steps of absignsgd < {COMPILE_PLUS} steps of adamw",
        a["compile_plus_100_steps_s"] / (COMPILE_PLUS * step_of(w)), 1.0, True,
        f"(absignsgd compile_s + {COMPILE_PLUS} x mean) / ({COMPILE_PLUS} x adamw "
        "median), from this run's figures")
  if a and f:
    add("absignsgd step <= 1.5x forward", ratio["absignsgd step / forward"](rows), 1.5,
        True, "absignsgd mean / forward median")
  if a and tb:
    add("absignsgd step <= 0.8x torch_block_sign", step_of(a) / step_of(tb), 0.8, True,
        "means over the same visit frequencies")
  if w and ta:
    add("adamw step <= 0.9x torch_adamw", step_of(w) / step_of(ta), 0.9, True,
        "medians")
  return out


def compare_targets(rows: dict, path: str | None) -> list[dict]:
  """This run's ratios against another run's (``--compare-to``): each within 10%."""
  if path is None:
    return []
  with open(path) as f:
    other = json.load(f)
  theirs = {row["name"]: row for row in other["rows"]}
  out = []
  for name, (ratio, how) in RATIOS.items():
    try:
      mine, ref = ratio(rows), ratio(theirs)
    except (KeyError, TypeError):
      continue  # a row this run or the other did not measure
    if mine is None or ref is None:
      continue
    rel = abs(mine / ref - 1.0)
    out.append({"target": f"{name} within {COMPARE_TOLERANCE:.0%} of "
                          f"{other['preset']}'s ({ref:.3f})",
                "value": float(rel), "limit": COMPARE_TOLERANCE,
                "met": bool(rel <= COMPARE_TOLERANCE),
                "how": f"|this run's {mine:.3f} / {ref:.3f} - 1| ({how})"})
  return out


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="smollm2-135m",
                 choices=["tiny", "gpt2-small", "smollm2-135m", "qwen3-8b"])
  p.add_argument("--family", default="llama", choices=["llama", "flax-gpt"],
                 help="llama: the project's Llama; flax-gpt: the Flax-example GPT of "
                      "examples/any_flax_model.py at the preset's size, through "
                      "absign_jax.cut_nnx")
  p.add_argument("--compare-to", default=None, metavar="JSON",
                 help="a Llama run's step_time_*.json: adds the targets that this "
                      "run's ratios are within 10%% of its ratios")
  p.add_argument("--model", default=None,
                 help="a .gguf file or a Hugging Face directory to take the shape and "
                      "weights from (read by absign_jax.llm; replaces --preset's random "
                      "initialisation)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="default: the preset's (float32; bfloat16 for qwen3-8b)")
  p.add_argument("--methods", default=None,
                 help=f"comma-separated subset of {','.join(METHODS)}, or 'all' "
                      f"(default: {','.join(DEFAULT_METHODS)}; for --family flax-gpt "
                      f"the same without LoRA and PyTorch)")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps of every full-backprop method (and the forward)")
  p.add_argument("--block-repeats", type=int, default=1,
                 help="forced-active timings of every block (block methods)")
  p.add_argument("--sequence-steps", type=int, default=10,
                 help="steps of every block method along its own schedule (the "
                      "median step and a cross-check of the weighted mean)")
  p.add_argument("--layout", default="stacked", choices=["list", "stacked"],
                 help="the layers' layout (stacked: what the fine-tuning program runs)")
  p.add_argument("--dispatch", default="auto", choices=["auto", "per_block", "switch"])
  p.add_argument("--save-inputs-every", type=int, default=1, metavar="K",
                 help="block methods: save every K-th recomputed layer's input only and "
                      "replay the segments between in the backward (less memory, one "
                      "more forward per recomputed layer)")
  p.add_argument("--interleave", default="auto", choices=["auto", "on", "off"],
                 help="time all methods interleaved step by step, so that they see "
                      "the same machine load (all stay in memory at once); auto: on "
                      "for the CPU, off on accelerators")
  p.add_argument("--compile-steps", type=int, default=0,
                 help="opt-in compile study: this many steps of absignsgd and of adamw "
                      "from empty caches, wall-clock (e.g. 100; 0: skip)")
  p.add_argument("--dispatch-study", default="none",
                 help="opt-in: layout:dispatch configurations of absignsgd to compare, "
                      f"e.g. {','.join(DISPATCH_CONFIGS)} ('none': skip)")
  p.add_argument("--residual-study", default="none",
                 help="opt-in: absignsgd with residuals=k for each k of this comma "
                      "list (layers kept above the active one; stacked layout), e.g. "
                      "0,8,16,29 ('none': skip)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for the PyTorch rows (default: the core "
                      "count)")
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
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="use JAX's persistent compilation cache in DIR (off by default, "
                      "so that compile times are compilations; with it, a program "
                      "compiled by an earlier run is read back: for repeated smoke runs)")
  p.add_argument("--out", default="runs/step_time")
  args = p.parse_args(argv)
  args.argv = argv
  for name in ("steps", "block_repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be at least 1")
  if args.sequence_steps < 0 or args.compile_steps < 0:
    p.error("--sequence-steps and --compile-steps must be >= 0")
  study = args.dispatch_study.strip()
  for config in ([] if study in ("", "none") else study.split(",")):
    lay, _, disp = config.partition(":")
    if lay not in ("list", "stacked") or disp not in ("auto", "per_block", "switch"):
      p.error(f"--dispatch-study: {config!r} is not layout:dispatch with layout list "
              f"or stacked and dispatch auto, per_block or switch (e.g. "
              f"{','.join(DISPATCH_CONFIGS)})")
  args.residual_ks = parse_residual_study(p, args.residual_study)
  if args.residual_ks and args.layout != "stacked":
    p.error("--residual-study times the stacked program (what residuals= applies "
            "to): drop --layout list")
  if args.model is not None and not os.path.exists(args.model):
    p.error(f"--model {args.model}: no such file or directory")
  if args.compare_to is not None and not os.path.isfile(args.compare_to):
    p.error(f"--compare-to {args.compare_to}: no such file (a step_time_*.json)")
  if args.family == "llama":
    args.methods = {None: ",".join(DEFAULT_METHODS), "all": ",".join(METHODS)}.get(
        args.methods, args.methods)
  if args.family == "flax-gpt":
    if args.model is not None:
      p.error("--model reads a Llama-family checkpoint: drop it with --family flax-gpt")
    if (args.memory_only or study not in ("", "none") or args.residual_ks
        or args.remat or args.loss_chunk):
      p.error("--family flax-gpt times the default step only: drop --memory-only, "
              "--dispatch-study, --residual-study, --remat and --loss-chunk")
    if args.methods is None:  # the default: the default rows this family has
      args.methods = ",".join(m for m in DEFAULT_METHODS if m in FLAX_GPT_METHODS)
    elif args.methods == "all":
      args.methods = ",".join(FLAX_GPT_METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    other = [m for m in methods if m not in FLAX_GPT_METHODS]
    if other:
      p.error(f"--family flax-gpt has no rows {other} (LoRA and the PyTorch rows "
              f"build a Llama); choose from {','.join(FLAX_GPT_METHODS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  allocator = absign_jax.allocator.status()
  allocator = "kept (glibc)" if allocator.applied else f"system ({allocator.reason})"
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  else:
    jax.config.update("jax_enable_compilation_cache", False)  # honest compile times
  backend = jax.default_backend()
  if args.memory_only:
    return memory_only(args, [m for m in methods if m not in TORCH_METHODS])
  if args.preset == "qwen3-8b" and backend == "cpu" and not args.allow_big_cpu:
    raise SystemExit("qwen3-8b needs an accelerator (about 16 GB of bf16 weights, "
                     "65 GB for adamw); pass --allow-big-cpu to run it on the CPU anyway.")
  load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
  t_start = time.perf_counter()

  base_cfg, layout, name = config_for(args)
  n = base_cfg.n_layers
  models = {}

  def model_for(lay):
    if lay not in models:
      models[lay] = load_model(args, base_cfg if isinstance(base_cfg, FlaxGPTShape)
                               else base_cfg.replace(scan_layers=(lay == "stacked")))
    return models[lay]

  model = model_for(layout)
  batch = make_batch(base_cfg, args.batch, args.seq)
  os.makedirs(args.out, exist_ok=True)

  def log(msg):
    print(msg, flush=True)

  log(f"step_time: {name} ({base_cfg.num_params() / 1e6:.1f}M params, N={n}, "
      f"{base_cfg.dtype}, remat={base_cfg.remat}, loss_chunk={base_cfg.loss_chunk}), "
      f"batch {args.batch} x seq {args.seq}, layout {layout}, dispatch {args.dispatch}, "
      f"{backend}: {jax.devices()[0].device_kind}")

  torch_methods = [m for m in TORCH_METHODS if m in methods]
  torch_note = None
  if torch_methods:
    torch_note = torch_ref.available()
    if torch_note is None and backend != "cpu":
      torch_note = f"skipped: the PyTorch rows run on the CPU, JAX here on {backend}"
    if torch_note is None and base_cfg.dtype != "float32":
      torch_note = "skipped: the PyTorch rows are float32 only"
    if torch_note is None and base_cfg.arch != "llama":
      torch_note = f"skipped: the PyTorch rows build LlamaForCausalLM, not {base_cfg.arch}"
    if torch_note is not None:
      log(f"[{', '.join(torch_methods)}] {torch_note}")
      torch_methods = []

  rows: dict[str, dict] = {}
  compile_study: dict[str, dict] = {}
  order = [m for m in RUN_ORDER if m in methods and m not in TORCH_METHODS]
  interleave = (args.interleave == "on"
                or (args.interleave == "auto" and backend == "cpu"))
  runners, warms = {}, {}
  jax_loss = None
  for method in order:
    log(f"[{method}]")
    runner, _ = make_runner(method, model, batch, model, args.dispatch,
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
    row["model_speedup"] = model_speedup(method, n)
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
    t_runners = torch_runners(torch_methods, model, batch, rows, jax_loss, log)
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
        if method not in TORCH_METHODS:
          for prog in programs_of(runner, n):
            runner(block=prog)
    log(f"[timing {', '.join(runners)}, interleaved step by step]")
    t0 = time.perf_counter()
    per_block, full_times, seq, seq_blocks, usage = time_methods(
        runners, n, args.steps, args.block_repeats, args.sequence_steps)
    log(f"  {time.perf_counter() - t0:.1f} s")
    for method in runners:
      if method in PER_BLOCK_TIMED:
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

  # speed-ups and memory ratios against adamw; compile + 100 steps
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

  compile_summary = summarize_compile_study(compile_study, rows)
  dispatch = dispatch_study(args, n, model_for, batch, layout, rows, log)
  residual = residual_study(args, n, model_for, batch, layout, rows, log)

  result = {
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
                      allocator=allocator, ld_preload=os.environ.get("LD_PRELOAD")),
      "command": "python benchmarks/step_time.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "rows": [rows[m] for m in METHODS if m in rows],
      "torch_note": torch_note,
      "targets": check_targets(rows) + compare_targets(rows, args.compare_to),
      "compile_study": compile_summary,
      "dispatch_study": dispatch,
      "residual_study": residual,
      "wall_s": time.perf_counter() - t_start,
  }
  base = os.path.join(args.out, f"step_time_{name}")
  with open(base + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  md = markdown(result)
  with open(base + ".md", "w") as fh:
    fh.write(md)
  print(f"\nwrote {base}.json and {base}.md\n")
  print(md)
  return result


def config_for(args) -> tuple[LlamaConfig, str, str]:
  """The preset (or ``--model``'s config) with the overrides, the layout, a name."""
  layout = args.layout
  overrides: dict[str, Any] = {"max_seq_len": max(args.seq, 8)}
  if args.dtype:
    overrides["dtype"] = args.dtype
  if args.remat:
    overrides["remat"] = args.remat == "on"
  if args.loss_chunk is not None:
    overrides["loss_chunk"] = args.loss_chunk
  if args.model is None:
    cfg = LlamaConfig.preset(args.preset, **overrides)
    if args.family == "flax-gpt":
      return FlaxGPTShape.like(cfg, args.seq), "list", f"{args.preset}-flax-gpt"
    return cfg, layout, args.preset
  from absign_jax.llm import export  # pylint: disable=g-import-not-at-top
  cfg, _ = export.read_config_and_tokenizer(args.model)
  name = os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
  return cfg.replace(**overrides), layout, name


def load_model(args, cfg: LlamaConfig) -> Model:
  """The benchmark's :class:`Model`: random weights, or ``--model``'s."""
  if isinstance(cfg, FlaxGPTShape):
    return FlaxGPTModel(cfg)
  if args.model is None:
    return Model(cfg)
  from absign_jax.llm import export  # pylint: disable=g-import-not-at-top
  _, module, _ = export.load_model(
      args.model, dtype=cfg.dtype, scan_layers=cfg.scan_layers, remat=cfg.remat,
      loss_chunk=cfg.loss_chunk, max_seq_len=cfg.max_seq_len)
  return Model(cfg, module=module)


def memory_only(args, methods: list[str]) -> dict:
  """Compiled sizes of every method's largest program, from shapes alone."""
  cfg, layout, name = config_for(args)
  n = cfg.n_layers
  model = Model(cfg.replace(scan_layers=(layout == "stacked")))
  shape = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    tree)
  params = shape(model.parts.params)
  batch = shape(make_batch(cfg, args.batch, args.seq))
  rows = []
  for method in methods:
    if method == "forward":
      runner = ForwardRunner(model.parts.loss_fn, params, batch)
    elif method == "lora":
      tx = make_tx(method)
      adapters, base = model.lora_shapes()
      step = absign_jax.FullTrainStep(model.lora_loss, tx)
      runner = Runner(step, jax.eval_shape(step.init, adapters),
                      {"data": batch, "base": base})
    elif method in BLOCK_METHODS:
      step = absign_jax.BlockTrainStep(model.parts.loss_fn, make_tx(method),
                                       layered=model.parts.layered,
                                       dispatch=args.dispatch,
                                       save_inputs_every=args.save_inputs_every)
      runner = Runner(step, jax.eval_shape(step.init, params), batch)
    else:
      step = absign_jax.FullTrainStep(model.parts.loss_fn, make_tx(method))
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
  result = {"preset": name, "n_layers": n, "num_params": cfg.num_params(),
            "batch": args.batch, "seq": args.seq, "dtype": cfg.dtype, "remat": cfg.remat,
            "loss_chunk": cfg.loss_chunk, "layout": layout,
            "machine": profiling.machine_info(), "rows": rows,
            "command": "python benchmarks/step_time.py " + " ".join(
                sys.argv[1:] if args.argv is None else args.argv)}
  lines = [f"### Compiled memory (no run): {name} ({cfg.num_params() / 1e6:,.1f}M "
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
  base = os.path.join(args.out, f"memory_{name}")
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


def parse_residual_study(p, spec: str) -> list[int]:
  """The ``k`` values of ``--residual-study`` (an empty list for 'none')."""
  spec = spec.strip()
  if spec in ("", "none"):
    return []
  try:
    ks = [int(k) for k in spec.split(",")]
  except ValueError:
    ks = [-1]
  if any(k < 0 for k in ks):
    p.error(f"--residual-study {spec!r}: give layers to keep as integers >= 0, "
            f"comma-separated (e.g. 0,8,16,29)")
  return ks


def residual_study(args, n, model_for, batch, layout, rows, log) -> list[dict] | None:
  """absignsgd's mean step and compiled bytes for each ``--residual-study`` k.

  Every k's step and the forward are timed interleaved, block by block (each block
  ``--block-repeats`` times per k), so that all see the same machine load: on a
  shared VM, timings taken one configuration after the other drifted by up to 50%
  over a few minutes. ``step_over_forward`` divides by the forward timed alongside.
  """
  if not args.residual_ks:
    return None
  m = model_for(layout)
  forward, _ = make_runner("forward", m, batch, m, args.dispatch)
  forward()
  runners, memory = {}, {}
  for k in args.residual_ks:
    log(f"[residual study: absignsgd, residuals={k}: compiling]")
    runners[k], _ = make_runner("absignsgd", m, batch, m, args.dispatch, residuals=k)
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
  f = visit_frequencies("absignsgd", n)
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


def fmt_mb(b):
  return "-" if b is None else f"{b / 2**20:,.1f}"


def _f(x, spec):
  return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
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
      wall = (row["sequence_mean_step_s"] if row["name"] in PER_BLOCK_TIMED
              and row.get("sequence_mean_step_s") else row["mean_step_s"])
      lines.append(f"| {row['name']} | {wall:.4f} | {row['cpu_user_s']:.3f} | "
                   f"{row['cpu_sys_s']:.3f} | {row['minor_faults']:,.0f} | "
                   f"{row['involuntary_switches']:,.0f} |")
  gpu = [row for row in r["rows"] if row.get("device_memory")]
  if gpu:
    lines += ["", "Device peak memory (process peak after each method; methods run in "
              "ascending expected memory):", ""]
    lines += [f"- {row['name']}: "
              f"{fmt_mb(row['device_memory'].get('peak_bytes_in_use'))} MiB"
              for row in gpu]
  if r.get("targets"):
    lines += ["", "Targets:", "", "| target | value | limit | status | how |",
              "|---|---:|---:|---|---|"]
    for t in r["targets"]:
      lines.append(f"| {t['target']} | {t['value']:.3f} | {t['limit']} | "
                   f"{'met' if t['met'] else 'missed'} | {t['how']} |")
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
      "or the median (the others). Cost model, in layer forwards: full backprop 3N, block i N + (N-1-i) + 2; LoRA "
      "2N; forward N. Memory: the compiled step's argument + output + temp - alias "
      "bytes (largest program). Compile + 100 steps: compile time plus 100 times the "
      "step time the speed-up uses, from this run's figures (the opt-in compile study "
      "measures it as wall-clock).",
  ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
