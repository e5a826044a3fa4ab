"""The plan of ``benchmarks/quality.py``'s task sweep: which settings each phase runs,
how the best are picked, and what counts as finished (no training here)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
  spec = importlib.util.spec_from_file_location(
      "quality_sweep", os.path.join(ROOT, "benchmarks", "quality.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # (dataclasses look their module up)
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[spec.name]
  return module


def row(quality, task, method, lr, seed=0, accuracy=None, loss=1.0):
  s = quality.Setting(task, method, lr, seed)
  return {"setting": s.label, "task": task, "method": method, "lr": lr, "seed": seed,
          "accuracy_after": accuracy, "heldout_loss_after": loss}


def test_math_phase_brackets_every_method(quality):
  settings = quality.math_settings()
  assert len({s.label for s in settings}) == len(settings)
  for method, lrs in quality.BRACKETS.items():
    assert sorted((s.lr for s in settings if s.method == method),
                  key=lambda x: x or 0) == sorted(lrs, key=lambda x: x or 0)
  assert {s.task for s in settings} == {"math"} and {s.seed for s in settings} == {0}


def test_chat_phase_takes_each_methods_best_math_setting(quality):
  rows = [row(quality, "math", "absignsgd", 1e-3, accuracy=0.05, loss=1.2),
          row(quality, "math", "absignsgd", 3e-4, accuracy=0.05, loss=1.1),  # same acc,
          row(quality, "math", "absignsgd", 3e-3, accuracy=0.01, loss=0.9)]  # lower loss
  with pytest.raises(SystemExit, match="finish the math settings"):
    quality.chat_settings(rows)
  for method, lrs in quality.BRACKETS.items():
    if method != "absignsgd":
      rows.append(row(quality, "math", method, lrs[0], accuracy=0.0))
  chat = {s.method: s for s in quality.chat_settings(rows)}
  assert chat["absignsgd"].lr == 3e-4 and chat["absignsgd"].task == "chat"
  assert set(chat) == set(quality.BRACKETS)


def test_seed_phase_repeats_the_top_settings_of_both_tasks(quality, monkeypatch):
  rows = [row(quality, task, m, 1e-3, accuracy=acc, loss=loss)
          for task in ("math", "chat")
          for m, acc, loss in (("a", 0.3, 2.0), ("b", 0.2, 1.0), ("c", 0.1, 1.5),
                               ("d", 0.0, 0.5))]
  for r in rows:
    if r["task"] == "chat":
      r["accuracy_after"] = None  # chat: held-out loss only
  monkeypatch.setattr(quality, "TOP_FOR_SEED", 3)
  picked = quality.seed_settings(rows)
  assert [(s.task, s.method) for s in picked] == [
      ("math", "a"), ("math", "b"), ("math", "c"),
      ("chat", "d"), ("chat", "b"), ("chat", "c")]
  assert {s.seed for s in picked} == {quality.SECOND_SEED}
  monkeypatch.setattr(quality, "TOP_FOR_SEED", None)  # every method
  assert [(s.task, s.method) for s in quality.seed_settings(rows)] == [
      ("math", "a"), ("math", "b"), ("math", "c"), ("math", "d"),
      ("chat", "d"), ("chat", "b"), ("chat", "c"), ("chat", "a")]


def test_a_label_names_its_setting_and_a_malformed_one_says_how_to_write_it(quality):
  for s in (quality.Setting("chat", "lora", 3e-4, 1),
            quality.Setting("math", "alias_absignsgd", None, 0),
            quality.Setting("math", "absignsgd_relative", 5e-3, 1)):
    assert quality.Setting.parse(s.label) == s
  for bad, why in (("chat lora 0.0003 seed=1", "TASK METHOD lr=LR seed=S"),
                   ("prose lora lr=0.0003 seed=1", "TASK math or chat"),
                   ("chat sgd lr=0.1 seed=0", "METHOD one of"),
                   ("chat lora lr=fast seed=0", "lr= takes a number"),
                   ("chat lora lr=free seed=0", "parameter-free"),
                   ("chat alias_absignsgd lr=0.001 seed=0", "parameter-free")):
    with pytest.raises(ValueError, match=why):
      quality.Setting.parse(bad)


def test_run_refuses_a_bad_label_before_any_work(quality, tmp_path, capsys):
  with pytest.raises(SystemExit):
    quality.main(["--run", "math adamw lr=1e-4 seed=0,chat lora lr=oops seed=0",
                  "--out", str(tmp_path)])
  assert "lr= takes a number" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_plot_takes_each_methods_seed_0_run_else_its_lowest_seed(quality):
  rows = [row(quality, "chat", "adamw", 1e-4, seed=1, loss=2.0),
          row(quality, "chat", "adamw", 1e-4, seed=0, loss=2.5),
          row(quality, "chat", "lora", 3e-4, seed=1, loss=2.1),
          row(quality, "chat", "lora", 1e-3, seed=1, loss=2.2),
          row(quality, "math", "galore", 1e-3, seed=0, loss=1.0)]
  plotted = quality.plotted_per_method(rows, "chat")
  assert {m: (r["seed"], r["lr"]) for m, r in plotted.items()} == {
      "adamw": (0, 1e-4), "lora": (1, 3e-4)}


def test_options_phase_runs_every_variant_beside_the_plain_step(quality):
  from absign_jax.llm import finetune, registry

  settings = quality.options_settings()
  methods = {s.method for s in settings}
  assert methods == {quality.PLAIN[0], *quality.VARIANTS}
  for task in ("math", "chat"):
    for seed in (0, quality.SECOND_SEED):
      assert {s.method for s in settings if (s.task, s.seed) == (task, seed)} == methods
  # The plain step's math setting is the math phase's: run once, reused.
  plain = quality.Setting("math", *quality.PLAIN)
  assert plain.label in {s.label for s in quality.math_settings()}
  # Every variant's options are options of the program.
  known = set(vars(finetune.parse_args([])))
  for optimizer, overrides, lr in quality.VARIANTS.values():
    assert optimizer in registry.OPTIMIZERS and lr > 0
    assert set(overrides) <= known, set(overrides) - known


def test_only_finished_settings_count(quality, tmp_path):
  done = quality.Setting("math", "adamw", 1e-4)
  half = quality.Setting("math", "adamw", 3e-4)
  for s in (done, half):
    os.makedirs(s.directory(str(tmp_path)))
    with open(os.path.join(s.directory(str(tmp_path)), "summary.json"), "w") as f:
      json.dump({"task": "math"}, f)
  with open(os.path.join(done.directory(str(tmp_path)), "curve.json"), "w") as f:
    json.dump({"setting": done.label, "method": "adamw", "seed": 0}, f)
  assert [r["setting"] for r in quality.load_rows(str(tmp_path))] == [done.label]
  # A run stopped before its budget ran out is not finished, whatever files it left.
  with open(os.path.join(half.directory(str(tmp_path)), "summary.json"), "w") as f:
    json.dump({"task": "math", "interrupted": "SIGTERM"}, f)
  with open(os.path.join(half.directory(str(tmp_path)), "curve.json"), "w") as f:
    json.dump({"setting": half.label, "method": "adamw", "seed": 0}, f)
  assert [r["setting"] for r in quality.load_rows(str(tmp_path))] == [done.label]


def test_the_plotted_curve_is_rebuilt_on_the_evaluation_subset(quality, tmp_path):
  import math

  old = quality.Setting("chat", "lora", 3e-4, 1)  # recorded without subset endpoints
  new = quality.Setting("chat", "adamw", 1e-4, 1)
  for s, extra in ((old, {}), (new, {"heldout_ppl_subset_before": 12.0,
                                     "heldout_ppl_subset_after": 8.0})):
    d = s.directory(str(tmp_path))
    os.makedirs(d)
    with open(os.path.join(d, "summary.json"), "w") as f:
      json.dump({"task": "chat", "ppl_before": 20.0, "ppl_after": 15.0, "wall_s": 3.5,
                 "heldout_loss_after": 2.7, **extra}, f)
    with open(os.path.join(d, "curve.json"), "w") as f:
      json.dump({"setting": s.label, "task": "chat", "method": s.method, "seed": 1,
                 "lr_setting": s.lr, "heldout_loss_curve": [[0.0, 3.0], [2.0, 2.2],
                                                            [3.5, 2.7]]}, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
      for rec in ({"step": 1, "wall_s": 1.0, "loss": 3.0},
                  {"step": 2, "wall_s": 2.0, "loss": 2.9, "heldout_ppl_subset": 9.0}):
        f.write(json.dumps(rec) + "\n")
  rows = {r["method"]: r for r in quality.load_rows(str(tmp_path))}
  assert rows["adamw"]["heldout_loss_curve"] == [
      (0.0, math.log(12.0)), (2.0, math.log(9.0)), (3.5, math.log(8.0))]
  assert rows["lora"]["heldout_loss_curve"] == [(2.0, math.log(9.0))]
