"""Quality at equal budgets: the task sweep against the peers, and the prose sweep.

Task sweep (default, ``--sweep tasks``): every setting fine-tunes SmolLM2-135M from
the same pretrained weights for the same budget, then reports accuracy (``math``,
with its 95% interval), held-out loss, compiled step memory, steps and tokens taken,
and forgetting (perplexity on a text the tuning never sees and answers to fixed chat
prompts, before and after). The budget is ``--budget`` seconds of training (first
step and evaluations excluded; 300 by default, 1800 in the long phase), or
``--token-budget`` tokens (steps x batch x seq: the same work on any machine), or
both, whichever ends first; the cosine schedule ends with it. Phases:

1. ``math``: each method's learning rate bracketed with three values (BRACKETS);
2. ``chat``: each method at its best ``math`` setting (highest accuracy, then
   lowest held-out loss);
3. ``seed``: every method's best setting on both tasks again with a second seed;
4. ``options``: ABSignSGD's options beyond the paper (VARIANTS, e.g. the step
   relative to each leaf's RMS) against the plain method at its default, on both
   tasks and both seeds: an option becomes a default only if it wins all four;
5. ``long``: 1800 s per setting by default, in its own record (``--out`` default
   ``benchmarks/results/tasks_long``): LONG_METHODS (absignsgd, lora, lora with
   each layer rematerialised, block_adam, galore, adamw) on both tasks at seed 0,
   then the best four per task again at seed 1. Each method at its best learning
   rate of the short sweep's math settings (read from ``--short-out``), and also
   at the next rate beyond when that best was the lowest or highest it tried; at
   the program's default when the short sweep did not run it.

    python benchmarks/quality.py --phase math --budget 300
    python benchmarks/quality.py --phase chat --budget 300
    python benchmarks/quality.py --phase seed --budget 300
    python benchmarks/quality.py --phase options --budget 300
    python benchmarks/quality.py --phase long                  # 1800 s, tasks_long
    python benchmarks/quality.py --phase options --budget 1800 \
        --out benchmarks/results/tasks_long                    # the options, long
    python benchmarks/quality.py --phase math --token-budget 200000 --out runs/tokens
    python benchmarks/quality.py --list                    # settings, done or not
    python benchmarks/quality.py --run "chat lora lr=0.0003 seed=1,..."  # exact settings
    python benchmarks/quality.py --report                  # tables and plots only
    python benchmarks/quality.py --report --out benchmarks/results/tasks_long

The sweep is resumable: a setting whose ``summary.json`` and ``curve.json`` exist
is not run again, so a sweep can be stopped and restarted, or run in pieces
(``--only LABEL,...`` within a phase, ``--run LABEL,...`` for any setting), one
setting at a time on a machine with nothing else running. A setting recorded at
another budget or on another math task is not run again either, and does not count
for the phases that build on it: record such a sweep under another ``--out``. The
record lives in the repository (``--out``, default ``benchmarks/results/tasks``:
each setting's ``summary.json``, ``curve.json`` with its budget in both units and
the steps, tokens and seconds it took, ``metrics.jsonl`` and math answers; commit
them), so the report can be rebuilt anywhere. ``before_<task>.json`` keeps the
pretrained model's figures (held-out loss, math answers, forgetting baselines): a
later invocation reuses them while the model, data, problems and evaluation options
match, instead of evaluating the untouched model again. Writes ``tasks.md`` (printed),
``tasks.json``, ``<task>.png`` (held-out loss against wall-clock, the best setting
per method) and ``<task>_forgetting.png`` (accuracy or held-out loss against the
second text's perplexity after tuning, one point per method); per task, a table of
each method's held-out loss at points of the budget says when the order of the
methods differs from the order at the end. On math, each
method's best is compared with absignsgd's best by McNemar's test on the same
held-out problems (refused when their problem lists differ): ranked by accuracy, a
difference counts only at p < 0.05. The math task changed once (4 arithmetic and
algebra modules and 200 held-out problems, then 6 modules and 500): rows of the two
are never ranked or compared together, and the report names each row's.

Prose sweep (``--sweep prose``): held-out perplexity on the default prose data,
the sweep behind the README's defaults (``--budget 180``); writes ``quality.json``,
``quality.md`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time

from absign_jax import profiling
from absign_jax.llm import evaluation
from absign_jax.llm import finetune
from absign_jax.llm import registry
from absign_jax.llm import runs as runs_lib
from absign_jax.llm import significance
from absign_jax.llm import summary as summary_lib
from absign_jax.llm import tasks as tasks_lib

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

TASK_NAMES = ("math", "chat")
DEFAULT_BUDGET = 300.0  # training seconds per setting of the short phases
LONG_BUDGET = 1800.0  # the long phase's
SHORT_OUT = os.path.join("benchmarks", "results", "tasks")
LONG_OUT = os.path.join("benchmarks", "results", "tasks_long")

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
    # Half the step on the first layer, rising linearly to the full step on the last:
    # the shallow layers, whose changes every later layer sees, move less.
    "absignsgd_shallow": ("absignsgd", {"shallow_step": 0.5}, 1e-3),
    # The depth bias from 10 to 0 with progress: the cheap deep layers first, every
    # layer as often by the end.
    "absignsgd_bias_to_0": ("absignsgd", {"depth_bias_end": 0.0}, 1e-3),
    # The token embedding as a block before the first layer (SmolLM2 ties the head to
    # it, so the output layer trains with it); depth-biased, it is the rarest block.
    "absignsgd_embedding": ("absignsgd", {"train_embedding": True}, 1e-3),
}
# Peers with options of the program: method label -> (optimizer, program options).
# LoRA with each layer rematerialised: its step memory without every layer's
# activations, for the time of computing them again in the backward pass.
PEER_VARIANTS = {"lora_remat": ("lora", {"remat": True})}
PLAIN = ("absignsgd", 1e-3)  # the plain method at its default, the comparison
TOP_FOR_SEED = None  # settings per task repeated with the second seed (None: all)
SECOND_SEED = 1
# The long phase: these methods on both tasks at seed 0, then the best
# LONG_TOP_FOR_SEED of them per task again with SECOND_SEED.
LONG_METHODS = ("absignsgd", "lora", "lora_remat", "block_adam", "galore", "adamw")
LONG_TOP_FOR_SEED = 4
SIGNIFICANT = 0.05  # a paired difference counts only below this p-value
# The math task's versions, told apart by their records: the current one records each
# problem's module (answers.jsonl, accuracy_by_module); the first (4 arithmetic and
# algebra modules, 200 held-out problems) recorded none.
MATH_TASK = f"{len(tasks_lib.MATH_MODULES)} modules"
OLD_MATH_TASK = "old 4 modules"
ANSWERS = "answers.jsonl"


def method_run(method: str) -> tuple[str, dict]:
  """The optimizer a method label trains, and the program options it sets."""
  if method in VARIANTS:
    optimizer, options, _ = VARIANTS[method]
  else:
    optimizer, options = PEER_VARIANTS.get(method, (method, {}))
  return optimizer, {**METHOD_OPTIONS.get(method, {}), **options}


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
    known = set(BRACKETS) | set(VARIANTS) | set(PEER_VARIANTS)
    if (len(parts) != 4 or parts[0] not in TASK_NAMES or parts[1] not in known
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
  for task in TASK_NAMES:
    ranked = sorted(best_per_method(rows, task).values(), key=_score)
    if not ranked:
      raise SystemExit(f"no finished {task} setting: run --phase {task} first")
    out += [Setting(task, r["method"], r["lr"], SECOND_SEED)
            for r in ranked[:TOP_FOR_SEED]]
  return out


def options_settings() -> list[Setting]:
  runs = [PLAIN] + [(m, lr) for m, (_, _, lr) in VARIANTS.items()]
  return [Setting(task, m, lr, seed) for task in TASK_NAMES
          for seed in (0, SECOND_SEED) for m, lr in runs]


def beyond(lr: float, up: bool) -> float:
  """The next learning rate past ``lr`` on the brackets' grid of 1 and 3 per decade
  (x3 or /3: 1e-3 -> 3e-3 -> 1e-2); off the grid, ``lr`` x3 or /3."""
  exponent = math.floor(math.log10(lr) + 1e-9)
  mantissa = lr / 10**exponent
  if math.isclose(mantissa, 1):
    return float(f"3e{exponent}" if up else f"3e{exponent - 1}")
  if math.isclose(mantissa, 3):
    return float(f"1e{exponent + 1}" if up else f"1e{exponent}")
  return float(f"{lr * 3 if up else lr / 3:.2g}")


def long_learning_rates(short_rows: list[dict]) -> dict[str, tuple[list, str]]:
  """The long phase's learning rates per method, and where they come from.

  A method's best math setting of the short sweep (on the current math task if it
  has one there; at seed 0, else at its lowest seed), and the next value beyond the
  rates it tried when that best was the lowest or highest of them; ``lora_remat``
  takes LoRA's (rematerialising changes the memory, not the arithmetic). A method
  the short sweep did not run takes the program's default.
  """
  maths = [r for r in short_rows if r["task"] == "math"]
  maths = [r for r in maths if r.get("math_task") == MATH_TASK] or maths
  best = plotted_per_method(maths, "math")
  rates = {}
  for m in LONG_METHODS:
    optimizer, _ = method_run(m)
    source = m if m in best else optimizer
    r = best.get(source)
    if r is None:
      rates[m] = ([registry.get(optimizer).lr], "the program's default")
      continue
    tried = sorted({x["lr"] for x in maths if x["method"] == source
                    and x["seed"] == r["seed"] and x["lr"] is not None})
    lrs, why = [r["lr"]], f"best in the short sweep: {r['setting']}"
    if len(tried) > 1 and r["lr"] in (tried[0], tried[-1]):
      up = r["lr"] == tried[-1]
      lrs.append(beyond(r["lr"], up))
      why += (f", the {'highest' if up else 'lowest'} of {[f'{x:g}' for x in tried]}: "
              f"also {lrs[-1]:g}")
    rates[m] = (lrs, why)
  return rates


def long_settings(short_rows: list[dict], rows: list[dict],
                  seed: int = 0) -> list[Setting]:
  """The long phase's settings at ``seed``.

  Seed 0: every method of LONG_METHODS on both tasks, at the rates of
  :func:`long_learning_rates`. SECOND_SEED: the best LONG_TOP_FOR_SEED of those per
  task, once every seed-0 setting of the task is in ``rows`` (none before).
  """
  rates = long_learning_rates(short_rows)
  first = [Setting(task, m, lr) for task in TASK_NAMES for m in LONG_METHODS
           for lr in rates[m][0]]
  if seed == 0:
    return first
  done = {r["setting"]: r for r in rows}
  out = []
  for task in TASK_NAMES:
    mine = [s.label for s in first if s.task == task]
    if all(label in done for label in mine):
      ranked = sorted(best_per_method([done[x] for x in mine], task).values(), key=_score)
      out += [Setting(task, r["method"], r["lr"], seed)
              for r in ranked[:LONG_TOP_FOR_SEED]]
  return out


def budget_text(seconds: float | None, tokens: int | None) -> str:
  """A budget in both units, e.g. ``1800 s or 2,000,000 tokens, whichever ends first``."""
  if seconds is not None and tokens is not None:
    return f"{seconds:g} s or {tokens:,} tokens, whichever ends first"
  if tokens is not None:
    return f"{tokens:,} tokens (no time limit)"
  return f"{seconds:g} s (no token limit)" if seconds is not None else "not recorded"


def read_answers(path: str) -> list[dict]:
  """A setting's answers.jsonl: one record per held-out problem, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def math_figures(row: dict, answers: list[dict] | None) -> dict:
  """A math row's task version, problem count and 95% accuracy interval.

  The interval is computed from the answers where they are recorded, so records
  made before the program wrote intervals have one too.
  """
  modules = set(row.get("accuracy_by_module") or ()) | {
      a["module"] for a in answers or () if "module" in a}
  if not modules:
    version = OLD_MATH_TASK
  elif modules <= set(tasks_lib.MATH_MODULES):
    version = MATH_TASK
  else:
    version = "modules " + ",".join(sorted(modules))
  figures = {"math_task": version}
  if answers:
    interval = significance.wilson_interval(sum(bool(a["correct"]) for a in answers),
                                            len(answers))
    figures.update(problems=len(answers), accuracy_after_interval=list(interval[1:]))
  elif row.get("accuracy_by_module"):
    figures["problems"] = sum(m["problems"] for m in row["accuracy_by_module"].values())
  return figures


def load_rows(out: str) -> list[dict]:
  """Finished settings under ``out`` (summary.json and curve.json both written)."""
  rows = []
  if not os.path.isdir(out):
    return rows
  for name in sorted(os.listdir(out)):
    directory = os.path.join(out, name)
    summary, curve = (os.path.join(directory, f) for f in ("summary.json", "curve.json"))
    if os.path.exists(summary) and os.path.exists(curve):
      with open(summary) as f, open(curve) as g:
        row = {**json.load(f), **json.load(g)}
      if row.get("interrupted"):
        continue  # (written by an older version of this script)
      row["heldout_loss_curve"] = loss_curve(directory, row)
      if row.get("task") == "math":
        answers = os.path.join(directory, ANSWERS)
        if os.path.exists(answers):
          row["answers_file"] = answers
        row.update(math_figures(row, read_answers(answers) if "answers_file" in row
                                else None))
      rows.append(row)
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


def record_differs(row: dict, a) -> str | None:
  """Why a finished setting's record is not what this invocation would make (None:
  it is)."""
  recorded = (row.get("budget_s"), row.get("budget_tokens"))
  if recorded != (a.budget, a.token_budget):
    return (f"recorded at {budget_text(*recorded)}, not "
            f"{budget_text(a.budget, a.token_budget)}")
  if row.get("task") == "math":
    if row.get("math_task") != MATH_TASK:
      return f"recorded on the math task '{row.get('math_task')}'"
    if row.get("problems") not in (None, a.eval_problems):
      return f"recorded on {row['problems']} held-out problems"
  return None


BEFORE_FILE = "before_{task}.json"  # the pretrained model's figures, per task


def before_fingerprint(args, loaded) -> str:
  """What fixes the pretrained model's figures: the model, the options that shape the
  evaluations, and the data and problems evaluated."""
  problems = [(p.question, p.answer) for p in loaded.problems or ()]
  identity = {
      "model": args.model, "task": args.task, "seq": args.seq, "batch": args.batch,
      "precision": args.precision, "forgetting": args.forgetting,
      "subset": evaluation.eval_subset(args), "train": loaded.data_sha256,
      "heldout": runs_lib.data_fingerprint(loaded.heldout),
      "problems": hashlib.sha256(json.dumps(problems).encode()).hexdigest()}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _before_key(args) -> tuple:
  # (as evaluation.before_training keys loaded.cache)
  return (args.precision, args.forgetting, evaluation.eval_subset(args))


def restore_before(args, loaded, out: str) -> None:
  """Puts the pretrained model's figures of an earlier invocation (``out``'s
  ``before_<task>.json``, when its fingerprint matches) into ``loaded.cache``: each
  setting then skips evaluating the untouched model again (minutes on math)."""
  path = os.path.join(out, BEFORE_FILE.format(task=args.task))
  if not os.path.exists(path) or loaded.cache.get(_before_key(args)):
    return
  with open(path) as f:
    saved = json.load(f)
  if saved.get("fingerprint") == before_fingerprint(args, loaded):
    loaded.cache[_before_key(args)] = saved["figures"]


def save_before(args, loaded, out: str) -> None:
  figures = loaded.cache.get(_before_key(args))
  path = os.path.join(out, BEFORE_FILE.format(task=args.task))
  if figures and not os.path.exists(path):  # (the first invocation's figures stay)
    with open(path + ".tmp", "w") as f:
      json.dump({"fingerprint": before_fingerprint(args, loaded), "figures": figures}, f)
    os.replace(path + ".tmp", path)


def run_setting(s: Setting, a, loaded_by_task: dict) -> None:
  optimizer, options = method_run(s.method)
  argv = ["--task", s.task, "--optimizer", optimizer, "--steps", str(a.max_steps),
          "--batch", str(a.batch), "--seq", str(a.seq), "--eval-every", str(a.eval_every),
          "--eval-problems", str(a.eval_problems), "--seed", str(s.seed), "--forgetting",
          "--no-progress", "--ckpt-every", "0"]
  if a.budget is not None:
    argv += ["--time-budget", str(a.budget)]
  if a.token_budget is not None:
    argv += ["--token-budget", str(a.token_budget)]
  base = finetune.parse_args(argv + ([] if s.lr is None else ["--lr", repr(s.lr)]))
  args = dataclasses.replace(base, **options)
  if s.task not in loaded_by_task:
    loaded_by_task.clear()  # one task's data at a time
    loaded_by_task[s.task] = finetune.load(args)
  d = s.directory(a.out)
  print(f"== {s.label} ({budget_text(a.budget, a.token_budget)})", flush=True)
  restore_before(args, loaded_by_task[s.task], a.out)
  result = finetune.train(args, optimizer, loaded_by_task[s.task], d)
  save_before(args, loaded_by_task[s.task], a.out)
  summary = result.summary
  if summary.get("interrupted"):  # not finished: no curve.json, so it runs again
    raise SystemExit(f"{s.label}: stopped by {summary['interrupted']} before the "
                     f"end of its budget; delete {d} and run it again")
  shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)  # not needed here
  with open(os.path.join(d, "curve.json"), "w") as f:
    json.dump({"setting": s.label, "task": s.task, "method": s.method, "seed": s.seed,
               "lr_setting": s.lr, "budget_s": a.budget, "budget_tokens": a.token_budget,
               "steps": summary["steps"], "tokens_processed": summary["tokens_processed"],
               "wall_s": summary["wall_s"],
               "date": time.strftime("%Y-%m-%d"), "machine": profiling.machine_info(),
               "heldout_loss_curve": [(t, math.log(p)) for t, p in result.eval_curve]}, f)


def run_settings(settings: list[Setting], rows: list[dict], a,
                 loaded_by_task: dict) -> None:
  """Runs the settings not yet recorded in ``rows``, in order (``--list``: only says
  which). A setting recorded otherwise (another budget or math task) is skipped with
  the reason: its record stays, and the new one belongs under another ``--out``."""
  recorded = {r["setting"]: r for r in rows}
  for s in settings:
    r = recorded.get(s.label)
    why = None if r is None else record_differs(r, a)
    if a.list:
      state = "todo" if r is None else "done" if why is None else "other"
      print(f"{state}  {s.label}" + (f"  ({why})" if why else ""))
    elif r is None:
      run_setting(s, a, loaded_by_task)
    else:
      print(f"== {s.label}: " + (f"{why}: skipped (use another --out)" if why
                                 else "done, skipped"), flush=True)


def tasks_main(argv=None):
  p = argparse.ArgumentParser(description="the task sweep (see the module doc)")
  p.add_argument("--phase", default="all",
                 choices=("math", "chat", "seed", "options", "long", "all"))
  p.add_argument("--budget", type=float, default=None,
                 help=f"training seconds per setting (default {DEFAULT_BUDGET:g}, the "
                      f"long phase's {LONG_BUDGET:g}; none when only --token-budget is "
                      "given)")
  p.add_argument("--token-budget", type=int, default=None,
                 help="training tokens per setting (steps x batch x seq: the same work "
                      "on any machine); with --budget, whichever ends first")
  p.add_argument("--max-steps", type=int, default=5000,
                 help="step cap (the budget normally stops first; ignored with "
                      "--token-budget, which sets the steps)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--eval-problems", type=int, default=tasks_lib.MATH_HELDOUT_PROBLEMS,
                 help="held-out math problems scored for accuracy")
  p.add_argument("--only", default=None,
                 help="comma-separated setting labels to run (see --list)")
  p.add_argument("--run", default=None,
                 help="comma-separated exact setting labels to run, whatever the phase "
                      "(e.g. \"chat lora lr=0.0003 seed=1\")")
  p.add_argument("--list", action="store_true", help="list the settings and exit")
  p.add_argument("--report", action="store_true", help="only write the report")
  p.add_argument("--out", default=None,
                 help=f"the sweep's record: one directory per setting (commit it; "
                      f"default {SHORT_OUT}, the long phase's {LONG_OUT})")
  p.add_argument("--short-out", default=SHORT_OUT,
                 help="the long phase: the short sweep's record, whose best learning "
                      "rates it takes")
  a = p.parse_args(argv)
  if a.budget is None and a.token_budget is None:
    a.budget = LONG_BUDGET if a.phase == "long" else DEFAULT_BUDGET
  if a.out is None:
    a.out = LONG_OUT if a.phase == "long" else SHORT_OUT
  if a.budget is not None and a.budget <= 0:
    p.error(f"--budget must be positive, got {a.budget}")
  if a.token_budget is not None and a.token_budget < a.batch * a.seq:
    p.error(f"--token-budget must be at least one step's tokens (--batch x --seq = "
            f"{a.batch * a.seq}), got {a.token_budget}")
  if a.run is not None:
    if a.only or a.phase != "all":
      p.error("--run names its settings: drop --only and --phase")
    try:
      named = [Setting.parse(k.strip()) for k in a.run.split(",") if k.strip()]
    except ValueError as e:
      p.error(f"--run: {e}")
    if not named:
      p.error("--run: no setting named")
    run_settings(named, load_rows(a.out), a, {})
    if not a.list:
      write_tasks_report(load_rows(a.out), a.out)
    return

  phases = ("math", "chat", "seed", "options") if a.phase == "all" else (a.phase,)
  if a.phase == "long":  # seed 1 follows once seed 0 is done (so in one invocation)
    phases = ("long", "long seed")
    short = load_rows(a.short_out)
    for m, (lrs, why) in long_learning_rates(short).items():
      print(f"{m}: lr {', '.join(f'{x:g}' for x in lrs)} ({why})", flush=True)
  keys = [k.strip() for k in a.only.split(",") if k.strip()] if a.only else None
  matched: set[str] = set()
  loaded: dict = {}
  if not a.report:
    for phase in phases:
      rows = load_rows(a.out)
      comparable = [r for r in rows if record_differs(r, a) is None]
      settings = {"math": math_settings, "chat": lambda: chat_settings(comparable),
                  "seed": lambda: seed_settings(comparable), "options": options_settings,
                  "long": lambda: long_settings(short, comparable),
                  "long seed": lambda: long_settings(short, comparable, SECOND_SEED),
                  }[phase]()
      if phase == "long seed" and a.list:
        for task in TASK_NAMES:
          if not any(s.task == task for s in settings):
            print(f"later {task}: the best {LONG_TOP_FOR_SEED} again with seed "
                  f"{SECOND_SEED}, once every seed-0 {task} setting is done")
      if keys is not None:
        settings = [s for s in settings if s.label in keys]
        matched |= {s.label for s in settings}
      run_settings(settings, rows, a, loaded)
    if keys is not None and set(keys) - matched:
      print(f"--only: no setting of phase {a.phase} is labelled "
            f"{sorted(set(keys) - matched)} (see --list)", flush=True)
    if a.list:
      return
  write_tasks_report(load_rows(a.out), a.out)


# -- the task sweep's report -------------------------------------------------------------


def _fmt(value, spec: str) -> str:
  """``value`` formatted, '-' when it was not recorded."""
  return "-" if value is None else format(value, spec)


def _accuracy(row: dict) -> str:
  """Accuracy after tuning and its 95% interval, e.g. ``0.085 [0.054, 0.131]``."""
  interval = row.get("accuracy_after_interval")
  return _fmt(row.get("accuracy_after"), ".3f") + (
      f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _quality(row: dict, task: str) -> str:
  """A setting's figure of quality: math accuracy with its interval, else held-out loss."""
  return _accuracy(row) if task == "math" else _fmt(row.get("heldout_loss_after"), ".4f")


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def task_groups(rows: list[dict]) -> list[tuple[str, str | None, list[dict]]]:
  """Rows by task and math task version: those ranked and compared together, the
  current math task first."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["task"], r.get("math_task")), []).append(r)
  order = sorted(groups, key=lambda k: (TASK_NAMES.index(k[0]), k[1] != MATH_TASK,
                                        k[1] or ""))
  return [(task, version, groups[(task, version)]) for task, version in order]


def paired_test(first: list[dict], second: list[dict]) -> significance.PairedTest:
  """McNemar's test of two settings' answers (``answers.jsonl`` records).

  Raises:
    ValueError: They answered different problem lists (another count or order):
      their outcomes do not pair.
  """
  q1, q2 = ([a["question"] for a in x] for x in (first, second))
  if q1 != q2:
    where = (f"{len(q1)} against {len(q2)} problems" if len(q1) != len(q2) else
             f"problem {next(i for i, (x, y) in enumerate(zip(q1, q2)) if x != y) + 1} "
             "is another question")
    raise ValueError(f"not compared: the problem lists differ ({where})")
  return significance.mcnemar([bool(a["correct"]) for a in first],
                              [bool(a["correct"]) for a in second])


def compare_to_plain(rows: list[dict], seed: int) -> list[dict]:
  """Each method's best math setting at ``seed`` (of one math task's ``rows``), best
  first, each but absignsgd's best given ``vs_plain``: McNemar against that best on
  their answers (``only_this``, ``only_plain``, ``p_value``), or ``refused`` and why."""
  best = best_per_method(rows, "math", seed)
  plain = best.get(PLAIN[0])
  ranked = sorted(best.values(), key=_score)
  for r in ranked:
    if plain is None or r is plain:
      continue
    try:
      missing = [x["setting"] for x in (r, plain) if "answers_file" not in x]
      if missing:
        raise ValueError(f"not compared: no {ANSWERS} recorded for {missing}")
      test = paired_test(read_answers(r["answers_file"]),
                         read_answers(plain["answers_file"]))
      r["vs_plain"] = {"against": plain["setting"], "only_this": test.only_first,
                       "only_plain": test.only_second, "p_value": test.p_value}
    except ValueError as e:
      r["vs_plain"] = {"against": plain["setting"], "refused": str(e)}
  return ranked


def _paired_table(rows: list[dict], seed: int, version: str) -> list[str]:
  ranked = compare_to_plain(rows, seed)
  plain = next((r for r in ranked if r["method"] == PLAIN[0]), None)
  head = f"Paired comparison, seed {seed}, math task {version}"
  if plain is None:
    return ["", f"{head}: no {PLAIN[0]} setting to compare with."]
  lines = ["", f"{head}: each method's best against {PLAIN[0]}'s best "
           f"({plain['setting']}), McNemar's exact test on the same held-out problems. "
           f"Ranked by accuracy; a difference is significant only at p < "
           f"{SIGNIFICANT:g}.", "",
           f"| method | setting | accuracy [95% interval] | right only with it "
           f"| right only with {PLAIN[0]} | p-value | difference |",
           "|---|---|---|---:|---:|---:|---|"]
  for r in ranked:
    test = r.get("vs_plain")
    if r is plain:
      cells = "- | - | - | the comparison"
    elif "refused" in test:
      cells = f"- | - | - | {test['refused']}"
    else:
      p = test["p_value"]
      verdict = ("not significant" if p >= SIGNIFICANT else
                 "significant: " + ("more" if test["only_this"] > test["only_plain"]
                                    else "less") + " accurate")
      cells = f"{test['only_this']} | {test['only_plain']} | {p:.3g} | {verdict}"
    lines.append(f"| {r['method']} | {r['setting']} | {_accuracy(r)} | {cells} |")
  return lines


def _forgetting_table(best: dict[str, dict], task: str, title: str,
                      adamw_mem: int | None) -> list[str]:
  quality = "accuracy [95% interval]" if task == "math" else "held-out loss"
  lines = ["", f"Forgetting, {title}: each method's best setting (seed 0, else its "
           f"lowest seed), best first.", "",
           f"| method | setting | {quality} | step memory x AdamW | second-text ppl "
           "before -> after | after / before | chat answers after |",
           "|---|---|---|---:|---|---:|---|"]
  for m, r in sorted(best.items(), key=lambda kv: _score(kv[1])):
    before, after = r.get("second_text_ppl_before"), r.get("second_text_ppl_after")
    ratio = f"{after / before:.3f}" if before and after is not None else "-"
    answers = " / ".join(repr(x) for x in (r.get("chat_after") or {}).values()) or "-"
    lines.append(f"| {m} | {r['setting']} | {_quality(r, task)} | {_ratio(r, adamw_mem)} "
                 f"| {_fmt(before, '.3f')} -> {_fmt(after, '.3f')} | {ratio} "
                 f"| {_cell(answers)} |")
  return lines


def across_seeds(rows: list[dict], task: str) -> list[dict]:
  """Each method's best seed-0 setting among the learning rates it repeated at other
  seeds (a rate run at seed 0 only does not hide the repeated one):
  ``{"method", "lr", "runs": [row per seed, seed order], "mean"}`` for each method
  run at more than one seed, best mean first (accuracy on math, else held-out loss)."""
  key = "accuracy_after" if task == "math" else "heldout_loss_after"
  done = [r for r in rows if r["task"] == task and r.get(key) is not None]
  seeds: dict[tuple, set] = {}
  for r in done:
    seeds.setdefault((r["method"], r["lr"]), set()).add(r["seed"])
  repeated = [r for r in done if len(seeds[r["method"], r["lr"]]) > 1]
  out = []
  for m, first in best_per_method(repeated, task, 0).items():
    runs = sorted((r for r in repeated if r["method"] == m and r["lr"] == first["lr"]),
                  key=lambda r: r["seed"])
    mean = sum(r[key] for r in runs) / len(runs)
    out.append({"method": m, "lr": first["lr"], "runs": runs, "mean": mean})
  return sorted(out, key=lambda x: -x["mean"] if task == "math" else x["mean"])


def _across_seeds_table(rows: list[dict], task: str, title: str) -> list[str]:
  methods = across_seeds(rows, task)
  if not methods:
    return []
  seeds = sorted({r["seed"] for x in methods for r in x["runs"]})
  quality = "accuracy" if task == "math" else "held-out loss"
  lines = ["", f"Across seeds, {title}: each method's best seed-0 learning rate among those "
           f"it ran at more than one seed, at every seed, by the mean {quality}, best "
           "first.", "",
           "| method | lr | " + " | ".join(f"{quality}, seed {s}" for s in seeds)
           + " | mean | second-text ppl, " + ", ".join(f"seed {s}" for s in seeds) + " |",
           "|---|---:|" + "---:|" * (len(seeds) + 2)]
  for x in methods:
    by_seed = {r["seed"]: r for r in x["runs"]}
    cells = [_quality(by_seed[s], task) if s in by_seed else "-" for s in seeds]
    ppl = ", ".join(_fmt(by_seed[s].get("second_text_ppl_after"), ".2f")
                    if s in by_seed else "-" for s in seeds)
    lines.append(f"| {x['method']} | {_fmt(x['lr'], 'g')} | " + " | ".join(cells)
                 + f" | {x['mean']:.{3 if task == 'math' else 4}f} | {ppl} |")
  return lines


def loss_at(curve, seconds: float) -> float | None:
  """The last held-out loss of ``curve`` ((seconds, loss) points) at or before
  ``seconds``; None before its first point or past its end (the run stopped)."""
  if not curve or seconds > curve[-1][0] + 1e-6:
    return None
  earlier = [loss for t, loss in curve if t <= seconds + 1e-6]
  return earlier[-1] if earlier else None


def _loss_over_time(best: dict[str, dict], title: str) -> list[str]:
  """Each method's best held-out loss (evaluation subset) at points of its budget,
  the leader at each, and where the order differs from the order at the end."""
  curves = {m: [tuple(x) for x in r.get("heldout_loss_curve") or []]
            for m, r in best.items()}
  curves = {m: c for m, c in curves.items() if len(c) > 1}
  if len(curves) < 2:
    return []
  end = min(c[-1][0] for c in curves.values())  # every method has a loss up to here
  marks = [t for t in (60, 150, 300, 600, 900, 1200, 1800, 3600) if t < 0.95 * end]
  marks.append(end)
  order = lambda t: [m for m, _ in sorted(
      ((m, loss_at(c, t)) for m, c in curves.items()), key=lambda kv: kv[1])]
  final = order(end)
  lines = ["", f"Held-out loss over the budget, {title}: each method's best setting, on "
           "the evaluation subset (the last evaluation at or before each time; "
           "evaluations are every 25 steps, so slower steps give coarser curves).", "",
           "| seconds of training | " + " | ".join(final) + " | leader | order as at "
           "the end |", "|---:|" + "---:|" * len(final) + "---|---|"]
  for t in marks:
    losses = [loss_at(curves[m], t) for m in final]
    now = order(t)
    if len(set(losses)) < len(losses):  # e.g. no evaluation yet since the start
      leader, same = ("tie" if losses.count(min(losses)) > 1 else now[0]), "-"
    else:
      leader, same = now[0], "yes" if now == final else "no"
    lines.append(f"| {t:.0f} | " + " | ".join(_fmt(x, ".4f") for x in losses)
                 + f" | {leader} | {same} |")
  return lines


def plot_forgetting(best: dict[str, dict], task: str, path: str) -> None:
  """Quality against second-text perplexity after tuning, a labelled point per method."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  xs = [r["second_text_ppl_after"] for r in best.values()
        if r.get("second_text_ppl_after") is not None]
  # One method that forgot far more than the rest would squeeze the others into a
  # line on a linear axis; perplexity ratios read the same on a log axis.
  log_x = bool(xs) and max(xs) > 3 * min(xs)
  if log_x:
    ax.set_xscale("log")
  for m, r in best.items():
    x = r.get("second_text_ppl_after")
    y = r.get("accuracy_after" if task == "math" else "heldout_loss_after")
    if x is None or y is None:
      continue
    interval = r.get("accuracy_after_interval") if task == "math" else None
    yerr = [[y - interval[0]], [interval[1] - y]] if interval else None
    ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3)
    ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
  before = next((r["second_text_ppl_before"] for r in best.values()
                 if r.get("second_text_ppl_before") is not None), None)
  if before is not None:
    ax.axvline(before, ls="--", color="grey", label="before tuning")
    ax.legend()
  if log_x:
    lo, hi = ax.get_xlim()
    ticks = [t for t in (20, 30, 40, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 2000, 5000)
             if lo <= t <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlabel("second-text perplexity after tuning (right: more forgetting)"
                + (", log scale" if log_x else ""))
  ax.set_ylabel("accuracy, 95% interval" if task == "math" else "held-out loss")
  ax.set_title(f"{task}: quality against forgetting, each method's best setting")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _ratio(row: dict, adamw_mem: int | None) -> str:
  mem = row.get("step_memory_bytes")
  return f"{mem / adamw_mem:.2f}" if mem and adamw_mem else "-"


def _header(rows: list[dict]) -> list[str]:
  r0 = rows[0]
  budgets: dict[tuple, list[str]] = {}
  for r in rows:
    budget = (r.get("budget_s"), r.get("budget_tokens"))
    budgets.setdefault(budget, []).append(r["setting"])
  if len(budgets) == 1:
    lines = [f"Budget per setting: {budget_text(*next(iter(budgets)))}."]
  else:
    lines = ["Budgets (they differ between rows: compare rows of one budget): "
             + "; ".join(f"{budget_text(*b)}: {len(labels)} settings"
                         for b, labels in budgets.items()) + "."]
  lines.append("Seconds of training exclude the first step and evaluations; tokens are "
               "steps x batch x seq, padding included; each row gives the steps, tokens "
               "and seconds it took.")
  lines.append(f"Batch {r0.get('batch')} x seq {r0.get('seq')}, device "
               f"{r0.get('device')}.")
  machines: dict[str, set] = {}
  for r in rows:
    machine = r.get("machine") or {}
    cpu = machine.get("cpu", "machine not recorded")
    if machine.get("cpu_id"):  # recorded since 2026-12-04: masked names told apart
      cpu = f"{cpu} [{machine['cpu_id']}]"
    machines.setdefault(cpu, set()).add(r.get("date") or "date not recorded")
  lines.append("Machines (settings on different machines are not comparable step for "
               "step): " + "; ".join(f"{cpu} ({', '.join(sorted(dates))})"
                                     for cpu, dates in sorted(machines.items())) + ".")
  versions = [(v, group) for task, v, group in task_groups(rows) if task == "math"]
  if versions:
    lines += ["", "Math task of each row (rows of different math tasks are never ranked "
              f"or compared together; {MATH_TASK}: {', '.join(tasks_lib.MATH_MODULES)}; "
              f"{OLD_MATH_TASK}: the first version, 200 held-out problems, whose records "
              "name no modules):"]
    lines += [f"- {v}: {', '.join(r['setting'] for r in group)}" for v, group in versions]
  return lines


def write_tasks_report(rows: list[dict], out: str) -> None:
  """tasks.md (printed), tasks.json, and per task ``<task>.png`` (held-out loss
  against wall-clock) and ``<task>_forgetting.png`` (quality against forgetting), of
  its current math task for math."""
  if not rows:
    raise SystemExit(f"no finished setting under {out}")

  # The pretrained model's loss on the subset is the first point of every setting of
  # a task (the same weights and sequences): given to those recorded without it.
  for r in rows:
    firsts = [x["heldout_ppl_subset_before"] for x in rows
              if x["task"] == r["task"] and "heldout_ppl_subset_before" in x]
    curve = r.get("heldout_loss_curve") or []
    if firsts and (not curve or curve[0][0] > 0):
      r["heldout_loss_curve"] = [(0.0, math.log(firsts[0]))] + list(curve)
  adamw_mem = max((r.get("step_memory_bytes") or 0 for r in rows
                   if r["method"] == "adamw"), default=None)
  lines = _header(rows)
  plotted_tasks = set()
  for task, version, group in task_groups(rows):
    title = task if version is None else f"{task}, {version}"
    columns = ["setting", "steps", "tokens", "train s"]
    if task == "math":
      columns += ["accuracy before", "after [95% interval]", "problems"]
    columns += ["held-out loss before", "after", "step memory MB", "x AdamW",
                "second-text ppl before", "after"]
    lines += ["", f"### {title}", "", "| " + " | ".join(columns) + " |",
              "|---|" + "---:|" * (len(columns) - 1)]
    for r in sorted(group, key=lambda r: (r["method"], r["seed"], r["lr"] or 0)):
      cells = [r["setting"], _fmt(r.get("steps"), "d"),
               _fmt(r.get("tokens_processed"), ","), _fmt(r.get("wall_s"), ".0f")]
      if task == "math":
        cells += [_fmt(r.get("accuracy_before"), ".3f"), _accuracy(r),
                  _fmt(r.get("problems"), "d")]
      mem = r.get("step_memory_bytes")
      cells += [_fmt(r.get("heldout_loss_before"), ".4f"),
                _fmt(r.get("heldout_loss_after"), ".4f"),
                _fmt(mem and mem / 2**20, ".0f"), _ratio(r, adamw_mem),
                _fmt(r.get("second_text_ppl_before"), ".3f"),
                _fmt(r.get("second_text_ppl_after"), ".3f")]
      lines.append("| " + " | ".join(cells) + " |")
    for seed in sorted({r["seed"] for r in group}):
      lines += ["", f"Ranking, seed {seed} (accuracy, then held-out loss; on math, whether "
                "a bracketed learning rate is inside its bracket):"]
      for m, r in sorted(best_per_method(group, task, seed).items(),
                         key=lambda kv: _score(kv[1])):
        edge = ""
        if m in BRACKETS and len(BRACKETS[m]) > 1 and task == "math" and \
            sum(x["method"] == m and x["seed"] == seed for x in group) > 1:
          edge = (" (at the edge of the bracket: extend it)"
                  if r["lr"] in (BRACKETS[m][0], BRACKETS[m][-1]) else " (inside)")
        figures = [f"accuracy {_accuracy(r)}"] if task == "math" else []
        figures.append(f"held-out loss {_fmt(r.get('heldout_loss_after'), '.4f')}")
        lines.append(f"- {r['setting']}: {', '.join(figures)}{edge}")
      if task == "math":
        lines += _paired_table(group, seed, version)
    lines += _across_seeds_table(group, task, title)
    best = plotted_per_method(group, task)
    lines += _forgetting_table(best, task, title, adamw_mem)
    lines += _loss_over_time(best, title)
    if task in plotted_tasks:  # (the plots show the current math task, else the first)
      continue
    plotted_tasks.add(task)
    lines += ["", f"Plotted: {task}.png (held-out loss against wall-clock) and "
              f"{task}_forgetting.png (quality against second-text perplexity), {title}."]
    summary_lib.plot_curves(
        {f"{m} lr={r.get('lr_setting', r['lr']) or 'free'} seed={r['seed']}":
         [tuple(x) for x in r.get("heldout_loss_curve") or []] for m, r in best.items()},
        os.path.join(out, f"{task}.png"),
        ylabel=f"{task}: held-out loss (evaluation subset)")
    plot_forgetting(best, task, os.path.join(out, f"{task}_forgetting.png"))
  lines += ["", "Chat answers to the fixed prompts, before -> after:"]
  for r in rows:
    for q, ans in (r.get("chat_after") or {}).items():
      lines.append(f"- {r['setting']}: {q} {(r.get('chat_before') or {}).get(q)!r} "
                   f"-> {ans!r}")
  with open(os.path.join(out, "tasks.json"), "w") as f:
    json.dump(rows, f, indent=2)
  table = "\n".join(lines)
  with open(os.path.join(out, "tasks.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  import absign_jax  # pylint: disable=g-import-not-at-top
  absign_jax.allocator.configure_process()  # as the program runs: freed memory kept
  main()
