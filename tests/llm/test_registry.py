"""The optimizer registry: one entry adds an optimizer to the fine-tuning program and
to benchmarks/step_time.py."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax
from absign_jax.llm import registry, runs
from absign_jax.llm.config import RunConfig

from tests.conftest import benchmark_module
from tests.llm._tiny_program import tiny_argv, tiny_files_fixture


files = tiny_files_fixture("registry")


@pytest.fixture
def sgd(monkeypatch):
  """Plain SGD, registered for this test only."""
  entry = registry.Optimizer(make=lambda lr, config: optax.sgd(lr), lr=0.5)
  monkeypatch.setitem(registry.OPTIMIZERS, "sgd", entry)
  return entry


def benchmark_runners():
  """``benchmarks/runners.py`` loaded afresh: its rows read the registry as it is now."""
  return benchmark_module("runners", fresh="runners_with_sgd")


def test_one_entry_adds_an_optimizer_to_the_program(sgd, files, tmp_path, capsys):
  from absign_jax.llm import finetune

  out = tmp_path / "sgd"
  [result] = finetune.main(tiny_argv(files, "--optimizer", "sgd", "--out", str(out)))
  summary = json.loads((out / "summary.json").read_text())
  assert summary == result.summary
  assert summary["optimizer"] == "sgd" and summary["lr"] == 0.5  # the entry's default
  assert summary["steps"] == 3 and np.isfinite(summary["ppl_after"])
  assert summary["ppl_after"] != summary["ppl_before"]
  # The loop's schedule drives the entry's learning rate: warm-up, then cosine.
  lrs = [json.loads(l)["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()]
  expected = [0.5 * (0.1 + 0.9 * (k - 1) / 5)
              * (0.1 + 0.45 * (1 + np.cos(np.pi * (k - 1) / 3))) for k in (1, 2, 3)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-12)
  assert "[sgd] held-out perplexity" in capsys.readouterr().out
  # Its options are those of any full-backprop optimizer; its rerun file names it.
  assert "optimizer = \"sgd\"" in (out / "config.toml").read_text()
  compare = finetune.parse_args(["--compare", "absignsgd,sgd"]).compare
  assert compare == ("absignsgd", "sgd")
  with pytest.raises(SystemExit):
    finetune.parse_args(["--optimizer", "sgd", "--precision", "fp16"])


def test_one_entry_adds_an_optimizer_to_the_benchmark(sgd, monkeypatch):
  module = benchmark_runners()
  assert "sgd" in module.METHODS and "sgd" in module.RUN_ORDER
  assert "sgd" in module.FLAX_GPT_METHODS and "sgd" not in module.BLOCK_METHODS
  monkeypatch.setitem(sys.modules, "runners", module)  # what step_time.py imports
  cli = benchmark_module("step_time", fresh="step_time_with_sgd")
  assert cli.parse_args(["--methods", "sgd"]).methods == "sgd"
  assert "sgd" in cli.parse_args(["--methods", "all"]).methods.split(",")
  tx = module.make_tx("sgd")  # the entry's factory at the benchmark's lr
  params = {"w": jnp.arange(3.0)}
  grads = {"w": jnp.asarray([1.0, -2.0, 4.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["w"], -module.LR * grads["w"])
  # A step of the benchmark's model with it.
  cfg = module.LlamaConfig.preset("tiny")
  model = module.Model(cfg)
  runner, _ = module.make_runner("sgd", model, module.make_batch(cfg, 2, 16), model,
                                 "auto")
  loss, _ = runner()
  assert np.isfinite(loss)


def test_the_benchmark_builds_what_it_built_before():
  """The registry's factories at the benchmark's options: its former transformations."""
  module = benchmark_runners()
  lr = module.LR
  before = {"adamw": optax.adamw(lr, weight_decay=module.WEIGHT_DECAY),
            "absignsgd": absign_jax.absignsgd(lr, depth_bias=10.0),
            "block_adam": absign_jax.block_adam(lr, steps_per_block=1,
                                                selection="cyclic"),
            "lora": optax.adamw(1e-4, weight_decay=0.0)}
  params = {"layers": [{"w": jnp.arange(4.0) + i} for i in range(3)]}
  for name, old in before.items():
    new = module.make_tx(name)
    s_old, s_new = old.init(params), new.init(params)
    for i in range(3):
      g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params)
      u_old, s_old = old.update(g, s_old, params)
      u_new, s_new = new.update(g, s_new, params)
      for a, b in zip(jax.tree.leaves(u_old), jax.tree.leaves(u_new)):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_entries_read_and_save_real_options():
  fields = {f.name for f in dataclasses.fields(RunConfig)}
  busy = RunConfig(relative=True, momentum=0.5, switch_every=3)
  for name, entry in registry.OPTIMIZERS.items():
    assert set(entry.options) <= fields, name
    assert set(entry.settings(busy)) <= set(runs.RESUME_SETTINGS), name
    assert (entry.lr is None) == entry.parameter_free
  assert registry.get("lora").frozen_in_batch and registry.get("block_adam").block
  with pytest.raises(ValueError, match="unknown optimizer 'nope'; choose from absignsgd"):
    registry.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    registry.register("adamw", registry.get("adamw"))
