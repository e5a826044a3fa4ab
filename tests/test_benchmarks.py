"""Smoke tests of ``benchmarks/step_time.py`` on the tiny preset.

One run of every row with both opt-in studies (a few steps each), a ``--memory-only``
run that must agree with it, and a run on the defaults with PyTorch hidden. The runs
share a persistent compilation cache (``--compilation-cache``, kept in pytest's cache
directory), so a program compiles once, and not again in later sessions.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import absign_jax

from tests.conftest import SUBPROCESS_XLA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_time.py")
JAX_METHODS = ("forward", "adamw", "absignsgd", "absignsgd_uniform", "block_adam",
               "sign_sgd", "lora")
TORCH_METHODS = ("torch_forward", "torch_adamw", "torch_block_sign")
HAVE_TORCH = all(importlib.util.find_spec(m) is not None
                 for m in ("torch", "transformers"))
# A smoke test checks what the script writes, not how fast XLA's code is: cheaper
# compiles (SUBPROCESS_XLA) and small batches keep it short.
SMALL = ["--preset", "tiny", "--batch", "2", "--seq", "16"]
FIELDS = ("median_step_s", "mean_step_s", "speedup_vs_adamw", "model_speedup",
          "opt_state_bytes", "compile_s", "compile_plus_100_steps_s", "cpu_user_s",
          "cpu_sys_s", "minor_faults")


def _env():
  return {**os.environ, "XLA_FLAGS": SUBPROCESS_XLA,
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, prelude="pass"):
  code = (f"import runpy, sys; {prelude}; sys.argv = {[SCRIPT, *args]!r}; "
          f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@functools.lru_cache(maxsize=None)
def step_time_module():
  """The benchmark script imported in this process (its constants and parse_args)."""
  spec = importlib.util.spec_from_file_location("step_time_module", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def cache(request, tmp_path_factory):
  """A compilation cache shared by the runs of this module (keyed by each program's
  HLO, flags and jax version: a hit is the same program); kept in pytest's cache
  directory across sessions where the cache plugin is on (CI runs without it)."""
  config_cache = getattr(request.config, "cache", None)
  if config_cache is not None:
    return str(config_cache.mkdir("step_time_jax_cache"))
  return str(tmp_path_factory.mktemp("step_time_jax_cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache):
  """Every row, both studies, two steps of each."""
  out = tmp_path_factory.mktemp("step_time")
  stdout = _run([*SMALL, "--methods", "all", "--steps", "2", "--sequence-steps", "3",
                 "--compile-steps", "2",
                 "--dispatch-study", "stacked:auto,stacked:switch",
                 "--residual-study", "0,2",
                 "--compilation-cache", cache, "--out", str(out)])
  result = json.loads((out / "step_time_tiny.json").read_text())
  assert (out / "step_time_tiny.md").read_text().strip() in stdout
  return result, stdout


def test_every_row_has_its_fields(tiny):
  result, stdout = tiny
  # The Markdown tables come last.
  assert "| method | median step (s)" in stdout
  assert stdout.rstrip().endswith(".")
  rows = {r["name"]: r for r in result["rows"]}
  expected = JAX_METHODS + (TORCH_METHODS if HAVE_TORCH else ())
  assert list(rows) == list(expected)
  n = result["n_layers"]
  for name, r in rows.items():
    for key in FIELDS:
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (name, key)
    assert r["median_step_s"] > 0 and r["mean_step_s"] > 0
    assert r["compile_s"] >= 0 and r["opt_state_bytes"] >= 0
    assert r["cpu_user_s"] + r["cpu_sys_s"] > 0, name
    assert math.isclose(r["speedup_vs_adamw"],
                        rows["adamw"]["median_step_s"] / (
                            r["mean_step_s"] if "block_median_s" in r
                            else r["median_step_s"]))
    if name in JAX_METHODS:
      assert r["memory_bytes"] > 0 and r["programs"] == 1, name
      assert r["compile_plus_100_steps_s"] == pytest.approx(
          r["compile_s"] + 100 * r["median_step_s" if name not in
                                   ("absignsgd", "absignsgd_uniform", "block_adam")
                                   else "mean_step_s"])
  assert rows["adamw"]["speedup_vs_adamw"] == 1.0
  assert rows["adamw"]["memory_ratio_vs_adamw"] == 1.0
  # Cost model: full backprop 1x, blocks faster, depth bias fastest, forward 3x.
  assert rows["sign_sgd"]["model_speedup"] == 1.0
  assert rows["forward"]["model_speedup"] == 3.0
  assert 1.0 < rows["absignsgd_uniform"]["model_speedup"] < rows["absignsgd"]["model_speedup"]
  assert rows["block_adam"]["model_speedup"] == rows["absignsgd_uniform"]["model_speedup"]
  # Block methods: every block timed, one stacked program, the scheduled sequence.
  for name in ("absignsgd", "absignsgd_uniform", "block_adam"):
    assert len(rows[name]["block_median_s"]) == n
    assert len(rows[name]["sequence_blocks"]) == 3
    assert abs(sum(rows[name]["visit_frequency"]) - 1.0) < 1e-9
  # Optimizer state: adamw holds two moments of every parameter, absignsgd none.
  assert rows["adamw"]["opt_state_bytes"] >= 2 * rows["adamw"]["param_bytes"]
  assert rows["absignsgd"]["opt_state_bytes"] < 0.01 * rows["adamw"]["opt_state_bytes"]
  # The library's allocator settings, applied when the script imports absign_jax.
  assert result["machine"]["allocator"] == (
      "kept (glibc)" if absign_jax.allocator.status().applied else
      f"system ({absign_jax.allocator.status().reason})")
  names = {t["target"] for t in result["targets"]}
  assert any("forward" in t for t in names) and any("memory" in t for t in names)


def test_forward_row_is_the_floor(tiny):
  result, _ = tiny
  rows = {r["name"]: r for r in result["rows"]}
  fwd = rows["forward"]
  # No optimizer, no gradient: less memory than any training step, no state.
  assert fwd["opt_state_bytes"] == 0
  assert fwd["memory_bytes"] < min(rows[m]["memory_bytes"] for m in JAX_METHODS[1:])
  # The loss of uniform random tokens is about log(vocab).
  assert abs(fwd["loss"] - math.log(256)) < 0.5
  assert fwd["timed_steps"] == 2


@pytest.mark.skipif(not HAVE_TORCH, reason="torch and transformers not installed")
def test_torch_rows_match_the_jax_model(tiny):
  result, _ = tiny
  rows = {r["name"]: r for r in result["rows"]}
  for name in TORCH_METHODS:
    check = rows[name]["loss_check"]
    assert check["jax"] == rows["forward"]["loss"]
    assert abs(check["torch"] - check["jax"]) <= 1e-4 * abs(check["jax"])
    assert rows[name]["memory_bytes"] is None and rows[name]["torch_threads"] >= 1
  # The PyTorch block step follows absignsgd's block sequence.
  assert rows["torch_block_sign"]["sequence_blocks"] == rows["absignsgd"]["sequence_blocks"]
  assert rows["torch_block_sign"]["visit_frequency"] == rows["absignsgd"]["visit_frequency"]
  assert rows["torch_adamw"]["opt_state_bytes"] >= 2 * rows["torch_adamw"]["param_bytes"]
  assert rows["torch_forward"]["opt_state_bytes"] == 0
  assert rows["torch_forward"]["model_speedup"] == rows["forward"]["model_speedup"] == 3.0


def test_torch_rows_skip_with_a_note_and_studies_are_off_by_default(tmp_path, cache):
  stdout = _run([*SMALL, "--methods", "forward,torch_adamw,torch_block_sign",
                 "--steps", "1", "--compilation-cache", cache, "--out", str(tmp_path)],
                prelude="sys.modules['torch'] = None")
  result = json.loads((tmp_path / "step_time_tiny.json").read_text())
  assert [r["name"] for r in result["rows"]] == ["forward"]
  assert result["compile_study"] is None and result["dispatch_study"] is None
  assert result["layout"] == "stacked"
  assert "torch is not installed" in result["torch_note"]
  assert "PyTorch rows: skipped: torch is not installed" in stdout


def test_opt_in_studies(tiny):
  result, _ = tiny
  rows = {r["name"]: r for r in result["rows"]}
  cs = result["compile_study"]
  assert cs["absignsgd"]["steps"] == cs["adamw"]["steps"] == 2
  assert cs["absignsgd"]["wall_s"] > 0 and cs["adamw"]["wall_s"] > 0
  ds = {(e["layout"], e["dispatch"]): e for e in result["dispatch_study"]}
  assert set(ds) == {("stacked", "auto"), ("stacked", "switch")}
  # The configuration of the main row is reused, another one is measured.
  assert ds[("stacked", "auto")]["mean_step_s"] == rows["absignsgd"]["mean_step_s"]
  assert ds[("stacked", "switch")]["programs"] == 1
  for e in ds.values():
    assert e["compile_s"] >= 0 and e["mean_step_s"] > 0 and e["memory_bytes"] > 0


def test_residual_study(tiny):
  """Each k is its own step: kept layers cost memory, and the table reports them."""
  result, stdout = tiny
  rows = {r["name"]: r for r in result["rows"]}
  study = {e["residuals"]: e for e in result["residual_study"]}
  assert set(study) == {0, 2}
  assert study[2]["memory_bytes"] > study[0]["memory_bytes"]
  for e in study.values():
    assert len(e["block_median_s"]) == result["n_layers"] and e["mean_step_s"] > 0
    assert e["memory_ratio_vs_adamw"] == pytest.approx(
        e["memory_bytes"] / rows["adamw"]["memory_bytes"])
    assert e["step_over_forward"] == pytest.approx(
        e["mean_step_s"] / e["forward_median_s"])
  assert "| residuals (k) | mean step (s)" in stdout


def test_memory_only_agrees_with_the_run(tiny, tmp_path, cache):
  """--memory-only compiles the same programs from shapes alone: the same sizes."""
  result, _ = tiny
  rows = {r["name"]: r for r in result["rows"]}
  methods = ("forward", "adamw", "absignsgd", "lora")
  stdout = _run([*SMALL, "--memory-only", "--methods", ",".join(methods),
                 "--compilation-cache", cache, "--out", str(tmp_path)])
  assert stdout.rstrip().splitlines()[-1].startswith("| lora |")
  mem_rows = {r["name"]: r for r in
              json.loads((tmp_path / "memory_tiny.json").read_text())["rows"]}
  for name in methods:
    assert mem_rows[name]["memory_bytes"] == rows[name]["memory_bytes"], name
    assert mem_rows[name]["opt_state_bytes"] == rows[name]["opt_state_bytes"], name


def test_a_flax_model_the_library_does_not_own(tiny, tmp_path, cache):
  """--family flax-gpt: the Flax-example GPT at the preset's size, cut by cut_nnx,
  one program for every block; --compare-to puts its ratios beside the Llama's."""
  llama_result, _ = tiny
  llama = tmp_path / "llama.json"
  llama.write_text(json.dumps(llama_result))
  _run([*SMALL, "--family", "flax-gpt", "--methods", "forward,adamw,absignsgd",
        "--steps", "2", "--sequence-steps", "3", "--compare-to", str(llama),
        "--compilation-cache", cache, "--out", str(tmp_path)])
  result = json.loads((tmp_path / "step_time_tiny-flax-gpt.json").read_text())
  assert result["family"] == "flax-gpt"
  assert result["n_layers"] == llama_result["n_layers"]
  rows = {r["name"]: r for r in result["rows"]}
  assert list(rows) == ["forward", "adamw", "absignsgd"]
  assert rows["absignsgd"]["programs"] == 1  # list layers, one dynamic-index program
  assert len(rows["absignsgd"]["block_median_s"]) == result["n_layers"]
  assert rows["absignsgd"]["opt_state_bytes"] < 0.01 * rows["adamw"]["opt_state_bytes"]
  theirs = {r["name"]: r for r in llama_result["rows"]}
  mine_vs_theirs = {
      "speed-up": (rows["absignsgd"]["speedup_vs_adamw"],
                   theirs["absignsgd"]["speedup_vs_adamw"]),
      "memory": (rows["absignsgd"]["memory_ratio_vs_adamw"],
                 theirs["absignsgd"]["memory_ratio_vs_adamw"]),
      "step / forward": (
          rows["absignsgd"]["mean_step_s"] / rows["forward"]["median_step_s"],
          theirs["absignsgd"]["mean_step_s"] / theirs["forward"]["median_step_s"])}
  compared = {t["target"].split(" within")[0]: t for t in result["targets"]
              if "within 10%" in t["target"]}
  assert len(compared) == 3
  for (mine, ref), target in zip(mine_vs_theirs.values(), compared.values()):
    assert target["value"] == pytest.approx(abs(mine / ref - 1.0))
    assert target["met"] == (target["value"] <= 0.10)


def test_default_rows_are_the_targets_and_badam(capsys):
  module = step_time_module()
  default = module.parse_args([]).methods.split(",")
  assert {"forward", "adamw", "absignsgd", "lora", "torch_adamw",
          "torch_block_sign"} <= set(default)  # every row a target reads
  assert "sign_sgd" not in default
  assert module.parse_args(["--methods", "all"]).methods.split(",") == list(
      module.METHODS)
  gpt = module.parse_args(["--family", "flax-gpt"]).methods.split(",")
  assert gpt == [m for m in default if m != "lora" and not m.startswith("torch_")]


@pytest.mark.parametrize("args, why", [
    (["--family", "flax-gpt", "--methods", "adamw,lora"], "no rows ['lora']"),
    (["--family", "flax-gpt", "--memory-only"], "drop --memory-only"),
    (["--compare-to", "no_such.json"], "no such file"),
    (["--residual-study", "0,x"], "integers >= 0"),
    (["--residual-study", "4", "--layout", "list"], "drop --layout list"),
    (["--family", "flax-gpt", "--residual-study", "4"], "--residual-study"),
])
def test_bad_family_options_are_refused(args, why, capsys):
  module = step_time_module()
  with pytest.raises(SystemExit):
    module.parse_args(args)
  assert why in capsys.readouterr().err
