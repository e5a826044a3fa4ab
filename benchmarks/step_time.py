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
device's peak memory, the compile time of all its programs, and the matmul FLOPs of a
step with their rate and its fraction of the machine's matmul peak (measured at the
start of the run). Opt-in studies: ``--compile-steps`` (compile time + that many steps
of absignsgd vs adamw, wall-clock from empty caches), ``--dispatch-study`` (block
dispatch: list layout per-block vs ``lax.switch``, stacked layout's dynamic program)
and ``--residual-study`` (absignsgd's step and memory for several numbers of layers
kept above the active one, ``BlockTrainStep(residuals=k)``).

The pieces: ``runners.py`` (what is timed), ``cost_model.py`` (what a step should
cost), ``measure.py`` (how it is measured: one JSON result), ``report.py`` (the JSON
as Markdown, also on its own). What the figures mean is written into the Markdown and
in docs/benchmarks.md; which ratios the project aims for, in BENCHMARKS.md.

``--family flax-gpt`` runs the same measurement on a model the library does not own:
the GPT of ``examples/any_flax_model.py`` (written as Flax NNX's examples write one:
``nnx.List`` of blocks with ``nnx.MultiHeadAttention``, LayerNorm, a GELU MLP),
sized like the preset (width, heads, MLP width, layers, vocabulary), cut by
``absign_jax.cut_nnx``. Its rows are the forward, the full-backprop and the block
methods (LoRA and the PyTorch rows build a Llama).

``--scaling`` hands the remaining options to ``benchmarks/scaling.py``.

Usage::

    python benchmarks/step_time.py --preset smollm2-135m --out runs/step_time
    python benchmarks/step_time.py --preset smollm2-135m --family flax-gpt \
        --methods forward,adamw,absignsgd
    python benchmarks/report.py runs/step_time/step_time_smollm2-135m.json

Writes ``step_time_<preset>.json`` and ``.md`` under ``--out`` and prints the tables
last.
"""

from __future__ import annotations

# absign_jax first, and its allocator before anything else runs: for mimalloc the
# command restarts once under it (absign_jax.allocator), so that XLA:CPU's freed
# temporaries stay mapped. Only as a program: importing this module restarts nothing.
import absign_jax

if __name__ == "__main__":
  absign_jax.allocator.configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

from absign_jax.llm.model import PRESETS  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402  (benchmarks/measure.py)
import report  # noqa: E402  (benchmarks/report.py)
import runners as rn  # noqa: E402  (benchmarks/runners.py)

DISPATCH_CONFIGS = ("list:per_block", "list:switch", "stacked:auto")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--scaling", action="store_true",
                 help="run benchmarks/scaling.py with the remaining options instead")
  p.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
  p.add_argument("--family", default="llama", choices=["llama", "flax-gpt"],
                 help="llama: the project's Llama; flax-gpt: the Flax-example GPT of "
                      "examples/any_flax_model.py at the preset's size, through "
                      "absign_jax.cut_nnx")
  p.add_argument("--model", default=None,
                 help="a .gguf file or a Hugging Face directory to take the shape and "
                      "weights from (read by absign_jax.llm; replaces --preset's random "
                      "initialisation)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="default: the preset's (float32; bfloat16 for qwen3-8b)")
  p.add_argument("--methods", default=None,
                 help=f"comma-separated subset of {','.join(rn.METHODS)}, or 'all' "
                      f"(default: {','.join(rn.DEFAULT_METHODS)}; for --family flax-gpt "
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
  if args.family == "llama":
    args.methods = {None: ",".join(rn.DEFAULT_METHODS), "all": ",".join(rn.METHODS)}.get(
        args.methods, args.methods)
  if args.family == "flax-gpt":
    if args.model is not None:
      p.error("--model reads a Llama-family checkpoint: drop it with --family flax-gpt")
    if (args.memory_only or study not in ("", "none") or args.residual_ks
        or args.remat or args.loss_chunk):
      p.error("--family flax-gpt times the default step only: drop --memory-only, "
              "--dispatch-study, --residual-study, --remat and --loss-chunk")
    if args.methods is None:  # the default: the default rows this family has
      args.methods = ",".join(m for m in rn.DEFAULT_METHODS if m in rn.FLAX_GPT_METHODS)
    elif args.methods == "all":
      args.methods = ",".join(rn.FLAX_GPT_METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    other = [m for m in methods if m not in rn.FLAX_GPT_METHODS]
    if other:
      p.error(f"--family flax-gpt has no rows {other} (LoRA and the PyTorch rows "
              f"build a Llama); choose from {','.join(rn.FLAX_GPT_METHODS)}")
  return args


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


def run_scaling(argv: list[str]):
  """``benchmarks/scaling.py``'s ``main`` with ``argv`` (the options after
  ``--scaling``)."""
  try:
    from scaling import main as scaling_main  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as e:
    if e.name != "scaling":
      raise
    raise SystemExit("--scaling runs benchmarks/scaling.py, which is not in this "
                     "checkout") from None
  return scaling_main(argv)


def _log(msg: str) -> None:
  print(msg, flush=True)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--scaling" in argv:
    return run_scaling([a for a in argv if a != "--scaling"])
  args = parse_args(argv)
  allocator = absign_jax.allocator.status()
  allocator = f"{allocator.name} ({allocator.reason})"
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in methods:
    if m not in rn.METHODS:
      raise SystemExit(f"unknown method {m!r}; choose from {', '.join(rn.METHODS)}")
  measure.configure_jax(args.compilation_cache)
  command = "python benchmarks/step_time.py " + " ".join(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.memory_only:
    result = measure.memory_only(args, [m for m in methods if m not in rn.TORCH_METHODS],
                                 command, _log)
    return save(result, os.path.join(args.out, f"memory_{result['preset']}"))
  if (args.preset == "qwen3-8b" and jax.default_backend() == "cpu"
      and not args.allow_big_cpu):
    raise SystemExit("qwen3-8b needs an accelerator (about 16 GB of bf16 weights, "
                     "65 GB for adamw); pass --allow-big-cpu to run it on the CPU anyway.")
  result = measure.run(args, methods, allocator, command, _log)
  return save(result, os.path.join(args.out, f"step_time_{result['preset']}"))


def save(result: dict, base: str) -> dict:
  """Writes ``base``.json and its Markdown ``base``.md, and prints the Markdown last."""
  with open(base + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  md = report.write(result, base + ".md")
  print(f"\nwrote {base}.json and {base}.md\n")
  print(md)
  return result


if __name__ == "__main__":
  main()
