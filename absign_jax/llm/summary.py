"""A fine-tuning run's outputs beside its records: ``summary.json`` and the plots.

:func:`run_summary` gathers a run's figures (held-out perplexity before and after,
speed, memory, the digest of the tuned parameters); :func:`plot_curves` draws loss
or perplexity against wall-clock time (``loss.png``, ``--compare``'s
``compare.png``), and :func:`compare_table` is ``--compare``'s ``compare.md``.
"""

from __future__ import annotations

import hashlib
import json
import resource
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

import absign_jax
from absign_jax.llm import runs as runs_lib

if TYPE_CHECKING:  # (annotations only)
  from absign_jax.llm.config import RunConfig


def params_digest(params) -> str:
  """SHA-256 of every parameter's bytes in tree order (equal runs, equal digests)."""
  h = hashlib.sha256()
  for x in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def step_memory_bytes(step, state, batch) -> int | None:
  """Bytes the compiled step needs (already compiled: lowering again hits the cache)."""
  compiled = step.lower(state, batch).compile()
  return absign_jax.profiling.program_memory(compiled)["total"]


def peak_device_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run_summary(config: RunConfig, name: str, *, peak_lr: float | None,
                before: dict[str, Any], after: dict[str, Any], records: list[dict],
                steps: int, wall: float, tokens: int, state, params,
                step_memory: int | None, mesh, block: bool,
                interrupted: str | None) -> dict[str, Any]:
  """The contents of ``summary.json``.

  Args:
    config: The run's options.
    name: Its optimizer.
    peak_lr: Its peak learning rate (None: parameter-free).
    before: :func:`absign_jax.llm.evaluation.before_training`'s figures.
    after: :func:`absign_jax.llm.evaluation.after_training`'s figures.
    records: Every step's record (``metrics.jsonl``).
    steps: The last step trained.
    wall: Seconds of training (first step and evaluations excluded).
    tokens: Tokens the loss covered.
    state: The final training state.
    params: Its parameters, readable whole by this process.
    step_memory: Bytes the compiled step needs (None: not measured).
    mesh: The device mesh (None: one device).
    block: Whether the optimizer is a block method.
    interrupted: The signal that stopped the run early, if one did.
  """
  losses = [r["loss"] for r in records]
  timed_steps = sum(1 for r in records if "first_step_s" not in r)
  summary = {
      "optimizer": name,
      "lr": peak_lr,  # None: parameter-free
      "schedule": config.schedule,
      "ppl_before": before["ppl_before"],
      "ppl_after": after["ppl_after"],  # None: interrupted before the final evaluation
      "train_loss": float(np.mean(losses[-10:])) if losses else None,
      "steps": steps,
      "logged_steps": len(records),
      "wall_s": wall,
      # Input tokens per second of training: the steps the clock covers (not the
      # compiling first step of each process), padding included.
      "tokens_per_s": timed_steps * config.batch * config.seq / max(wall, 1e-9),
      # The budget in both units: a step count (or tokens) means the same work on
      # any machine, seconds do not.
      "budget": {"steps": config.total_steps, "tokens": config.token_budget,
                 "seconds": config.time_budget},
      "tokens_processed": steps * config.batch * config.seq,  # inputs, padding included
      "tokens_trained": tokens,  # those the loss covers
      "skipped_steps": int(state.precision.skipped_total),
      # compilation: the first step of every process that trained this run
      "first_step_s": sum(r.get("first_step_s", 0.0) for r in records),
      "optimizer_state_bytes": absign_jax.profiling.tree_bytes(state.opt_state),
      "step_memory_bytes": step_memory,
      "param_bytes": absign_jax.profiling.tree_bytes(params),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "peak_device_bytes": peak_device_bytes(),
      "batch": config.batch, "seq": config.seq, "precision": config.precision,
      "device": str(jax.devices()[0].device_kind),
      "processes": jax.process_count(),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "aggregation": config.aggregation if mesh is not None and block else None,
      "params_sha256": params_digest(params),
      **{k: v for k, v in after.items() if k != "ppl_after"},
  }
  if interrupted:
    summary["interrupted"] = interrupted
  return summary


def write_summary(summary: dict[str, Any], path: str) -> None:
  with open(path, "w") as f:
    json.dump(summary, f, indent=2)


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str,
                ylabel: str = "training loss") -> None:
  """One curve per name against wall-clock time, written to ``path``."""
  # The object-oriented API without pyplot: no GUI backend, no global figure
  # registry, and a second faster to import.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

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


def compare_table(results: list[runs_lib.RunResult]) -> str:
  """``--compare``'s table (markdown): one row per optimizer."""
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
