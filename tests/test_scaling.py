"""Tests of ``benchmarks/scaling.py`` and the presets it adds to the grid.

The study runs on two pieces of the tiny preset (one timed, one memory-only), with the
cheap XLA code generation of the other benchmark tests and their shared compilation
cache; the default grid is only planned (``--dry-run``), never run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex

import pytest
from flax import nnx
import jax

from absign_jax.llm import hf
from absign_jax.llm import model as M

from tests.conftest import SUBPROCESS_XLA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "scaling.py")


@functools.lru_cache(maxsize=None)
def scaling():
  spec = importlib.util.spec_from_file_location("scaling_module", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# -- the presets -----------------------------------------------------------------------


def _count(vocab, dim, layers, heads, kv_heads, head_dim, mlp, *, tied, qk_norm,
           sandwich, mixed):
  """Parameters of a decoder from its shapes, counted tensor by tensor."""
  q, kv = heads * head_dim, kv_heads * head_dim
  layer = (dim * q + 2 * dim * kv + q * dim          # q, k, v, o
           + 3 * dim * mlp                           # gate, up, down
           + (4 if sandwich else 2) * dim            # RMSNorm scales
           + (2 * head_dim if qk_norm else 0)        # q_norm, k_norm
           + (1 if mixed else 0))                    # the sliding/full flag
  return vocab * dim * (1 if tied else 2) + layers * layer + dim


# The Hugging Face config.json of each (the entries the loader reads).
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "intermediate_size": 2048, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 512, "_sliding_window_pattern": 6, "vocab_size": 262144}
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256}


@pytest.mark.parametrize("name, want, documented, hf_config", [
    ("gemma3-270m", _count(262144, 640, 18, 4, 1, 256, 2048, tied=True, qk_norm=True,
                           sandwich=True, mixed=True), 268.1e6, GEMMA3_270M),
    ("llama-1b", _count(128256, 2048, 16, 32, 8, 64, 8192, tied=True, qk_norm=False,
                        sandwich=False, mixed=False), 1.2358e9, LLAMA_32_1B),
], ids=["gemma3-270m", "llama-1b"])
def test_new_presets(name, want, documented, hf_config):
  cfg = M.LlamaConfig.preset(name)
  assert cfg.num_params() == want
  assert abs(want / documented - 1) < 1e-3
  abstract = nnx.eval_shape(lambda: M.Llama(cfg.replace(scan_layers=True),
                                            rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == want
  # The preset is what the loader makes of the real model's config.json.
  assert hf.config_from_hf(hf_config) == cfg


# -- the plan --------------------------------------------------------------------------


def test_default_plan_fits_the_budget(capsys):
  plan = scaling().main(["--dry-run"])
  modes = {(p["model"], p["seq"]): p["mode"] for p in plan["pieces"]}
  assert len(modes) == 9 and modes[("smollm2-135m", 128)] == "timed"
  assert all(modes[("llama-1b", s)] == "memory-only" for s in (128, 512, 2048))
  for p in plan["pieces"]:
    assert p["reason"].startswith("estimate: adamw step")
    if p["mode"] == "timed":
      assert p["estimate"]["expected_s"] <= 480
  assert plan["estimated_s"] < 45 * 60
  assert "estimated total" in capsys.readouterr().out


def test_forced_pieces_and_reduced_steps():
  plan = scaling().main(["--dry-run", "--models", "gemma3-270m", "--seqs", "128,512",
                         "--timed-pieces", "gemma3-270m:512", "--memory-only-pieces",
                         "gemma3-270m:128"])
  p128, p512 = plan["pieces"]
  assert p128["mode"] == "memory-only" and p128["steps"] is None
  assert p512["mode"] == "timed" and p512["reason"].startswith("asked for")
  # Too long with 5 + 5 steps even with 2 + 2: the fewer steps, still timed.
  assert (p512["steps"], p512["sequence_steps"]) == (2, 2)


@pytest.mark.parametrize("argv, message", [
    (["--models", "smollm2-135m,nope"], "unknown preset"),
    (["--seqs", "128,0"], "'0' is not a positive integer"),
    (["--seqs", "12a"], "'12a' is not a positive integer"),
    (["--methods", "absignsgd,lora"], "must include adamw"),
    (["--methods", "adamw,bogus"], "unknown method"),
    (["--models", "tiny", "--seqs", "16", "--timed-pieces", "tiny:32"],
     "not in the grid"),
    (["--models", "tiny", "--seqs", "16", "--timed-pieces", "tiny:16",
      "--memory-only-pieces", "tiny:16"], "both in --timed-pieces"),
    (["--step-time-args", "--seq 64"], "set by the study itself"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--max-memory-gb", "0"], "--max-memory-gb must be positive"),
])
def test_bad_options_fail_clearly(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    scaling().parse_args(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_trend_sentences_follow_the_numbers():
  s = scaling()
  pieces = [{"model": m, "seq": 128, "rows": {"absignsgd": {
      "speedup_vs_adamw": sp, "memory_ratio_vs_adamw": mr}}}
            for m, sp, mr in (("smollm2-135m", 2.3, 0.26), ("gemma3-270m", 2.31, 0.3),
                              ("llama-1b", None, 0.1))]
  got = s.trends(pieces, ["adamw", "absignsgd"])
  assert got["memory_ratio_vs_adamw"] == [
      "At seq 128, absignsgd's memory ratio falls, not monotonically, from 0.260 at "
      "135M through 0.300 at 268M to 0.100 at 1.24B: its win over adamw grows with "
      "model size."]
  assert got["speedup_vs_adamw"] == [
      "At seq 128, absignsgd's speed-up stays between 2.30x and 2.31x from 135M to "
      "268M: its win over adamw holds with model size."]


# -- a study of two tiny pieces --------------------------------------------------------


@pytest.fixture(scope="module")
def study(request, tmp_path_factory):
  """The study on tiny at 16 (timed) and 32 (memory-only); then the same again."""
  config_cache = getattr(request.config, "cache", None)
  cache = (str(config_cache.mkdir("step_time_jax_cache")) if config_cache is not None
           else str(tmp_path_factory.mktemp("step_time_jax_cache")))
  out = tmp_path_factory.mktemp("scaling")
  argv = ["--models", "tiny", "--seqs", "16,32", "--methods", "adamw,absignsgd",
          "--timed-pieces", "tiny:16", "--memory-only-pieces", "tiny:32",
          "--steps", "1", "--sequence-steps", "1",
          "--step-time-args", f"--compilation-cache {shlex.quote(cache)}",
          "--out", str(out)]
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("XLA_FLAGS", SUBPROCESS_XLA)  # step_time.py's cheap compiles in tests
    first = scaling().main(argv)
    results = [os.path.join(out, p["result"]) for p in first["pieces"]]
    mtimes = [os.path.getmtime(r) for r in results]
    second = scaling().main(argv)
  return out, first, second, results, mtimes


def test_study_writes_its_outputs(study):
  out, first, _, _, _ = study
  for name in ("scaling.json", "scaling.md", "scaling_speedup.png",
               "scaling_memory.png"):
    assert (out / name).stat().st_size > 0, name
  for name in ("scaling_speedup.png", "scaling_memory.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out / "scaling.json").read_text())
  assert [(p["model"], p["seq"], p["mode"]) for p in saved["pieces"]] == [
      ("tiny", 16, "timed"), ("tiny", 32, "memory-only")]
  assert [p["source"] for p in first["pieces"]] == ["run", "run"]
  assert saved["machine"]["backend"] == jax.default_backend()
  md = (out / "scaling.md").read_text()
  for title in ("Step time (s)", "Speed-up vs adamw", "Compiled memory (MiB)",
                "Memory / adamw", "Where the win grows"):
    assert f"## {title}" in md
  assert "| absignsgd | " in md and "tiny, 16 | tiny, 32" in md
  assert saved["command"] in md and "asked for (--timed-pieces)" in md
  # The trend sentence carries the table's figures.
  trend = md.split("## Where the win grows")[1]
  for p in saved["pieces"]:
    assert f"{p['rows']['absignsgd']['memory_ratio_vs_adamw']:.3f}" in trend


def test_ratios_are_the_rows_figures(study):
  _, first, _, results, _ = study
  for piece, path in zip(first["pieces"], results):
    with open(path) as fh:
      rows = {r["name"]: r for r in json.load(fh)["rows"]}
    for m in ("adamw", "absignsgd"):
      got, row = piece["rows"][m], rows[m]
      assert got["memory_bytes"] == row["memory_bytes"]
      assert got["memory_ratio_vs_adamw"] == row["memory_ratio_vs_adamw"]
      assert got["memory_ratio_vs_adamw"] == pytest.approx(
          row["memory_bytes"] / rows["adamw"]["memory_bytes"])
      if piece["mode"] == "timed":
        assert got["speedup_vs_adamw"] == row["speedup_vs_adamw"]
        assert got["speedup_vs_adamw"] == pytest.approx(
            rows["adamw"]["median_step_s"] / got["step_s"])
        # Block methods: the schedule-weighted mean; full backprop: the median.
        assert got["step_s"] == (row["mean_step_s"] if m == "absignsgd"
                                 else row["median_step_s"])
      else:
        assert got["step_s"] is None and got["speedup_vs_adamw"] is None


def test_resuming_reads_instead_of_rerunning(study):
  _, first, second, results, mtimes = study
  assert [os.path.getmtime(r) for r in results] == mtimes
  assert [p["source"] for p in second["pieces"]] == ["read", "read"]
  assert [p["rows"] for p in second["pieces"]] == [p["rows"] for p in first["pieces"]]


def test_a_result_for_another_batch_is_not_read(study, tmp_path):
  _, first, _, results, _ = study
  piece = first["pieces"][1]
  assert scaling()._usable(results[1], piece, ["adamw"]) is None
  assert "no rows ['lora']" in scaling()._usable(results[1], piece, ["adamw", "lora"])
  other = json.loads(open(results[1]).read())
  other["batch"] = 8
  (tmp_path / "r.json").write_text(json.dumps(other))
  assert "batch 8 x seq 32" in scaling()._usable(str(tmp_path / "r.json"), piece,
                                                 ["adamw"])
