"""Quality at equal wall-clock: the task sweep against the peers, and the prose sweep.

Task sweep (default, ``--sweep tasks``): every setting fine-tunes SmolLM2-135M from
the same pretrained weights for the same wall-clock budget (``--budget`` seconds of
training; first step and evaluations excluded; the cosine schedule ends at the
budget), then reports accuracy (``math``), held-out loss, compiled step memory,
steps taken and forgetting (perplexity on a text the tuning never sees and answers
to fixed chat prompts, before and after). Three phases:

1. ``math``: each method's learning rate bracketed with three values (BRACKETS);
2. ``chat``: each method at its best ``math`` setting (highest accuracy, then
   lowest held-out loss);
3. ``seed``: every method's best setting on both tasks again with a second seed;
4. ``options``: ABSignSGD's options beyond the paper (VARIANTS, e.g. the step
   relative to each leaf's RMS) against the plain method at its default, on both
   tasks and both seeds: an option becomes a default only if it wins all four.

    python benchmarks/quality.py --phase math --budget 300
    python benchmarks/quality.py --phase chat --budget 300
    python benchmarks/quality.py --phase seed --budget 300
    python benchmarks/quality.py --phase options --budget 300
    python benchmarks/quality.py --list                    # settings, done or not
    python benchmarks/quality.py --run "chat lora lr=0.0003 seed=1,..."  # exact settings
    python benchmarks/quality.py --report                  # tables and plots only

The sweep is resumable: a setting whose ``summary.json`` and ``curve.json`` exist
is not run again, so a sweep can be stopped and restarted, or run in pieces
(``--only LABEL,...`` within a phase, ``--run LABEL,...`` for any setting), one
setting at a time on a machine with nothing else running. Its record lives in the
repository (``--out``, default ``benchmarks/results/tasks``: each setting's
``summary.json``, ``curve.json``, ``metrics.jsonl`` and math answers; commit them),
so the report can be rebuilt anywhere. Writes ``tasks.md`` (printed), ``tasks.json``
and ``<task>.png`` (held-out loss against wall-clock, the best setting per method).

Prose sweep (``--sweep prose``): held-out perplexity on the default prose data,
the sweep behind the README's defaults (``--budget 180``); writes ``quality.json``,
``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time

from absign_jax import profiling
from absign_jax.llm import finetune
from absign_jax.llm import runs as runs_lib
from absign_jax.llm import summary as summary_lib

# (label, optimizer, overrides of the fine-tuning program's options)
SETTINGS = [
    ("absignsgd lr=1e-4", "absignsgd", {"lr": 1e-4}),
    ("absignsgd lr=3e-4", "absignsgd", {"lr": 3e-4}),
    ("absignsgd lr=1e-3", "absignsgd", {"lr": 1e-3}),
    ("absignsgd lr=3e-3", "absignsgd", {"lr": 3e-3}),
]
for _lr in ("3e-4", "1e-3"):  # schedule and depth bias around the best learning rates
  SETTINGS += [
      (f"absignsgd lr={_lr} constant", "absignsgd", {"lr": float(_lr),
                                                     "schedule": "constant"}),
      (f"absignsgd lr={_lr} c=0", "absignsgd", {"lr": float(_lr), "depth_bias": 0.0}),
      (f"absignsgd lr={_lr} c=20", "absignsgd", {"lr": float(_lr), "depth_bias": 20.0}),
      (f"absignsgd_uniform lr={_lr}", "absignsgd_uniform", {"lr": float(_lr)}),
  ]
SETTINGS += [
    ("adamw lr=1e-5", "adamw", {"lr": 1e-5}),
    ("adamw lr=3e-5", "adamw", {"lr": 3e-5}),
    ("adamw lr=1e-4", "adamw", {"lr": 1e-4}),
    ("adamw lr=3e-4", "adamw", {"lr": 3e-4}),
    ("block_adam lr=1e-5", "block_adam", {"lr": 1e-5}),
    ("block_adam lr=1e-4", "block_adam", {"lr": 1e-4}),
    ("alias_absignsgd (no lr)", "alias_absignsgd", {}),
]


def main(argv=None):
  if "--sweep" in (argv if argv is not None else __import__("sys").argv[1:]):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--sweep", choices=("tasks", "prose"), default="tasks")
    known, rest = p.parse_known_args(argv)
    return prose_main(rest) if known.sweep == "prose" else tasks_main(rest)
  return tasks_main(argv)


def prose_main(argv=None):
  p = argparse.ArgumentParser(description="the prose sweep (see the module doc)")
  p.add_argument("--budget", type=float, default=180.0, help="training seconds per setting")
  p.add_argument("--max-steps", type=int, default=2000,
                 help="step cap (the budget normally stops first; the cosine "
                      "schedule decays over the budget)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--only", default=None,
                 help="comma-separated setting labels to run (exact labels from SETTINGS)")
  p.add_argument("--out", default="runs/quality")
  p.add_argument("--report", nargs="+", default=None, metavar="DIR",
                 help="only rebuild the report from earlier sweeps' output directories")
  a = p.parse_args(argv)
  if a.report:
    return report(a.report, a.out, a.budget)
  settings = SETTINGS
  if a.only:
    keys = [k.strip() for k in a.only.split(",")]
    unknown = [k for k in keys if k not in {s[0] for s in SETTINGS}]
    if unknown:
      p.error(f"--only: unknown settings {unknown}; known: {[s[0] for s in SETTINGS]}")
    settings = [s for s in SETTINGS if s[0] in keys]

  base = finetune.parse_args([
      "--steps", str(a.max_steps), "--time-budget", str(a.budget), "--batch", str(a.batch),
      "--seq", str(a.seq), "--eval-every", str(a.eval_every), "--forgetting",
      "--no-progress"])
  loaded = finetune.load(base)
  rows, curves = [], {}
  for label, optimizer, overrides in settings:
    args = dataclasses.replace(base, **overrides)
    result = finetune.train(args, optimizer, loaded, run_dir(a.out, label))
    rows.append({"setting": label, **result.summary})
    curves[label] = result.eval_curve

  write_report(rows, curves, a.out, a.budget)


def run_dir(out: str, label: str) -> str:
  return os.path.join(out, label.replace(" ", "_").replace("=", ""))


def write_report(rows, curves, out, budget) -> None:
  """quality.json, quality.png and quality.md (printed) for finished settings."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "quality.json"), "w") as f:
    json.dump(rows, f, indent=2)
  if curves:
    summary_lib.plot_curves(curves, os.path.join(out, "quality.png"),
                            ylabel="held-out perplexity")
  r0 = rows[0]
  lines = [f"Budget {budget:g} s of training per setting, batch {r0['batch']} x seq "
           f"{r0['seq']}, device {r0['device']}.", "",
           "| setting | steps | held-out ppl before | at budget | second text before "
           "| after | optimizer state MB | step memory MB |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['setting']} | {r['steps']} | {r['ppl_before']:.3f} | {r['ppl_after']:.3f} "
        f"| {r['second_text_ppl_before']:.3f} | {r['second_text_ppl_after']:.3f} "
        f"| {r['optimizer_state_bytes'] / 2**20:.1f} "
        f"| {r['step_memory_bytes'] / 2**20:.0f} |")
  lines += ["", "Chat answers after tuning:"]
  for r in rows:
    for q, ans in r["chat_after"].items():
      lines.append(f"- {r['setting']}: {q} -> {ans!r}")
  table = "\n".join(lines)
  with open(os.path.join(out, "quality.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def report(dirs: list[str], out: str, budget: float) -> None:
  """Rebuilds the report from the runs' summary.json files (e.g. of several sweeps)."""
  rows = []
  for label, _, _ in SETTINGS:
    for d in dirs:
      path = os.path.join(run_dir(d, label), "summary.json")
      if os.path.exists(path):
        with open(path) as f:
          rows.append({"setting": label, **json.load(f)})
  if not rows:
    raise SystemExit(f"no summary.json of a known setting under {dirs}")
  write_report(rows, {}, out, budget)


# -- the task sweep --------------------------------------------------------------------

# Three learning rates per method, centred on what worked on SmolLM2 before.
BRACKETS = {
    "absignsgd": (3e-4, 1e-3, 3e-3),
    "adamw": (3e-5, 1e-4, 3e-4),
    # (3e-5 was run first: 3e-4 was best, at the bracket's edge, so it moved up)
    "block_adam": (1e-4, 3e-4, 1e-3),
    "lora": (1e-4, 3e-4, 1e-3),
    # (1e-4 was run first: 1e-3 was best, at the edge, so it moved up)
    "galore": (3e-4, 1e-3, 3e-3),
    "alias_absignsgd": (None,),  # parameter-free
}
# Knobs fixed for the sweep: BAdam switches every 10 steps, so a budget of a few
# hundred steps visits most of the 30 layers (its default of 50 would visit ~3).
METHOD_OPTIONS = {"block_adam": {"switch_every": 10}}
# Options of ABSignSGD beyond the paper: method label -> (optimizer, program options,
# the learning rate it is measured at).
VARIANTS = {
    "absignsgd_relative": ("absignsgd", {"relative": True}, 5e-3),
    # 4x the tokens behind each sign, at the activation memory of the plain batch.
    "absignsgd_micro4": ("absignsgd", {"batch": 16, "micro_batches": 4}, 1e-3),
    # Signum on the active block: 10 steps per visit, the buffer restarted at a switch.
    "absignsgd_momentum": ("absignsgd", {"momentum": 0.9, "switch_every": 10}, 1e-3),
}
PLAIN = ("absignsgd", 1e-3)  # the plain method at its default, the comparison
TOP_FOR_SEED = None  # settings per task repeated with the second seed (None: all)
SECOND_SEED = 1


@dataclasses.dataclass(frozen=True)
class Setting:
  task: str
  method: str
  lr: float | None
  seed: int = 0

  @property
  def label(self) -> str:
    lr = "free" if self.lr is None else f"{self.lr:g}"
    return f"{self.task} {self.method} lr={lr} seed={self.seed}"

  def directory(self, out: str) -> str:
    return os.path.join(out, self.label.replace(" ", "_").replace("=", ""))

  @classmethod
  def parse(cls, label: str) -> "Setting":
    """The setting a label names, e.g. ``"chat lora lr=0.0003 seed=1"``."""
    parts = label.split()
    known = set(BRACKETS) | set(VARIANTS)
    if (len(parts) != 4 or parts[0] not in ("math", "chat") or parts[1] not in known
        or not parts[2].startswith("lr=") or not parts[3].startswith("seed=")):
      raise ValueError(f"{label!r} is not a setting label: write 'TASK METHOD lr=LR "
                       f"seed=S' with TASK math or chat, METHOD one of {sorted(known)}, "
                       f"LR a number or 'free' (see --list)")
    lr = parts[2][3:]
    try:
      setting = cls(parts[0], parts[1], None if lr == "free" else float(lr),
                    int(parts[3][5:]))
    except ValueError as e:
      raise ValueError(f"{label!r}: lr= takes a number or 'free', seed= an integer "
                       f"({e})") from None
    if (setting.lr is None) != (setting.method == "alias_absignsgd"):
      raise ValueError(f"{label!r}: lr=free is for the parameter-free alias_absignsgd "
                       f"only, which takes no learning rate")
    return setting


def math_settings() -> list[Setting]:
  return [Setting("math", m, lr) for m, lrs in BRACKETS.items() for lr in lrs]


def _score(row) -> tuple:
  """Sort key, best first: accuracy (math), then held-out loss."""
  return (-(row.get("accuracy_after") or 0.0), row["heldout_loss_after"])


def best_per_method(rows: list[dict], task: str, seed: int = 0) -> dict[str, dict]:
  best = {}
  for r in rows:
    if r["task"] == task and r["seed"] == seed:
      if r["method"] not in best or _score(r) < _score(best[r["method"]]):
        best[r["method"]] = r
  return best


def plotted_per_method(rows: list[dict], task: str) -> dict[str, dict]:
  """The run plotted for each method: its best at seed 0, else at its lowest seed run."""
  plotted: dict[str, dict] = {}
  for seed in sorted({r["seed"] for r in rows if r["task"] == task}):
    for m, r in best_per_method(rows, task, seed).items():
      plotted.setdefault(m, r)
  return plotted


def chat_settings(rows: list[dict]) -> list[Setting]:
  best = best_per_method(rows, "math")
  missing = [m for m in BRACKETS if m not in best]
  if missing:
    raise SystemExit(f"the chat phase takes each method's best math setting: finish the "
                     f"math settings of {missing} first (--phase math)")
  return [Setting("chat", m, best[m]["lr"]) for m in BRACKETS]


def seed_settings(rows: list[dict]) -> list[Setting]:
  out = []
  for task in ("math", "chat"):
    ranked = sorted(best_per_method(rows, task).values(), key=_score)
    if not ranked:
      raise SystemExit(f"no finished {task} setting: run --phase {task} first")
    out += [Setting(task, r["method"], r["lr"], SECOND_SEED)
            for r in ranked[:TOP_FOR_SEED]]
  return out


def options_settings() -> list[Setting]:
  runs = [PLAIN] + [(m, lr) for m, (_, _, lr) in VARIANTS.items()]
  return [Setting(task, m, lr, seed) for task in ("math", "chat")
          for seed in (0, SECOND_SEED) for m, lr in runs]


def load_rows(out: str) -> list[dict]:
  """Finished settings under ``out`` (summary.json and curve.json both written)."""
  rows = []
  if not os.path.isdir(out):
    return rows
  for name in sorted(os.listdir(out)):
    summary, curve = (os.path.join(out, name, f) for f in ("summary.json", "curve.json"))
    if os.path.exists(summary) and os.path.exists(curve):
      with open(summary) as f, open(curve) as g:
        row = {**json.load(f), **json.load(g)}
      if row.get("interrupted"):
        continue  # (written by an older version of this script)
      rows.append(row)
      rows[-1]["heldout_loss_curve"] = loss_curve(os.path.join(out, name), rows[-1])
  return rows


def loss_curve(directory: str, row: dict) -> list[tuple[float, float]]:
  """A setting's held-out loss against wall-clock, rebuilt from its records.

  On the evaluation subset throughout (``runs.heldout_curve``); a setting recorded
  before the subset's endpoints were kept has only its middle points.
  """
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return [tuple(x) for x in row.get("heldout_loss_curve", [])]
  records, _ = runs_lib.read_records(path)
  return [(t, math.log(p)) for t, p in runs_lib.heldout_curve(row, records)]


def run_setting(s: Setting, a, loaded_by_task: dict) -> None:
  from absign_jax.llm import finetune

  optimizer, variant, _ = VARIANTS.get(s.method, (s.method, {}, None))
  base = finetune.parse_args([
      "--task", s.task, "--optimizer", optimizer, "--steps", str(a.max_steps),
      "--time-budget", str(a.budget), "--batch", str(a.batch), "--seq", str(a.seq),
      "--eval-every", str(a.eval_every), "--eval-problems", str(a.eval_problems),
      "--seed", str(s.seed), "--forgetting", "--no-progress", "--ckpt-every", "0"]
      + ([] if s.lr is None else ["--lr", repr(s.lr)]))
  args = dataclasses.replace(base, **METHOD_OPTIONS.get(s.method, {}), **variant)
  if s.task not in loaded_by_task:
    loaded_by_task.clear()  # one task's data at a time
    loaded_by_task[s.task] = finetune.load(args)
  d = s.directory(a.out)
  print(f"== {s.label} ({a.budget:g} s)", flush=True)
  result = finetune.train(args, optimizer, loaded_by_task[s.task], d)
  if result.summary.get("interrupted"):  # not finished: no curve.json, so it runs again
    raise SystemExit(f"{s.label}: stopped by {result.summary['interrupted']} before the "
                     f"end of its budget; delete {d} and run it again")
  shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)  # not needed here
  with open(os.path.join(d, "curve.json"), "w") as f:
    json.dump({"setting": s.label, "task": s.task, "method": s.method, "seed": s.seed,
               "lr_setting": s.lr, "budget_s": a.budget,
               "date": time.strftime("%Y-%m-%d"), "machine": profiling.machine_info(),
               "heldout_loss_curve": [(t, math.log(p)) for t, p in result.eval_curve]}, f)


def run_settings(settings: list[Setting], done: set[str], a, loaded_by_task: dict) -> None:
  """Runs the settings not yet done, in order (``--list``: only says which)."""
  for s in settings:
    if a.list:
      print(f"{'done' if s.label in done else 'todo'}  {s.label}")
    elif s.label in done:
      print(f"== {s.label}: done, skipped", flush=True)
    else:
      run_setting(s, a, loaded_by_task)


def tasks_main(argv=None):
  p = argparse.ArgumentParser(description="the task sweep (see the module doc)")
  p.add_argument("--phase", default="all",
                 choices=("math", "chat", "seed", "options", "all"))
  p.add_argument("--budget", type=float, default=300.0, help="training seconds per setting")
  p.add_argument("--max-steps", type=int, default=5000,
                 help="step cap (the budget normally stops first)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--eval-problems", type=int, default=200,
                 help="held-out math problems scored for accuracy")
  p.add_argument("--only", default=None,
                 help="comma-separated setting labels to run (see --list)")
  p.add_argument("--run", default=None,
                 help="comma-separated exact setting labels to run, whatever the phase "
                      "(e.g. \"chat lora lr=0.0003 seed=1\")")
  p.add_argument("--list", action="store_true", help="list the settings and exit")
  p.add_argument("--report", action="store_true", help="only write the report")
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "tasks"),
                 help="the sweep's record: one directory per setting (commit it)")
  a = p.parse_args(argv)
  if a.budget <= 0:
    p.error(f"--budget must be positive, got {a.budget}")
  if a.run is not None:
    if a.only or a.phase != "all":
      p.error("--run names its settings: drop --only and --phase")
    try:
      named = [Setting.parse(k.strip()) for k in a.run.split(",") if k.strip()]
    except ValueError as e:
      p.error(f"--run: {e}")
    if not named:
      p.error("--run: no setting named")
    run_settings(named, {r["setting"] for r in load_rows(a.out)}, a, {})
    if not a.list:
      write_tasks_report(load_rows(a.out), a.out)
    return

  phases = ("math", "chat", "seed", "options") if a.phase == "all" else (a.phase,)
  keys = [k.strip() for k in a.only.split(",") if k.strip()] if a.only else None
  matched: set[str] = set()
  loaded: dict = {}
  if not a.report:
    for phase in phases:
      rows = load_rows(a.out)
      settings = {"math": math_settings, "chat": lambda: chat_settings(rows),
                  "seed": lambda: seed_settings(rows), "options": options_settings}[phase]()
      if keys is not None:
        settings = [s for s in settings if s.label in keys]
        matched |= {s.label for s in settings}
      run_settings(settings, {r["setting"] for r in rows}, a, loaded)
    if keys is not None and set(keys) - matched:
      print(f"--only: no setting of phase {a.phase} is labelled "
            f"{sorted(set(keys) - matched)} (see --list)", flush=True)
    if a.list:
      return
  write_tasks_report(load_rows(a.out), a.out)


def write_tasks_report(rows: list[dict], out: str) -> None:
  """tasks.md (printed), tasks.json and one plot per task."""
  if not rows:
    raise SystemExit(f"no finished setting under {out}")

  # The pretrained model's loss on the subset is the first point of every setting of
  # a task (the same weights and sequences): given to those recorded without it.
  for r in rows:
    firsts = [x["heldout_ppl_subset_before"] for x in rows
              if x["task"] == r["task"] and "heldout_ppl_subset_before" in x]
    curve = r["heldout_loss_curve"]
    if firsts and (not curve or curve[0][0] > 0):
      r["heldout_loss_curve"] = [(0.0, math.log(firsts[0]))] + list(curve)
  with open(os.path.join(out, "tasks.json"), "w") as f:
    json.dump(rows, f, indent=2)
  adamw_mem = max((r["step_memory_bytes"] or 0) for r in rows if r["method"] == "adamw") \
      if any(r["method"] == "adamw" for r in rows) else None
  r0 = rows[0]
  lines = [f"Budget {r0['budget_s']:g} s of training per setting, batch {r0['batch']} x "
           f"seq {r0['seq']}, device {r0['device']}."]
  machines: dict[str, set] = {}
  for r in rows:
    cpu = (r.get("machine") or {}).get("cpu", "machine not recorded")
    machines.setdefault(cpu, set()).add(r.get("date") or "date not recorded")
  lines.append("Machines (settings on different machines are not comparable step for "
               "step): " + "; ".join(f"{cpu} ({', '.join(sorted(dates))})"
                                     for cpu, dates in sorted(machines.items())) + ".")
  for task in ("math", "chat"):
    trs = sorted((r for r in rows if r["task"] == task),
                 key=lambda r: (r["method"], r["seed"], r["lr"] or 0))
    if not trs:
      continue
    lines += ["", f"### {task}", "",
              "| setting | steps | accuracy before | after | held-out loss before | after "
              "| step memory MB | x AdamW | second-text ppl before | after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in trs:
      acc = (f"{r['accuracy_before']:.3f} | {r['accuracy_after']:.3f}"
             if r.get("accuracy_after") is not None else "- | -")
      mem = r["step_memory_bytes"] or 0
      ratio = f"{mem / adamw_mem:.2f}" if adamw_mem else "-"
      lines.append(
          f"| {r['setting']} | {r['steps']} | {acc} | {r['heldout_loss_before']:.4f} "
          f"| {r['heldout_loss_after']:.4f} | {mem / 2**20:.0f} | {ratio} "
          f"| {r['second_text_ppl_before']:.3f} | {r['second_text_ppl_after']:.3f} |")
    for seed in sorted({r["seed"] for r in trs}):
      lines += ["", f"Ranking, seed {seed} (accuracy, then held-out loss; on math, whether "
                "a bracketed learning rate is inside its bracket):"]
      ranked = sorted(best_per_method(rows, task, seed).items(), key=lambda kv: _score(kv[1]))
      for m, r in ranked:
        edge = ""
        if m in BRACKETS and len(BRACKETS[m]) > 1 and task == "math" and \
            sum(x["method"] == m and x["seed"] == seed for x in trs) > 1:
          edge = (" (at the edge of the bracket: extend it)"
                  if r["lr"] in (BRACKETS[m][0], BRACKETS[m][-1]) else " (inside)")
        lines.append(f"- {r['setting']}{edge}")
    summary_lib.plot_curves(
        {f"{m} lr={r['lr_setting'] if r['lr_setting'] is not None else 'free'} "
         f"seed={r['seed']}": [tuple(x) for x in r["heldout_loss_curve"]]
         for m, r in plotted_per_method(rows, task).items()},
        os.path.join(out, f"{task}.png"),
        ylabel=f"{task}: held-out loss (evaluation subset)")
  lines += ["", "Chat answers to the fixed prompts, before -> after:"]
  for r in rows:
    for q, ans in r["chat_after"].items():
      lines.append(f"- {r['setting']}: {q} {r['chat_before'][q]!r} -> {ans!r}")
  table = "\n".join(lines)
  with open(os.path.join(out, "tasks.md"), "w") as f:
    f.write(table + "\n")
  print(table)

if __name__ == "__main__":
  main()
