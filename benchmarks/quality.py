"""Held-out perplexity at equal wall-clock: the sweep behind the README's defaults.

Every setting fine-tunes SmolLM2-135M from the same pretrained weights on the same
data order and seed for the same wall-clock budget (``--budget`` seconds of training;
evaluations excluded), then reports held-out perplexity, the forgetting measure
(perplexity on a second text the tuning never sees, before and after) and memory.

    python benchmarks/quality.py --budget 180 --out runs/quality

Each setting's cosine schedule ends at the budget (the program's ``--time-budget``),
so settings with slower steps get the same decay in fewer steps.

Writes ``quality.json``, ``quality.md`` (printed last) and ``quality.png``
(held-out perplexity against wall-clock, one curve per setting).
"""

from __future__ import annotations

import argparse
import json
import os

from absign_jax.llm import finetune

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
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    args = argparse.Namespace(**{**vars(base), **overrides})
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
    finetune.plot_curves(curves, os.path.join(out, "quality.png"),
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


if __name__ == "__main__":
  main()
