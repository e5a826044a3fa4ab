"""Smoke tests of ``benchmarks/step_time.py`` on the tiny preset.

One run of every row with both opt-in studies (a few steps each), a ``--memory-only``
run that must agree with it, and a run on the defaults with PyTorch hidden. The runs
share a persistent compilation cache (``--compilation-cache``, kept in pytest's cache
directory), so a program compiles once, and not again in later sessions. Also: the
report regenerated from the JSON alone, and the FLOP model
(``benchmarks/cost_model.py``) against the counts of XLA's compiled programs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import jax
import pytest

import absign_jax
from absign_jax import profiling
from absign_jax.train.model import subtree

from tests.conftest import ALLOCATOR_CHOICE, SUBPROCESS_XLA, benchmark_module

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
          "cpu_sys_s", "minor_faults", "flops", "flops_per_s", "fraction_of_peak")
BLOCK_METHODS = ("absignsgd", "absignsgd_uniform", "block_adam")


def _env():
  return {**os.environ, "XLA_FLAGS": SUBPROCESS_XLA,
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args, prelude="pass", default_allocator=False):
  """The script's stdout; ``default_allocator``: under the allocator a user's run
  gets (a restart under mimalloc where the wheel is installed), not the suite's."""
  code = (f"import runpy, sys; {prelude}; sys.argv = {[SCRIPT, *args]!r}; "
          f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
  env = _env()
  if default_allocator:
    env.pop(ALLOCATOR_CHOICE, None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


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
                 "--compilation-cache", cache, "--out", str(out)],
                default_allocator=True)
  result = json.loads((out / "step_time_tiny.json").read_text())
  assert (out / "step_time_tiny.md").read_text().strip() in stdout
  return result, stdout, out


def test_every_row_has_its_fields(tiny):
  result, stdout, _ = tiny
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
  # The allocator the script configured itself under (a restart, for mimalloc).
  allocator = absign_jax.allocator
  name = result["machine"]["allocator"]
  assert name.startswith(("mimalloc (", "glibc (freed memory kept) (", "system (")), name
  if allocator.mimalloc_library() is not None:  # (the run had no choice set: auto)
    assert name.startswith("mimalloc ("), name
  # Ratios as plain figures: no pass/fail.
  assert "targets" not in result and "| target |" not in stdout
  for ratio in ("absignsgd speed-up vs adamw", "absignsgd memory / adamw",
                "absignsgd step / forward step", "absignsgd FLOP/s / forward FLOP/s",
                "adamw step / torch_adamw step" if HAVE_TORCH else "Ratios:"):
    assert ratio in stdout, ratio


def test_flops_and_their_fraction_of_the_matmul_peak(tiny):
  result, stdout, _ = tiny
  peak = result["machine"]["matmul_peak"]
  assert peak["size"] == 2048 and peak["dtype"] == "float32" and peak["flops_per_s"] > 0
  rows = {r["name"]: r for r in result["rows"]}
  for name, r in rows.items():
    assert r["flops"] > 0 and math.isfinite(r["flops_per_s"]), name
    step = r["mean_step_s"] if "block_median_s" in r else r["median_step_s"]
    assert r["flops_per_s"] == pytest.approx(r["flops"] / step)
    assert r["fraction_of_peak"] == pytest.approx(r["flops_per_s"] / peak["flops_per_s"])
  assert {r["flops_source"] for n, r in rows.items() if n in BLOCK_METHODS} == {
      "model, visit-weighted"}
  assert {rows[n]["flops_source"] for n in ("forward", "adamw", "lora")} == {"hlo"}
  # The forward's compiled count is the FLOP model's forward, full backprop 3x it.
  runners, cost_model = benchmark_module("runners"), benchmark_module("cost_model")
  cfg, _, _ = runners.config_for("tiny", result["seq"])
  flops = cost_model.FlopModel.of(runners.layer_matmuls(cfg), result["n_layers"],
                                  result["batch"], result["seq"], cfg.loss_chunk)
  assert rows["forward"]["flops"] == pytest.approx(flops.forward(), rel=0.02)
  assert rows["adamw"]["flops"] == pytest.approx(flops.full_step(), rel=0.02)
  # A block step does less than full backprop, more than the forward.
  assert flops.forward() < rows["absignsgd"]["flops"] < rows["adamw"]["flops"]
  if HAVE_TORCH:
    assert rows["torch_forward"]["flops"] == flops.forward()
    assert rows["torch_forward"]["flops_source"] == "model"
  assert "| method | GFLOP per step | from | GFLOP/s | fraction of peak |" in stdout


def test_the_report_regenerates_the_markdown_from_the_json(tiny, tmp_path):
  """``benchmarks/report.py RESULT.json`` on its own (no JAX): the run's Markdown."""
  _, _, out = tiny
  md = tmp_path / "again.md"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"),
                         str(out / "step_time_tiny.json"), "--out", str(md)],
                        capture_output=True, text=True, timeout=120, check=True)
  assert md.read_text() == (out / "step_time_tiny.md").read_text()
  assert proc.stdout == md.read_text()


def _static_block_flops(model, batch, i: int, recompute: bool) -> float:
  """XLA's count of a block step at layer ``i`` written out layer by layer (static
  bounds): layers below forward only, layer ``i`` differentiated, those above kept
  or recomputed (``jax.checkpoint``)."""
  lay = model.parts.layered

  def loss(w, stack, params, batch):
    take = lambda l: jax.tree.map(lambda x: x[l], stack)
    h = lay.embed(params, batch)
    ctx = lay.batch_context(params, batch)
    n = jax.tree.leaves(stack)[0].shape[0]
    for l in range(i):
      h = lay.apply_layer(take(l), h, ctx)
    h = lay.apply_layer(w, jax.lax.stop_gradient(h), ctx)
    for l in range(i + 1, n):
      layer = lambda x, l=l: lay.apply_layer(take(l), x, ctx)
      h = (jax.checkpoint(layer) if recompute else layer)(h)
    return lay.head_loss(params, h, batch)

  params = model.params()
  stack = subtree(params, lay.stack_path)
  active = jax.tree.map(lambda x: x[i], stack)
  compiled = jax.jit(jax.grad(loss)).lower(active, stack, params, batch).compile()
  return profiling.compiled_flops(compiled)["flops"]


@pytest.mark.parametrize("family", ["llama", "flax-gpt"])
def test_the_flop_model_matches_compiled_block_steps(family):
  """The block-step FLOP model equals XLA's count at the first and last block, with
  the layers above kept or recomputed; and the one stacked program's count (the
  layers below counted once, every conditional layer counted as running) is the
  model's terms added up, for several kept layers and save_inputs_every."""
  runners, cost_model = benchmark_module("runners"), benchmark_module("cost_model")
  cfg, layout, _ = runners.config_for("tiny", 16, family=family)
  if family == "llama":
    cfg = cfg.replace(scan_layers=layout == "stacked")
  model = runners.load_model(cfg)
  batch = runners.make_batch(cfg, 2, 16)
  n = cfg.n_layers
  flops = cost_model.FlopModel.of(runners.layer_matmuls(cfg), n, 2, 16, cfg.loss_chunk)
  # (At the last block nothing is above: kept or recomputed is the same program.)
  for i, kept in ((0, 0), (0, None), (n - 1, None)):
    assert _static_block_flops(model, batch, i, recompute=kept == 0) == pytest.approx(
        flops.block_step(i, kept), rel=1e-9), (i, kept)
  if family != "llama":
    return
  for residuals, every in ((None, 1), (0, 3)):
    runner, _ = runners.make_runner("absignsgd", model, batch, model, "auto",
                                    residuals=residuals, save_inputs_every=every)
    kept = runner.kept_layers()
    count = profiling.compiled_flops(runner.lower().compile())
    assert count["unknown_trip_loops"] == 1  # the layers below the active one
    recomputed = -(-(n - kept) // every) * every  # segments run past the last layer
    per_recomputed = flops.recompute + flops.input_gradient + flops.layer * (
        1 if every == 1 else 2)
    bound = (flops.layer + 3 * flops.layer + recomputed * per_recomputed
             + kept * (flops.layer + flops.input_gradient) + 2 * flops.head)
    assert count["flops"] == pytest.approx(bound, rel=1e-9), (residuals, every)


def test_forward_row_is_the_floor(tiny):
  result, _, _ = tiny
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
  result, _, _ = tiny
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
  result, _, _ = tiny
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
  result, stdout, _ = tiny
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
  result, _, _ = tiny
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
  one program for every block; its report states the same ratios as the Llama's."""
  llama_result, _, _ = tiny
  stdout = _run([*SMALL, "--family", "flax-gpt", "--methods", "forward,adamw,absignsgd",
                 "--steps", "2", "--sequence-steps", "3",
                 "--compilation-cache", cache, "--out", str(tmp_path)])
  result = json.loads((tmp_path / "step_time_tiny-flax-gpt.json").read_text())
  assert result["family"] == "flax-gpt"
  assert result["n_layers"] == llama_result["n_layers"]
  rows = {r["name"]: r for r in result["rows"]}
  assert list(rows) == ["forward", "adamw", "absignsgd"]
  assert rows["absignsgd"]["programs"] == 1  # list layers, one dynamic-index program
  assert len(rows["absignsgd"]["block_median_s"]) == result["n_layers"]
  assert rows["absignsgd"]["opt_state_bytes"] < 0.01 * rows["adamw"]["opt_state_bytes"]
  report = benchmark_module("report")
  ratios = {r["ratio"]: r["value"] for r in report.ratios(rows)}
  assert ratios["absignsgd speed-up vs adamw"] == rows["absignsgd"]["speedup_vs_adamw"]
  assert ratios["absignsgd step / forward step"] == pytest.approx(
      rows["absignsgd"]["mean_step_s"] / rows["forward"]["median_step_s"])
  step_over_forward = ratios["absignsgd step / forward step"]
  assert f"| absignsgd step / forward step | {step_over_forward:.3f} |" in stdout
  llama_ratios = {r["ratio"] for r in report.ratios(
      {r["name"]: r for r in llama_result["rows"]})}
  assert set(ratios) <= llama_ratios


def test_default_rows_are_those_the_ratios_read_and_badam():
  module = benchmark_module("step_time")
  default = module.parse_args([]).methods.split(",")
  assert {"forward", "adamw", "absignsgd", "lora", "torch_adamw",
          "torch_block_sign"} <= set(default)  # every row a ratio reads
  assert "sign_sgd" not in default
  assert module.parse_args(["--methods", "all"]).methods.split(",") == list(
      module.rn.METHODS)
  gpt = module.parse_args(["--family", "flax-gpt"]).methods.split(",")
  assert gpt == [m for m in default if m != "lora" and not m.startswith("torch_")]


@pytest.mark.parametrize("args, why", [
    (["--family", "flax-gpt", "--methods", "adamw,lora"], "no rows ['lora']"),
    (["--family", "flax-gpt", "--memory-only"], "drop --memory-only"),
    (["--compare-to", "other.json"], "unrecognized arguments: --compare-to"),
    (["--residual-study", "0,x"], "integers >= 0"),
    (["--residual-study", "4", "--layout", "list"], "drop --layout list"),
    (["--family", "flax-gpt", "--residual-study", "4"], "--residual-study"),
])
def test_bad_family_options_are_refused(args, why, capsys):
  module = benchmark_module("step_time")
  with pytest.raises(SystemExit):
    module.parse_args(args)
  assert why in capsys.readouterr().err


def test_scaling_hands_the_other_options_to_scaling_py(monkeypatch):
  module = benchmark_module("step_time")
  seen = []
  fake = types.ModuleType("scaling")
  fake.main = lambda argv: seen.append(argv) or "done"
  monkeypatch.setitem(sys.modules, "scaling", fake)
  assert module.main(["--preset", "tiny", "--scaling", "--steps", "2"]) == "done"
  assert seen == [["--preset", "tiny", "--steps", "2"]]
  monkeypatch.setitem(sys.modules, "scaling", None)  # not in the checkout
  with pytest.raises(SystemExit, match="benchmarks/scaling.py, which is not in"):
    module.main(["--scaling"])
