"""Checkpoints: exact resume, asynchronous saves, SIGKILL mid-save, clear mismatch errors.

The exact-resume test uses a toy model (fast to compile) with every kind of state the
library carries: injected hyperparameters, a random selection key, the fp16 loss scale,
stochastic rounding and the master copy. The SIGKILL test trains a small model in a
subprocess (``tests/train/_train_script.py``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax
from absign_jax import BlockTrainStep, Checkpointer
from absign_jax.train import precision
from absign_jax.train.checkpoint import CheckpointMismatchError, describe
from tests.conftest import SUBPROCESS_XLA
from tests.models import Batches

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_train_script.py")


def toy_params(n=3, width=4, dtype=jnp.float16, stacked=False):
  keys = jax.random.split(jax.random.key(0), n)
  w = [jax.random.normal(k, (width,)).astype(dtype) for k in keys]
  if stacked:
    return {"layers": {"w": jnp.stack(w)}, "head": jnp.ones(2, dtype)}
  return {"layers": [{"w": x} for x in w], "head": jnp.ones(2, dtype)}


def toy_loss(params, batch):
  x = jnp.mean(batch["inputs"].astype(jnp.float32), 0)[:4] / 100.0 - 1.0
  layers = params["layers"]
  ws = [l["w"] for l in layers] if isinstance(layers, list) else list(layers["w"])
  return sum(jnp.sum(jnp.sin(w.astype(jnp.float32) * (i + 1)) * x)
             for i, w in enumerate(ws)) * 8.0


def toy_setup(**step_kwargs):
  tx = optax.inject_hyperparams(absign_jax.absignsgd, static_args=("depth_bias",))(
      learning_rate=1e-2, weight_decay=0.1, selection="uniform", seed=3)
  step = BlockTrainStep(toy_loss, tx, seed=5, dispatch="switch", **step_kwargs)
  return step, (lambda: step.init(toy_params())), (lambda: Batches(batch=2, seq=8, seed=1))


TOY_OPTIONS = dict(
    loss_scale=precision.DynamicLossScale(init_scale=2.0**20, growth_interval=2),
    rounding="stochastic", master_copy=True)


@pytest.fixture(scope="module")
def toy():
  """One compiled toy step with every kind of state, shared by the tests below."""
  return toy_setup(**TOY_OPTIONS)


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def run(step, state, batches, n):
  blocks = []
  for _ in range(n):
    blocks.append(int(absign_jax.active_block(state.opt_state)))
    state, _ = step(state, next(batches))
  return state, blocks


# ---------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path, toy):
  """2K steps == K steps, checkpoint, restore into a fresh state, K steps: bit for bit.

  (A new process resuming is the SIGKILL test below.)
  """
  k = 6
  step, make_state, make_batches = toy
  ref, ref_batches = make_state(), make_batches()
  ref, ref_blocks = run(step, ref, ref_batches, 2 * k)
  assert int(ref.precision.skipped_total) > 0  # the loss scale did back off
  assert len(set(ref_blocks)) > 1

  state, batches = make_state(), make_batches()
  state, blocks = run(step, state, batches, k)
  with Checkpointer(tmp_path / "ckpt", metadata={"precision": "fp16"}) as ckpt:
    assert ckpt.save(k, state, {"batches": batches.state()})
  del state, batches

  with Checkpointer(tmp_path / "ckpt") as ckpt:
    restored = ckpt.restore_latest(make_state())
  assert restored.step == k and restored.metadata["user"] == {"precision": "fp16"}
  batches = make_batches().restore(restored.data_state["batches"])
  state, more = run(step, restored.state, batches, k)
  assert blocks + more == ref_blocks
  assert batches.step == ref_batches.step == 2 * k
  leaves_equal(state, ref)  # params, optimizer, selection key, loss scale, master copy


def test_async_saves_keep_n_and_survive_donation(tmp_path, toy):
  step, make_state, make_batches = toy
  state, batches = make_state(), make_batches()
  saved = {}
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for k in range(1, 5):
      state, _ = step(state, next(batches))  # donates the previous state's buffers
      ckpt.save(k, state, {"batches": batches.state()})
      saved[k] = jax.tree.map(np.array, state)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    got = ckpt.restore(3, make_state())
  leaves_equal(got.state, saved[3])
  assert got.data_state == {"batches": {"step": 3, "seed": 1, "num_sequences": 10}}


def test_partial_checkpoint_is_never_picked(tmp_path, toy):
  step, make_state, make_batches = toy
  state, batches = make_state(), make_batches()
  with Checkpointer(tmp_path) as ckpt:
    state, _ = step(state, next(batches))
    ckpt.save(1, state)
  # What a kill during the write of step 2 leaves behind: orbax's temporary directory.
  partial = tmp_path / "2.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore_latest(make_state())
    assert restored.step == 1
    leaves_equal(restored.state.params, jax.tree.map(np.array, state.params))
  assert not partial.exists()  # cleaned up when the directory is opened


def test_empty_directory_restores_nothing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest({"a": jnp.ones(2)}) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 7"):
      ckpt.restore(7, {"a": jnp.ones(2)})


def test_typed_keys_weak_types_and_empty_leaves_round_trip(tmp_path):
  tree = {"key": jax.random.key(7), "weak": jnp.asarray(3), "empty": jnp.zeros((0, 2)),
          "x": jnp.arange(3.0)}
  assert tree["weak"].weak_type
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(0, tree)
    got = ckpt.restore(0, tree).state
  assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                jax.random.key_data(tree["key"]))
  assert got["weak"].weak_type and int(got["weak"]) == 3
  assert got["empty"].shape == (0, 2)
  np.testing.assert_array_equal(got["x"], tree["x"])


# ---------------------------------------------------------------------------------
# Mismatches are clear errors
# ---------------------------------------------------------------------------------


def toy_state(**kwargs):
  step_kwargs = {k: kwargs.pop(k) for k in ("master_copy",) if k in kwargs}
  params = toy_params(**kwargs)
  tx = absign_jax.absignsgd(1e-2)
  return BlockTrainStep(toy_loss, tx, **step_kwargs).init(params)


@pytest.mark.parametrize("target_kwargs, match", [
    ({"n": 4}, r"3 blocks, list layout .* the target model has 4 blocks"),
    ({"stacked": True}, r"list layout .* the target model has 3 blocks, stacked layout"),
    ({"width": 5}, r"differ in shape or dtype: .*float16\[4\], target float16\[5\]"),
    ({"dtype": jnp.bfloat16}, r"saved float16\[4\], target bfloat16\[4\]"),
    ({"master_copy": True}, r"entries of the target are not in the checkpoint.*master"),
])
def test_restore_into_another_model_is_an_error(tmp_path, target_kwargs, match):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, toy_state())
    with pytest.raises(ValueError, match=match):
      ckpt.restore_latest(toy_state(**target_kwargs))


def test_describe_lists_blocks_and_leaves():
  rec = describe(toy_state(stacked=True))
  assert rec["blocks"] == {"num_blocks": 3, "names": ["layers[0]", "layers[1]", "layers[2]"],
                           "layout": "stacked"}
  assert [".params['layers']['w']", [3, 4], "float16"] in rec["leaves"]


def test_bad_checkpointer_options(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps"):
    Checkpointer(tmp_path, save_interval_steps=0)


def _two_checkpoints(directory):
  """Checkpoints 1 and 2 of a small state; returns the state saved as step 1."""
  one = toy_state()
  two = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                     one)
  with Checkpointer(directory, async_save=False) as ckpt:
    ckpt.save(1, one, {"step": 1})
    ckpt.save(2, two, {"step": 2})
  return one


def _array_files(step_dir):
  return [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
          for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]


@pytest.mark.parametrize("damage", ["metadata_not_json", "metadata_not_utf8",
                                    "array_file_truncated", "data_record_missing"])
def test_restore_latest_skips_a_damaged_checkpoint(tmp_path, damage):
  one = _two_checkpoints(tmp_path)
  step2 = tmp_path / "2"
  if damage == "metadata_not_json":
    (step2 / "meta" / "metadata").write_text('{"format": 1, "tree": ')
  elif damage == "metadata_not_utf8":
    (step2 / "meta" / "metadata").write_bytes(b"\xff\xfe\x00garbage")
  elif damage == "array_file_truncated":
    for path in _array_files(step2):  # as a disk that filled up mid-write leaves them
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(step2 / "data" / "metadata")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.warns(UserWarning, match=r"checkpoint 2 in .* cannot be read and is skipped"):
      restored = ckpt.restore_latest(toy_state())
  assert restored.step == 1 and restored.data_state == {"step": 1}
  assert [k for k, _ in restored.skipped] == [2] and restored.skipped[0][1]
  leaves_equal(restored.state, one)


def test_restore_latest_when_no_checkpoint_can_be_read(tmp_path):
  _two_checkpoints(tmp_path)
  for k in ("1", "2"):
    (tmp_path / k / "meta" / "metadata").write_text("not json")
  with Checkpointer(tmp_path) as ckpt, pytest.warns(UserWarning):
    with pytest.raises(ValueError, match=r"none of the checkpoints.*\n  - step 2: .*"
                       r"\n  - step 1: "):
      ckpt.restore_latest(toy_state())


def test_mismatch_is_not_a_reason_to_fall_back(tmp_path):
  _two_checkpoints(tmp_path)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointMismatchError, match="checkpoint 2 .* 4 blocks"):
      ckpt.restore_latest(toy_state(n=4))


def test_non_serialisable_data_state_is_rejected_before_writing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="data_state must be JSON-serialisable.*int64"):
      ckpt.save(1, toy_state(), {"step": np.int64(1)})
    assert os.listdir(tmp_path) == []  # no temporary directory left behind
    assert ckpt.all_steps() == []
  with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
    Checkpointer(tmp_path / "m", metadata={"lr": jnp.float32(1e-3)})


# ---------------------------------------------------------------------------------
# SIGKILL during asynchronous saves
# ---------------------------------------------------------------------------------


def _lines(proc) -> "queue.Queue[str | None]":
  q: "queue.Queue[str | None]" = queue.Queue()

  def pump():
    for line in proc.stdout:
      q.put(line.strip())
    q.put(None)

  threading.Thread(target=pump, daemon=True).start()
  return q


def test_sigkill_mid_save_resumes_exactly(tmp_path):
  """Kill the trainer right after it starts an async save; resume; compare bits."""
  steps, kill_after = 14, 4
  ckpt_dir, cache = str(tmp_path / "ckpt"), str(tmp_path / "jax_cache")
  # Cheaper compiles: the trainer is timed.
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=SUBPROCESS_XLA)
  cmd = [sys.executable, SCRIPT, "--dir", ckpt_dir, "--steps", str(steps),
         "--cache", cache]
  deadline = time.monotonic() + 40
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env)
  try:
    lines, last = _lines(proc), 0
    while last < kill_after:
      line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
      assert line is not None, "the trainer exited before it was killed"
      if line.startswith("saved "):
        last = int(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)  # an async save of step `last` is in flight
    assert proc.wait(timeout=10) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert last < steps
  partial = [n for n in os.listdir(ckpt_dir) if "tmp" in n]
  print(f"killed after 'saved {last}'; left behind: {sorted(os.listdir(ckpt_dir))}"
        f" ({len(partial)} partial)")

  out, ref = str(tmp_path / "out.npz"), str(tmp_path / "ref.npz")
  done = subprocess.run(cmd + ["--resume", "--out", out, "--reference", ref],
                        capture_output=True, text=True, env=env, timeout=60)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = [int(l.split()[1]) for l in done.stdout.splitlines()
             if l.startswith("resumed ")]
  # Saves are serialised: when the save of step `last` started, `last - 1` was
  # complete (the trainer may have gone on a little before the kill landed).
  assert resumed and last - 1 <= resumed[0] < steps, (last, done.stdout)
  a, b = np.load(out), np.load(ref)
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
  for name in a.files:
    assert np.array_equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------
# The block-selection configuration is recorded and checked
# ---------------------------------------------------------------------------------


def state_with(**options):
  """A small state of absignsgd(1e-2, **options)."""
  return BlockTrainStep(toy_loss, absign_jax.absignsgd(1e-2, **options)).init(toy_params())


@pytest.mark.parametrize("saved, target, match", [
    ({}, {"selection": "uniform"},
     r"was written by an optimizer with selection='depth_biased', but the optimizer "
     r"restoring it has selection='uniform'; build the optimizer with "
     r"selection='depth_biased' to resume that run, or start the new run in another "
     r"directory\.$"),
    ({}, {"depth_bias": 5.0}, r"depth_bias=10\.0, .* has depth_bias=5\.0;"),
    ({"selection": "uniform", "seed": 1}, {"selection": "uniform", "seed": 2},
     r"with seed=1, but the optimizer restoring it has seed=2"),
    ({"selection": "random_reshuffle"}, {"selection": "cyclic"},
     r"selection='random_reshuffle', .* has selection='cyclic'"),
    ({"selection": absign_jax.costs([1, 2, 3])}, {"selection": absign_jax.costs([1, 2, 4])},
     r"costs=\[1\.0, 2\.0, 3\.0\], .* has costs=\[1\.0, 2\.0, 4\.0\]"),
    ({"selection": absign_jax.fixed_order([0, 2])},
     {"selection": absign_jax.fixed_order([2, 0])}, r"order=\[0, 2\], .* order=\[2, 0\]"),
    ({"steps_per_block": 2}, {"steps_per_block": 3},
     r"steps_per_block=2, .* steps_per_block=3"),
])
def test_restore_with_another_selection_is_an_error(tmp_path, saved, target, match):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state_with(**saved))
    with pytest.raises(CheckpointMismatchError, match=r"^the checkpoint 1 in .*" + match):
      ckpt.restore_latest(state_with(**target))
    # The same configuration restores; options the scheme does not use may differ.
    same = dict(saved, depth_bias=3.0) if saved.get("selection") else saved
    assert ckpt.restore(1, state_with(**same)).step == 1


def test_selection_config_is_in_the_metadata(tmp_path):
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state_with(selection="uniform", seed=4))
    assert ckpt.metadata_at(1)["tree"]["optimizer"] == {
        "selection": "uniform", "seed": 4, "steps_per_block": 1, "num_blocks": 3}
  assert describe(toy_state())["optimizer"]["depth_bias"] == 10.0
  assert describe({"a": jnp.ones(2)})["optimizer"] is None


def test_injected_depth_bias_in_float16_is_the_same_depth_bias():
  """optax.inject_hyperparams keeps a depth bias in the parameters' dtype."""
  from absign_jax.train.checkpoint import check_optimizer
  saved = {"optimizer": {"selection": "depth_biased", "depth_bias": float(np.float16(0.1)),
                         "steps_per_block": 1, "num_blocks": 12}}
  check_optimizer(saved, {"optimizer": dict(saved["optimizer"], depth_bias=0.1)})
  with pytest.raises(CheckpointMismatchError, match="depth_bias=0.09997"):
    check_optimizer(saved, {"optimizer": dict(saved["optimizer"], depth_bias=0.2)})


def test_checkpoint_without_selection_record_restores_with_a_warning(tmp_path):
  """Checkpoints written before the record existed restore as before, unchecked."""
  state = state_with()
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, {"step": 1})
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["tree"]["optimizer"]
  meta_file.write_text(json.dumps(meta))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.warns(UserWarning, match=r"checkpoint 1 in .* records no block-selection "
                      r"configuration \(it was written by an older version\)"):
      restored = ckpt.restore_latest(state_with(selection="uniform"))
  assert restored.step == 1  # unchecked: the uniform target reads the saved arrays
  for x, y in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_resume_into_eval_shape_target_checks_the_selection(tmp_path, toy):
  """An abstract target (jax.eval_shape of init) carries the configuration too."""
  _, make_state, _ = toy
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, make_state())
    assert ckpt.restore(1, jax.eval_shape(make_state)).step == 1
    tx = optax.inject_hyperparams(absign_jax.absignsgd, static_args=("depth_bias",))(
        learning_rate=1e-2, weight_decay=0.1, selection="random_reshuffle", seed=3)
    target = BlockTrainStep(toy_loss, tx, seed=5, dispatch="switch", **TOY_OPTIONS)
    with pytest.raises(CheckpointMismatchError, match="selection='uniform'"):
      ckpt.restore(1, jax.eval_shape(lambda: target.init(toy_params())))


# ---------------------------------------------------------------------------------
# Steps only move forward
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_saving_an_older_step_is_an_error(tmp_path, async_save):
  state = toy_state()
  with Checkpointer(tmp_path, async_save=async_save) as ckpt:
    assert ckpt.save(5, state, {"step": 5})  # possibly still being written
    with pytest.raises(ValueError, match=r"^Checkpointer\.save: step 3 is older than the "
                       r"latest checkpoint in .* \(step 5\); save a new run into another "
                       r"directory, or delete the checkpoints after step 3 first "
                       r"\(Checkpointer\.delete\)\.$"):
      ckpt.save(3, state, {"step": 3})
    # The latest step again: nothing written, the first checkpoint kept.
    assert ckpt.save(5, state, {"step": "again"}) is False
    assert ckpt.save(5, state, {"step": "again"}, force=True) is False
    ckpt.wait()
    assert ckpt.all_steps() == [5]
    assert ckpt.restore(5, state).data_state == {"step": 5}
    ckpt.delete(5)
    assert ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
      ckpt.delete(5)
  with Checkpointer(tmp_path) as ckpt:  # a new process sees the same order
    with pytest.raises(ValueError, match=r"step 2 is older than .* \(step 3\)"):
      ckpt.save(2, state)


def test_bad_step_type(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match=r"Checkpointer\.save: step must be an int >= 0, "
                       r"got '3' \(str\)"):
      ckpt.save("3", toy_state())
