"""The plan of ``benchmarks/quality.py``'s task sweep: which settings each phase runs,
how the best are picked, and what counts as finished (no training here)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
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


# -- records fabricated as a finished setting leaves them (no training) ----------------

CHAT = {"What is the capital of France?": "Paris."}


def record(quality, out, setting, correct=None, questions=None, old=False, curve=None,
           **fields):
  """Writes a finished setting's summary.json, curve.json and (math) answers.jsonl.

  ``old``: as the first math task's records were written (no modules, no intervals,
  no token figures).
  """
  d = setting.directory(str(out))
  os.makedirs(d)
  summary = {"task": setting.task, "lr": setting.lr, "steps": 10, "wall_s": 300.0,
             "batch": 4, "seq": 128, "device": "cpu", "heldout_loss_before": 3.0,
             "heldout_loss_after": 2.0, "step_memory_bytes": 2**30,
             "second_text_ppl_before": 40.0, "second_text_ppl_after": 44.0,
             "chat_before": CHAT, "chat_after": {k: "Rome." for k in CHAT}}
  curve = {"setting": setting.label, "task": setting.task, "method": setting.method,
           "seed": setting.seed, "lr_setting": setting.lr, "budget_s": 300.0,
           "heldout_loss_curve": curve or [[0.0, 3.0], [300.0, 2.0]]}
  if not old:
    summary["tokens_processed"] = 10 * 4 * 128
    curve.update(budget_tokens=None, steps=10, tokens_processed=10 * 4 * 128,
                 wall_s=300.0)
  if correct is not None:
    questions = questions or [f"What is {i} + 1?" for i in range(len(correct))]
    summary.update(accuracy_before=0.0, accuracy_after=sum(correct) / len(correct))
    with open(os.path.join(d, "answers.jsonl"), "w") as f:
      for q, ok in zip(questions, correct):
        a = {"question": q, "reference": "1", "answer": "1" if ok else "2", "correct": ok}
        if not old:
          a.update(module="arithmetic__add_or_sub", correct_before=False)
        f.write(json.dumps(a) + "\n")
    if not old:
      summary["accuracy_by_module"] = {"arithmetic__add_or_sub": {
          "problems": len(correct), "accuracy_before": 0.0,
          "accuracy_after": sum(correct) / len(correct)}}
  summary.update(fields)
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(d, "curve.json"), "w") as f:
    json.dump(curve, f)


N = 40  # held-out problems of the fabricated math settings
PLAIN_OK = [i < 8 for i in range(N)]  # absignsgd's best: 8 right
LORA_OK = [i < 4 or i >= 24 for i in range(N)]  # 20 right, 16 of them not absignsgd's
ADAMW_OK = [i < 6 or i in (30, 31, 32, 33) for i in range(N)]  # 10: not significant


@pytest.fixture(scope="module")
def report(quality, tmp_path_factory):
  """A report built from fabricated records of both math tasks and chat; (out, text,
  the rows of tasks.json by setting label)."""
  out = tmp_path_factory.mktemp("tasks")
  S = quality.Setting
  record(quality, out, S("math", "absignsgd", 1e-3), PLAIN_OK)
  record(quality, out, S("math", "absignsgd", 3e-4), [i < 2 for i in range(N)])
  record(quality, out, S("math", "lora", 3e-4), LORA_OK, second_text_ppl_after=42.0)
  record(quality, out, S("math", "adamw", 1e-4), ADAMW_OK)
  questions = [f"What is {i} + 1?" for i in range(N)]
  record(quality, out, S("math", "galore", 1e-3), PLAIN_OK, questions=questions[::-1])
  record(quality, out, S("math", "block_adam", 3e-4), PLAIN_OK[:10])
  # The first math task's records: more accurate than any above, never ranked with them.
  record(quality, out, S("math", "adamw", 3e-5), [True] * 36 + [False] * 4, old=True)
  record(quality, out, S("math", "lora", 1e-3), [True] * 38 + [False] * 2, old=True)
  record(quality, out, S("chat", "absignsgd", 1e-3), heldout_loss_after=2.5)
  record(quality, out, S("chat", "lora", 3e-4), heldout_loss_after=2.4,
         second_text_ppl_after=46.0)
  quality.write_tasks_report(quality.load_rows(str(out)), str(out))
  with open(os.path.join(out, "tasks.md")) as f:
    text = f.read()
  with open(os.path.join(out, "tasks.json")) as f:
    rows = {r["setting"]: r for r in json.load(f)}
  return out, text, rows


def section(text, title):
  """The part of tasks.md under ``### title``."""
  return text.split(f"### {title}\n")[1].split("\n### ")[0]


def test_accuracy_intervals_and_paired_tests_are_significances(quality, report):
  from absign_jax.llm import significance

  _, text, rows = report
  for label, correct in (("math absignsgd lr=0.001 seed=0", PLAIN_OK),
                         ("math lora lr=0.0003 seed=0", LORA_OK),
                         ("math adamw lr=0.0001 seed=0", ADAMW_OK)):
    interval = significance.wilson_interval(sum(correct), len(correct))
    assert rows[label]["accuracy_after_interval"] == pytest.approx(interval[1:])
    assert f"{interval.estimate:.3f} [{interval.low:.3f}, {interval.high:.3f}]" in text
  for label, correct, verdict in (
      ("math lora lr=0.0003 seed=0", LORA_OK, "significant: more accurate"),
      ("math adamw lr=0.0001 seed=0", ADAMW_OK, "not significant")):
    test = significance.mcnemar(correct, PLAIN_OK)
    assert rows[label]["vs_plain"] == {
        "against": "math absignsgd lr=0.001 seed=0", "only_this": test.only_first,
        "only_plain": test.only_second, "p_value": pytest.approx(test.p_value)}
    assert (f"| {label} | {quality._accuracy(rows[label])} | {test.only_first} "
            f"| {test.only_second} | {test.p_value:.3g} | {verdict} |") in text
  assert test.p_value > 0.05 and significance.mcnemar(LORA_OK, PLAIN_OK).p_value < 0.05
  # Ranked by accuracy: lora, adamw, then absignsgd's best (not its 3e-4).
  table = section(text, "math, 6 modules").split("Paired comparison")[1]
  table = table.split("| method |")[1].split("Forgetting")[0]
  assert table.index("lora lr=") < table.index("adamw lr=") < table.index(
      "absignsgd lr=0.001") and "absignsgd lr=0.0003" not in table


def test_the_ranking_gives_each_settings_figures(quality, report):
  _, text, rows = report
  chat = section(text, "chat")
  first = chat.index("- chat lora lr=0.0003 seed=0: held-out loss 2.4000\n")
  assert first < chat.index("- chat absignsgd lr=0.001 seed=0: held-out loss 2.5000\n")
  lora = rows["math lora lr=0.0003 seed=0"]
  assert (f"- math lora lr=0.0003 seed=0: accuracy {quality._accuracy(lora)}, "
          "held-out loss 2.0000\n") in section(text, "math, 6 modules")


def test_different_problem_lists_are_not_paired(quality, report):
  answers = [{"question": f"q{i}", "correct": i % 2 == 0} for i in range(6)]
  with pytest.raises(ValueError, match=r"problem lists differ \(6 against 5 problems\)"):
    quality.paired_test(answers, answers[:5])
  with pytest.raises(ValueError, match="problem lists differ .problem 1 is another"):
    quality.paired_test(answers, answers[::-1])
  assert quality.paired_test(answers, answers).p_value == 1.0
  _, text, rows = report
  assert rows["math galore lr=0.001 seed=0"]["vs_plain"]["refused"] == (
      "not compared: the problem lists differ (problem 1 is another question)")
  assert rows["math block_adam lr=0.0003 seed=0"]["vs_plain"]["refused"] == (
      f"not compared: the problem lists differ (10 against {N} problems)")
  assert "| - | - | - | not compared: the problem lists differ (10 against" in text


def test_forgetting_table_and_plots_are_written(report):
  out, text, _ = report
  for name in ("math.png", "chat.png", "math_forgetting.png", "chat_forgetting.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  chat = section(text, "chat").split("Forgetting, chat")[1]
  # best first (held-out loss): lora, then absignsgd; the memory ratio has no AdamW
  # row on chat's side but the math one's.
  assert ("| lora | chat lora lr=0.0003 seed=0 | 2.4000 | 1.00 | 40.000 -> 46.000 "
          "| 1.150 | 'Rome.' |") in chat
  assert chat.index("| lora |") < chat.index("| absignsgd |")
  math_part = section(text, "math, 6 modules").split("Forgetting, math")[1]
  assert "| lora | math lora lr=0.0003 seed=0 | 0.500 [" in math_part
  assert "| 40.000 -> 42.000 | 1.050 |" in math_part


def test_the_loss_over_the_budget_shows_where_the_order_changes(quality, tmp_path):
  S = quality.Setting
  record(quality, tmp_path, S("chat", "absignsgd", 1e-3),
         curve=[[0.0, 3.0], [100.0, 2.5], [200.0, 2.2], [300.0, 2.0]])
  record(quality, tmp_path, S("chat", "lora", 3e-4),
         curve=[[0.0, 3.0], [90.0, 2.3], [210.0, 2.25], [310.0, 2.1]])
  quality.write_tasks_report(quality.load_rows(str(tmp_path)), str(tmp_path))
  text = (tmp_path / "tasks.md").read_text()
  table = text.split("Held-out loss over the budget, chat")[1].split("\n\n")[1]
  assert table.splitlines()[2:] == [  # lora leads at 150 s, absignsgd at the end
      "| 60 | 3.0000 | 3.0000 | tie | - |",
      "| 150 | 2.5000 | 2.3000 | lora | no |",
      "| 300 | 2.0000 | 2.2500 | absignsgd | yes |"]
  assert quality.loss_at([(0.0, 3.0), (90.0, 2.3)], 89.0) == 3.0
  assert quality.loss_at([(0.0, 3.0), (90.0, 2.3)], 91.0) is None  # past its end


def test_machines_with_one_masked_name_are_told_apart(quality, tmp_path):
  S = quality.Setting
  for setting, ident in ((S("chat", "absignsgd", 1e-3), "cpu family 25, model 1"),
                         (S("chat", "lora", 3e-4), "cpu family 23, model 49"),
                         (S("chat", "adamw", 1e-4), None)):
    record(quality, tmp_path, setting, date="2026-12-04",
           machine={"cpu": "AMD EPYC", **({"cpu_id": ident} if ident else {})})
  quality.write_tasks_report(quality.load_rows(str(tmp_path)), str(tmp_path))
  line = next(ln for ln in (tmp_path / "tasks.md").read_text().splitlines()
              if ln.startswith("Machines"))
  for name in ("AMD EPYC (", "AMD EPYC [cpu family 25, model 1] (",
               "AMD EPYC [cpu family 23, model 49] ("):
    assert name in line


def test_across_seeds_gives_each_seed_and_the_mean_at_the_repeated_rate(quality, tmp_path):
  S = quality.Setting
  for seed, absign, lora in ((0, 2.50, 2.40), (1, 2.30, 2.45)):
    record(quality, tmp_path, S("chat", "absignsgd", 1e-3, seed),
           heldout_loss_after=absign, second_text_ppl_after=41.0 + seed)
    record(quality, tmp_path, S("chat", "lora", 3e-4, seed), heldout_loss_after=lora)
  # another rate at seed 1 only, better than the seed-0 best: not LoRA's seed-1 figure
  record(quality, tmp_path, S("chat", "lora", 1e-3, 1), heldout_loss_after=2.0)
  # a rate at seed 0 only, better there: absignsgd's row stays at the repeated rate
  record(quality, tmp_path, S("chat", "absignsgd", 3e-4, 0), heldout_loss_after=2.1)
  record(quality, tmp_path, S("chat", "adamw", 1e-4, 0), heldout_loss_after=2.2)
  quality.write_tasks_report(quality.load_rows(str(tmp_path)), str(tmp_path))
  text = (tmp_path / "tasks.md").read_text()
  table = text.split("Across seeds, chat")[1].split("\n\n")[1].splitlines()
  assert table[0] == ("| method | lr | held-out loss, seed 0 | held-out loss, seed 1 "
                      "| mean | second-text ppl, seed 0, seed 1 |")
  # absignsgd's mean (2.40) below LoRA's (2.425); adamw ran one seed: no row
  assert table[2:] == ["| absignsgd | 0.001 | 2.5000 | 2.3000 | 2.4000 | 41.00, 42.00 |",
                       "| lora | 0.0003 | 2.4000 | 2.4500 | 2.4250 | 44.00, 44.00 |"]


def test_old_math_rows_build_and_are_never_ranked_with_new_ones(quality, report):
  _, text, rows = report
  old = ("math adamw lr=3e-05 seed=0", "math lora lr=0.001 seed=0")
  assert {rows[x]["math_task"] for x in old} == {quality.OLD_MATH_TASK}
  assert rows["math lora lr=0.0003 seed=0"]["math_task"] == quality.MATH_TASK
  assert f"- {quality.OLD_MATH_TASK}: {old[0]}, {old[1]}\n" in text  # the header
  new, former = section(text, "math, 6 modules"), section(text, "math, old 4 modules")
  assert all(x not in new for x in old) and all(x in former for x in old)
  assert "no absignsgd setting to compare with" in former
  assert all("vs_plain" not in rows[x] for x in old)
  assert f"| {old[0]} | 10 | - | 300 | 0.000 | 0.900 [" in former  # no token figures
  # The plots show the current task's best settings, not the (more accurate) old ones.
  assert "math.png (held-out loss against wall-clock) and math_forgetting.png" in new


def test_the_records_of_the_first_math_task_still_make_a_report(quality, tmp_path,
                                                                monkeypatch):
  monkeypatch.setattr(quality.summary_lib, "plot_curves", lambda *a, **k: None)
  monkeypatch.setattr(quality, "plot_forgetting", lambda *a, **k: None)
  rows = quality.load_rows(os.path.join(ROOT, "benchmarks", "results", "tasks"))
  assert rows and {r["math_task"] for r in rows if r["task"] == "math"} == {
      quality.OLD_MATH_TASK}
  quality.write_tasks_report(rows, str(tmp_path))
  with open(tmp_path / "tasks.md") as f:
    assert "Budget per setting: 300 s (no token limit)." in f.read()


def test_a_token_budget_reaches_the_program_and_its_record(quality, tmp_path,
                                                           monkeypatch):
  from absign_jax.llm import runs as runs_lib

  calls = []

  def train(args, optimizer, loaded, out_dir):
    calls.append(args)
    os.makedirs(out_dir)
    steps = args.total_steps
    summary = {"task": "chat", "lr": args.lr, "steps": steps, "wall_s": 12.0,
               "tokens_processed": steps * args.batch * args.seq, "batch": args.batch,
               "seq": args.seq, "device": "cpu", "heldout_loss_before": 3.0,
               "heldout_loss_after": 2.0, "step_memory_bytes": 2**30,
               "second_text_ppl_before": 40.0, "second_text_ppl_after": 41.0,
               "chat_before": CHAT, "chat_after": CHAT}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return runs_lib.RunResult(optimizer, summary, [], [(0.0, 20.0), (12.0, 8.0)])

  monkeypatch.setattr(quality.finetune, "load",
                      lambda args: types.SimpleNamespace(cache={}))
  monkeypatch.setattr(quality.finetune, "train", train)
  monkeypatch.setattr(quality.profiling, "machine_info", lambda: {"cpu": "test"})
  first, second = "chat adamw lr=0.0001 seed=0", "chat lora lr=0.0003 seed=0"
  quality.main(["--run", first, "--token-budget", "2048", "--out", str(tmp_path)])
  assert calls[-1].token_budget == 2048 and calls[-1].time_budget is None
  with open(os.path.join(quality.Setting.parse(first).directory(str(tmp_path)),
                         "curve.json")) as f:
    curve = json.load(f)
  assert {k: curve[k] for k in ("budget_s", "budget_tokens", "steps",
                                "tokens_processed", "wall_s")} == {
      "budget_s": None, "budget_tokens": 2048, "steps": 4, "tokens_processed": 2048,
      "wall_s": 12.0}
  with open(tmp_path / "tasks.md") as f:
    text = f.read()
  assert "Budget per setting: 2,048 tokens (no time limit)." in text
  assert f"| {first} | 4 | 2,048 | 12 |" in text
  # Both budgets: both reach the program; the first setting, recorded at another
  # budget, is not run again.
  quality.main(["--run", f"{first},{second}", "--budget", "60", "--token-budget",
                "4096", "--out", str(tmp_path)])
  assert len(calls) == 2 and (calls[-1].time_budget, calls[-1].token_budget) == (
      60.0, 4096)
  with open(tmp_path / "tasks.md") as f:
    assert "60 s or 4,096 tokens, whichever ends first: 1 settings" in f.read()
  with pytest.raises(SystemExit):
    quality.main(["--run", first, "--token-budget", "100", "--out", str(tmp_path)])


def test_the_pretrained_figures_carry_over_to_later_invocations(quality, tmp_path,
                                                                monkeypatch):
  """A later invocation restores the untouched model's figures instead of evaluating
  it again, while they belong to the same model, data, problems and options."""
  from absign_jax.llm import data as data_lib
  from absign_jax.llm import tasks as tasks_lib

  evaluated = []

  def make_loaded(answer="1"):
    seqs = data_lib.SequenceSet(tokens=np.arange(18, dtype=np.int32).reshape(2, 9),
                                mask=np.ones((2, 8), np.float32), segment_ids=None)
    return types.SimpleNamespace(
        cache={}, heldout=seqs, data_sha256="train-data",
        problems=[tasks_lib.Problem("What is 0 + 1?", answer, "arithmetic__add_or_sub")])

  def train(args, optimizer, loaded, out_dir):
    key = (args.precision, args.forgetting, args.eval_seqs)
    if not loaded.cache.get(key):  # as evaluation.before_training: once per cache
      evaluated.append(optimizer)
      loaded.cache[key] = {"ppl_before": 20.0, "_correct_before": [True]}
    os.makedirs(out_dir)
    summary = {"task": "math", "lr": args.lr, "steps": 2, "wall_s": 1.0,
               "tokens_processed": 8, "batch": args.batch, "seq": args.seq, "device": "cpu",
               **loaded.cache[key]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return types.SimpleNamespace(summary=summary, eval_curve=[(0.0, 20.0)])

  loads = [make_loaded(), make_loaded(), make_loaded(answer="2")]
  monkeypatch.setattr(quality.finetune, "load", lambda args: loads.pop(0))
  monkeypatch.setattr(quality.finetune, "train", train)
  monkeypatch.setattr(quality, "write_report", lambda *a, **k: None)
  monkeypatch.setattr(quality, "write_tasks_report", lambda *a, **k: None)
  run = lambda label: quality.main(["--run", label, "--token-budget", "1024",
                                    "--out", str(tmp_path)])
  run("math absignsgd lr=0.001 seed=0")
  assert evaluated == ["absignsgd"] and (tmp_path / "before_math.json").exists()
  run("math lora lr=0.0003 seed=0")  # another invocation: restored, not evaluated
  assert evaluated == ["absignsgd"]
  run("math adamw lr=0.0001 seed=0")  # other problems: evaluated again
  assert evaluated == ["absignsgd", "adamw"]


def test_long_phase_settings_take_the_short_sweeps_best_rates(quality):
  from absign_jax.llm import finetune, registry

  new = dict(math_task=quality.MATH_TASK)
  short = [{**row(quality, "math", m, lr, accuracy=acc), **new}
           for m, lr, acc in (("absignsgd", 3e-4, 0.05), ("absignsgd", 1e-3, 0.06),
                              ("absignsgd", 3e-3, 0.04),  # inside
                              ("lora", 1e-4, 0.02), ("lora", 3e-4, 0.05),
                              ("lora", 1e-3, 0.08),  # at the top
                              ("block_adam", 1e-4, 0.07), ("block_adam", 3e-4, 0.05),
                              ("block_adam", 1e-3, 0.01),  # at the bottom
                              ("galore", 1e-3, 0.09))]  # one rate: no bracket
  # The first math task's rows do not count beside the current one's.
  short.append({**row(quality, "math", "absignsgd", 3e-3, accuracy=0.5),
                "math_task": quality.OLD_MATH_TASK})
  rates = {s: set() for s in quality.LONG_METHODS}
  for s in quality.long_settings(short, []):
    assert s.seed == 0
    rates[s.method].add((s.task, s.lr))
  expected = {"absignsgd": [1e-3], "lora": [1e-3, 3e-3], "lora_remat": [1e-3, 3e-3],
              "block_adam": [1e-4, 3e-5], "galore": [1e-3],
              "adamw": [registry.get("adamw").lr]}  # not in the short sweep: default
  assert rates == {m: {(t, lr) for t in ("math", "chat") for lr in lrs}
                   for m, lrs in expected.items()}
  assert quality.beyond(3e-4, up=True) == 1e-3 and quality.beyond(1e-4, up=False) == 3e-5
  # Seed 1: the best four per task, once every seed-0 setting of the task is done.
  assert quality.long_settings(short, [], seed=1) == []
  first = quality.long_settings(short, [])
  done = [row(quality, "math", s.method, s.lr, accuracy=i / 100)
          for i, s in enumerate(x for x in first if x.task == "math")]
  done.append(row(quality, "math", "absignsgd_relative", 5e-3, accuracy=0.9))  # options
  picked = quality.long_settings(short, done, seed=1)
  # (each method's best: adamw, galore, block_adam at 3e-5, lora_remat at 3e-3)
  assert [(s.task, s.method, s.lr, s.seed) for s in picked] == [
      ("math", m, lr, quality.SECOND_SEED) for m, lr in (
          ("adamw", registry.get("adamw").lr), ("galore", 1e-3), ("block_adam", 3e-5),
          ("lora_remat", 3e-3))]
  # lora_remat is lora with the program's per-layer rematerialisation.
  assert quality.method_run("lora_remat") == ("lora", {"remat": True})
  assert set(quality.method_run("lora_remat")[1]) <= set(vars(finetune.parse_args([])))
  assert quality.Setting.parse("chat lora_remat lr=0.001 seed=0").method == "lora_remat"


def test_long_budget_phases_list_their_settings(quality, tmp_path, capsys):
  done = quality.Setting("math", *quality.PLAIN)
  record(quality, tmp_path, done, PLAIN_OK)  # at 300 s
  quality.main(["--phase", "long", "--list", "--out", str(tmp_path),
                "--short-out", str(tmp_path / "none")])
  listed = capsys.readouterr().out
  assert (f"other  {done.label}  (recorded at 300 s (no token limit), not 1800 s "
          "(no token limit))") in listed
  assert "todo  chat lora_remat lr=0.0003 seed=0" in listed  # lora's default rate
  assert "later math: the best 4 again with seed 1" in listed
  quality.main(["--phase", "options", "--list", "--out", str(tmp_path),
                "--budget", "1800"])
  listed = capsys.readouterr().out.splitlines()
  assert len(listed) == len(quality.options_settings())
  assert f"other  {done.label}  (recorded at 300 s (no token limit), not 1800 s " \
      "(no token limit))" in listed
  quality.main(["--phase", "options", "--list", "--out", str(tmp_path)])  # at 300 s
  assert (f"other  {done.label}  (recorded on {N} held-out problems)"
          in capsys.readouterr().out.splitlines())
  quality.main(["--phase", "options", "--list", "--out", str(tmp_path),
                "--eval-problems", str(N)])
  assert f"done  {done.label}" in capsys.readouterr().out.splitlines()
