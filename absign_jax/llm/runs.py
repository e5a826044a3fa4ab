"""A fine-tuning run's records: its folder, metrics log, checkpoints, resume and summary.

A run's folder (``--out``, default a new ``runs/version_N``) holds ``config.toml``
(its options: ``--config`` reruns it), ``metrics.jsonl`` (one record per step,
:class:`RunLog`; with ``--tensorboard`` also TensorBoard event files of the same
scalars), ``summary.json``, ``loss.png`` and ``checkpoints/`` (orbax, with the
settings that shape the training: :func:`run_settings`). :func:`restore_run`
continues a run from its newest intact checkpoint once its settings are checked
(:func:`check_resume_settings`); :func:`load_run` reads a run's tuned model back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import numpy as np

import absign_jax
from absign_jax.llm import checks
from absign_jax.llm import loading
from absign_jax.llm import peers as peers_lib
from absign_jax.llm import registry

if TYPE_CHECKING:  # (the options' module imports this one)
  from absign_jax.llm.config import RunConfig

UsageError = checks.UsageError  # the command line or its files: a message, exit code 2

# Settings a resumed run must share with the checkpoint it continues: each changes the
# data, the model or the training trajectory. --allow-changed accepts named changes.
RESUME_SETTINGS = ("optimizer", "precision", "model", "task", "data", "seq", "batch",
                   "seed", "lr", "schedule", "warmup", "steps", "time_budget",
                   "token_budget", "weight_decay", "depth_bias", "selection",
                   "switch_every", "block_order", "lora_rank", "lora_alpha",
                   "lora_targets", "galore_rank", "galore_gap", "galore_scale", "relative",
                   "micro_batches", "momentum", "shallow_step", "depth_bias_end",
                   "train_embedding", "train_head")
RUNS_ROOT = "runs"  # where runs without --out get their folder
TENSORBOARD_EXTRA = "pip install 'absign-jax[tensorboard]'"


@dataclasses.dataclass
class RunResult:
  optimizer: str
  summary: dict[str, Any]
  curve: list[tuple[float, float]]  # (wall-clock s, train loss)
  eval_curve: list[tuple[float, float]]  # (wall-clock s, held-out ppl): heldout_curve


# -- the run's folder --------------------------------------------------------------------


def new_version(root: str = RUNS_ROOT) -> int:
  """Creates ``root/version_N`` and returns N: one above the highest there, as
  Lightning's loggers number their runs (never a number a run has used)."""
  os.makedirs(root, exist_ok=True)
  while True:
    taken = [int(m.group(1)) for d in os.listdir(root)
             if (m := re.fullmatch(r"version_(\d+)", d))]
    version = max(taken, default=-1) + 1
    try:
      os.mkdir(os.path.join(root, f"version_{version}"))
      return version
    except FileExistsError:
      continue  # another run took it first


def version_dir(version: int, root: str = RUNS_ROOT) -> str:
  return os.path.join(root, f"version_{version}")


# -- the metrics log ---------------------------------------------------------------------


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


class TensorBoard:
  """TensorBoard event files in ``logdir``: every number of a record, as a scalar of
  the record's step under the record's key (those of ``metrics.jsonl``)."""

  def __init__(self, logdir: str, purge_step: int | None = None):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError("--tensorboard needs the tensorboardX package: "
                        f"{TENSORBOARD_EXTRA}") from None
    # purge_step: a resumed run hides the steps logged after its checkpoint.
    self._writer = SummaryWriter(logdir, purge_step=purge_step)

  def write(self, record: Mapping[str, Any]) -> None:
    for key, value in record.items():
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if key != "step" and number:
        self._writer.add_scalar(key, value, record["step"])

  def close(self) -> None:
    self._writer.close()


class RunLog:
  """``metrics.jsonl``: one JSON record per step, written and flushed line by line.

  A resumed run keeps the records up to the checkpoint's step (a killed run may have
  logged steps past its last checkpoint; they are trained again) and appends, so the
  log holds each step once and the summary is computed from all of it. With
  ``tensorboard``, the same records also go to TensorBoard event files beside it.
  """

  def __init__(self, path: str, resume_step: int | None = None,
               tensorboard: bool = False):
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
    self._tensorboard = TensorBoard(
        os.path.dirname(path) or ".",
        None if resume_step is None else resume_step + 1) if tensorboard else None
    self._file = open(path, "a" if resume_step is not None else "w")

  def write(self, record: dict) -> None:
    self.records.append(record)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a killed process loses no line it has written
    if self._tensorboard is not None:
      self._tensorboard.write(record)

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


# -- settings and resume -----------------------------------------------------------------


def data_fingerprint(sequences) -> str:
  """SHA-256 (16 hex digits) of training sequences: names the data, not the path."""
  h = hashlib.sha256(np.ascontiguousarray(sequences.tokens).tobytes())
  h.update(np.ascontiguousarray(sequences.mask).tobytes())
  if sequences.segment_ids is not None:
    h.update(np.ascontiguousarray(sequences.segment_ids).tobytes())
  return h.hexdigest()[:16]


def run_settings(config: RunConfig, name: str, data: str,
                 family: str | None = None) -> dict[str, Any]:
  """What shapes the training of run ``name``, saved with every checkpoint.

  Args:
    config: The run's options.
    name: Its optimizer.
    data: :func:`data_fingerprint` of its training sequences.
    family: The model's family (its default learning rate).
  """
  entry = registry.get(name)
  path = lambda f: None if f is None else os.path.abspath(f)
  settings = {
      "optimizer": name, "precision": config.precision,
      "model": path(config.model),
      "data": data, "seq": config.seq, "batch": config.batch,
      "seed": config.seed, "lr": registry.peak_learning_rate(config, name, family),
      "schedule": config.schedule, "warmup": config.warmup,
  }
  if config.micro_batches > 1:  # (absent: one slice, as in runs from before the option)
    settings["micro_batches"] = config.micro_batches
  if config.schedule == "cosine":  # the decay ends at --steps / --time-budget
    settings.update(steps=config.steps, time_budget=config.time_budget)
    if config.token_budget is not None:
      settings["token_budget"] = config.token_budget
  if not entry.parameter_free:
    settings["weight_decay"] = config.weight_decay
  if config.task:
    settings["task"] = config.task
  settings.update(entry.settings(config))
  return settings


def check_resume_settings(saved: dict, current: dict, allowed: Sequence[str] = (),
                          where: str = "") -> list:
  """Raises :class:`UsageError` naming every setting that differs (unless allowed).

  Returns:
    The accepted differences, as ``(setting, saved, current)``.
  """
  flag = {"model": "--model", "data": "--data (the training sequences)",
          "time_budget": "--time-budget", "token_budget": "--token-budget",
          "weight_decay": "--weight-decay", "depth_bias": "--depth-bias"}
  diffs = [(k, saved.get(k), current.get(k)) for k in RESUME_SETTINGS
           if k in saved or k in current if saved.get(k) != current.get(k)]
  refused = [d for d in diffs if d[0] not in allowed]
  if refused:
    lines = [f"{flag.get(k, '--' + k.replace('_', '-'))}: {a!r} in the checkpoint, {b!r} now"
             for k, a, b in refused]
    raise UsageError(
        f"--resume: this run's settings differ from those saved with the checkpoint"
        f"{where}:\n  - " + "\n  - ".join(lines) + "\nEach changes the data, the model "
        "or the training schedule, so the resumed run would not continue the same "
        "training. Run with the saved values, or accept the change with "
        f"--allow-changed {','.join(k for k, _, _ in refused)}.")
  return diffs


def check_no_checkpoints(ckpt, out_dir: str) -> None:
  """A new run refuses a folder that holds another run's checkpoints."""
  if ckpt.all_steps():
    ckpt.close()
    raise UsageError(f"{out_dir} already holds checkpoints of a run (steps "
                     f"{ckpt.all_steps()}): add --resume to continue it, or choose "
                     "another --out")


def restore_run(ckpt, state, settings: dict, allowed: Sequence[str], name: str):
  """``(state, step, wall_s)`` of the newest intact checkpoint, its settings checked
  (closes ``ckpt`` when it cannot continue)."""
  try:
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
      print(f"[{name}] note: checkpoint {restored.step} records no settings; they are "
            "not compared", flush=True)
    else:
      where = f" (step {restored.step} in {ckpt.directory})"
      for key, old, new in check_resume_settings(saved, settings, allowed, where):
        print(f"[{name}] --allow-changed {key}: {old!r} in the checkpoint, {new!r} now",
              flush=True)
  except UsageError:
    ckpt.close()
    raise
  start = restored.data_state["step"]
  print(f"[{name}] resumed from step {start}", flush=True)
  return restored.state, start, restored.data_state.get("wall_s", 0.0)


def finished(config: RunConfig, step: int, wall: float) -> bool:
  """Whether a run at ``step`` with ``wall`` seconds of training has nothing left."""
  return step >= config.total_steps or (config.time_budget is not None
                                        and wall >= config.time_budget)


# -- the summary -------------------------------------------------------------------------


def summary_is_complete(path: str, step: int) -> bool:
  """``summary.json`` exists and describes the finished run at ``step``."""
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return False
  return summary.get("steps") == step and not summary.get("interrupted")


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


def run_result(name: str, summary: dict, records: list[dict]) -> RunResult:
  """The :class:`RunResult` of a run's summary and records."""
  curve = [(r["wall_s"], r["loss"]) for r in records]
  return RunResult(name, summary, curve, heldout_curve(summary, records))


def result_from_files(name: str, out_dir: str) -> RunResult:
  """The :class:`RunResult` of a finished run, read back from its outputs."""
  with open(os.path.join(out_dir, "summary.json")) as f:
    summary = json.load(f)
  records, _ = read_records(os.path.join(out_dir, "metrics.jsonl"))
  return run_result(name, summary, records)


# -- the tuned model ---------------------------------------------------------------------


def model_parts(name: str, model, settings: Mapping[str, Any]):
  """The model taken apart for optimizer ``name``'s step, from the run's settings:
  LoRA adapters or layers (GaLore) trained with the rest frozen, else every
  parameter (see :mod:`absign_jax.llm.peers`)."""
  entry = registry.get(name)
  return absign_jax.split_nnx(model) if entry.parts is None else entry.parts(
      model, settings)


def load_run(run_dir: str, step: int | None = None):
  """The model a run of the fine-tuning program tuned, from its checkpoint.

  Reads the settings saved with the checkpoint (the base model, precision, optimizer
  and, for LoRA, the adapters' shape), loads the base model as the run did, reads
  the checkpoint's parameters (not its optimizer state) into it and, for LoRA, folds
  the adapters into the kernels.

  Args:
    run_dir: a run's ``--out`` directory (with ``checkpoints/``); with ``--compare``,
      one optimizer's subdirectory.
    step: the checkpoint to read; the newest intact one by default.

  Returns:
    ``(config, model, tokenizer)``, as :func:`absign_jax.llm.loading.load_model`.

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
    if user["optimizer"] not in registry.OPTIMIZERS:
      raise UsageError(f"checkpoint {step} in {ckpt_dir} was trained with optimizer "
                       f"{user['optimizer']!r}, which is not registered here; register "
                       "it (absign_jax.llm.registry) to read the checkpoint")
    policy = absign_jax.policy(user["precision"])
    try:
      cfg, model, tokenizer = loading.load_model(
          settings["model"], dtype=loading.model_dtype(policy), scan_layers=True)
    except (OSError, ValueError) as e:
      raise UsageError(f"{run_dir}: the base model its run tuned cannot be loaded "
                       f"({e})") from None
    parts = model_parts(user["optimizer"], model, settings)
    target = jax.eval_shape(policy.cast_params, parts.params)
    params = ckpt.restore_params(step, target)
  try:
    checks.check_finite(params, f"checkpoint {step} in {ckpt_dir}",
                        f"the training diverged; export an earlier one with --step "
                        f"(complete checkpoints: {steps})")
  except ValueError as e:
    raise UsageError(str(e)) from None
  return cfg, peers_lib.fold_lora(parts.merge(params)), tokenizer


# -- interruptions -----------------------------------------------------------------------


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

  @property
  def interrupted(self) -> str | None:
    """The signal's name once one asked to stop, else None."""
    return signal.Signals(self.signum).name if self.signum is not None else None
