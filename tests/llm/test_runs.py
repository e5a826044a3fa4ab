"""A run's records: its folder, TensorBoard scalars beside metrics.jsonl, and the
program's module map (no llm module imports one that imports it back)."""

from __future__ import annotations

import ast
import glob
import json
import os
import struct

import numpy as np
import pytest

from absign_jax.llm import runs

from tests.llm._tiny_program import tiny_argv, tiny_files_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM = os.path.join(ROOT, "absign_jax", "llm")
PROG = "python -m absign_jax.llm"


files = tiny_files_fixture("runs")


def test_new_version_is_one_above_the_highest(tmp_path):
  root = str(tmp_path / "runs")
  assert runs.new_version(root) == 0 and runs.new_version(root) == 1
  os.makedirs(os.path.join(root, "version_7"))
  (tmp_path / "runs" / "version_x").mkdir()  # not a number: not a version
  (tmp_path / "runs" / "notes.txt").write_text("")
  assert runs.new_version(root) == 8
  assert sorted(os.listdir(root)) == ["notes.txt", "version_0", "version_1", "version_7",
                                      "version_8", "version_x"]


def test_each_run_without_out_gets_a_new_folder_and_out_refuses_a_finished_run(
    files, tmp_path, monkeypatch, capsys):
  from absign_jax.llm import finetune

  monkeypatch.chdir(tmp_path)
  for version in (0, 1):
    finetune.main(tiny_argv(files, "--steps", "1"))
    assert f"outputs in runs/version_{version}" in capsys.readouterr().out
    assert os.path.exists(f"runs/version_{version}/checkpoints/1")
  # With --out, a folder holding a run's checkpoints is continued or left alone.
  with pytest.raises(SystemExit) as e:
    finetune.main(tiny_argv(files, "--steps", "1", "--out", "runs/version_0"))
  assert e.value.code == 2
  assert ("runs/version_0 already holds checkpoints of a run (steps [1]): add --resume "
          "to continue it, or choose another --out") in capsys.readouterr().err
  # A run that fails before training leaves no empty folder behind.
  with pytest.raises(SystemExit):
    finetune.main(tiny_argv(files, "--batch", "10000"))
  assert sorted(os.listdir("runs")) == ["version_0", "version_1"]


# -- TensorBoard -------------------------------------------------------------------


def tfrecords(path: str):
  """The records of a TFRecord file (length, CRC, data, CRC; CRCs not checked)."""
  with open(path, "rb") as f:
    blob = f.read()
  at = 0
  while at < len(blob):
    (n,) = struct.unpack("<Q", blob[at:at + 8])
    yield blob[at + 12:at + 12 + n]
    at += 12 + n + 4


def scalars(logdir: str) -> dict[str, dict[int, float]]:
  """Every scalar of the event files in ``logdir``: tag -> step -> value."""
  from tensorboardX.proto import event_pb2

  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for record in tfrecords(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(files, tmp_path):
  pytest.importorskip("tensorboardX")
  from absign_jax.llm import finetune

  out = tmp_path / "run"
  finetune.main(tiny_argv(files, "--out", str(out), "--tensorboard"))
  assert glob.glob(str(out / "events.out.tfevents.*"))
  lines = (out / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  expected: dict[str, dict[int, float]] = {}
  for r in records:
    for key, value in r.items():
      if key != "step" and value is not None:
        expected.setdefault(key, {})[r["step"]] = value
  assert {"loss", "lr", "grad_norm", "heldout_ppl_subset", "wall_s"} <= set(expected)
  got = scalars(str(out))
  assert sorted(got) == sorted(expected)
  for key, by_step in expected.items():
    assert sorted(got[key]) == sorted(by_step), key
    for step, value in by_step.items():  # (TensorBoard keeps float32)
      assert got[key][step] == np.float32(value), (key, step)


def test_tensorboard_without_its_package_names_the_extra(monkeypatch, capsys):
  import importlib.util

  from absign_jax.llm import finetune

  find = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorboardX" else find(name, *a))
  with pytest.raises(SystemExit) as e:
    finetune.main(["--tensorboard"])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f"{PROG}: error: --tensorboard needs the tensorboardX package: pip install "
      "'absign-jax[tensorboard]' (--help lists the options)\n")


# -- the module map ----------------------------------------------------------------


def llm_imports(path: str) -> set[str]:
  """The absign_jax.llm modules a module imports, wherever (not under TYPE_CHECKING:
  annotations only)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
          and "TYPE_CHECKING" in ast.unparse(node.test)
          for stmt in node.body for n in ast.walk(stmt)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "absign_jax.llm":
        found |= {a.name for a in node.names}
      elif node.module.startswith("absign_jax.llm."):
        found.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[2] for a in node.names
                if a.name.startswith("absign_jax.llm.")}
  return found


def test_no_llm_module_imports_one_that_imports_it_back():
  # A subpackage (families/) is one module: how its own modules import one another
  # is its business.
  modules = {name[:-3]: [os.path.join(LLM, name)] for name in os.listdir(LLM)
             if name.endswith(".py") and name != "__init__.py"}
  for name in os.listdir(LLM):
    if os.path.isfile(os.path.join(LLM, name, "__init__.py")):
      modules[name] = glob.glob(os.path.join(LLM, name, "*.py"))
  graph = {m: set().union(*map(llm_imports, paths)) & set(modules) - {m}
           for m, paths in modules.items()}
  assert {"config", "registry", "runs", "loading", "evaluation", "summary"} <= set(graph)
  assert "finetune" not in graph["export"] and "export" not in graph["loading"]

  def cycle_from(start):
    path, seen = [start], set()

    def visit(m):
      for n in sorted(graph[m]):
        if n == start:
          return path + [n]
        if n not in seen:
          seen.add(n)
          path.append(n)
          found = visit(n)
          if found:
            return found
          path.pop()
      return None

    return visit(start)

  cycles = [c for c in map(cycle_from, sorted(graph)) if c]
  assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
