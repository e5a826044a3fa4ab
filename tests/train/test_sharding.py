"""Parameters sharded over a ``(data, fsdp)`` mesh under the block step.

The multi-device checks run in the 8-device worker subprocess shared with
``test_data_parallel.py`` (``conftest.py``); the fine-tuning program runs on a tiny
model in 1 process with 2 devices and in 2 processes over loopback. The in-process
tests below (mesh syntax, shardings, rules) need no devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from absign_jax.train import sharding
from tests.train.conftest import ROOT, SUBPROCESS_XLA, TIMEOUT_S, subprocess_env


def _ok(checks, name):
  assert name in checks, f"check {name} did not run: {sorted(checks)}"
  r = checks[name]
  assert r["ok"], json.dumps(r, indent=1)
  return r


# -- on 8 simulated devices -------------------------------------------------------------


@pytest.mark.parametrize("shape, fsdp", [("data=8", 1), ("data=4,fsdp=2", 2),
                                         ("data=2,fsdp=4", 4), ("data=1,fsdp=8", 8)])
def test_every_mesh_shape_equals_the_simulated_vote_bit_for_bit(checks, shape, fsdp):
  """The 1-bit vote of the ``data`` workers (each on its rows, reduced over its fsdp
  devices) equals per-worker jax.grad on one device, and each device holds exactly
  1/fsdp of the parameters' bytes (read from the arrays' shardings)."""
  r = _ok(checks, f"fsdp_{shape}")
  assert all(s["bit_equal"] for s in r["steps"])
  assert r["fsdp"] == fsdp
  assert r["per_device_bytes"] == [r["total_bytes"] // fsdp]


def test_collective_bytes_split_into_gathers_and_votes(checks):
  """data=2,fsdp=4: the vote moves each device's 1/4 slice of the block over ``data``
  (int8 signs, or 1 bit), the gathers run over ``fsdp`` only; AdamW on the same
  shardings all-reduces every gradient slice in float32 over ``data``."""
  r = _ok(checks, "fsdp_comm_bytes")
  block, params = r["block_params"], r["params"]
  majority, one_bit, adamw = r["majority"], r["majority_1bit"], r["adamw"]
  assert set(majority) == {"data", "fsdp"}  # nothing spans the whole mesh
  # majority: int8 signs of this device's slice + 3 float32 statistics.
  assert majority["data"]["all-reduce"] == block // 4 + 12
  assert majority["data"]["all-gather"] == 0
  # 1 bit: the packed slice + a flag byte; the zero mask only when a zero occurs.
  assert one_bit["data"]["all-gather"] == -(-block // 4 // 8) + 1
  assert one_bit["data"]["all-reduce"] == 12
  assert one_bit["data"]["conditional"] == -(-block // 4 // 8)
  # Parameters are gathered over fsdp (the active block and the frozen layers it
  # needs), never over data.
  assert one_bit["fsdp"]["all-gather"] > 0
  assert adamw["data"]["all-reduce"] >= 4 * params // 4
  assert adamw["data"]["total"] >= 30 * (params // block) * one_bit["data"]["total"] // 4
  assert r["adamw_state_bytes_per_device"] == [r["adamw_state_bytes"] // 4]


def test_int8_majority_and_adamw_on_fsdp_slices_equal_one_device(checks):
  """data=2,fsdp=4: the int8 vote on slices equals the simulated 2-worker vote bit for
  bit; AdamW on the same shardings equals AdamW on one device to float32 rounding."""
  r = _ok(checks, "fsdp_comm_bytes")
  assert r["majority_bit_equal"]
  assert r["adamw_max_abs_diff"] < 1e-5


def test_sharded_checkpoint_restores_onto_other_mesh_shapes(checks):
  r = _ok(checks, "fsdp_checkpoint")
  for shape in ("data=4,fsdp=2", "data=8"):
    assert r[shape] == {"bit_equal": True, "target_shardings": True,
                        "moments_sliced": True}


def test_batch_that_does_not_divide_over_data_times_fsdp_is_refused(checks):
  r = _ok(checks, "fsdp_indivisible_batch")
  assert "4 rows" in r["error"] and "2 x 4 devices" in r["error"]
  assert "multiple of 8" in r["error"]


# -- the program: 2 processes over loopback against 1 process ------------------------


@pytest.fixture(scope="module")
def program_runs(tmp_path_factory):
  """The tiny model trained 2 steps with --mesh data=2: one process with two devices,
  and two processes with one device each joined over 127.0.0.1."""
  import socket

  from absign_jax.llm import data
  from tests.llm._tiny_program import write_tiny_gguf

  d = tmp_path_factory.mktemp("mesh_program")
  write_tiny_gguf(d / "tiny.gguf")
  (d / "notes.txt").write_text(data.second_text()[:3000], encoding="utf-8")
  common = ["-m", "absign_jax.llm", "--model", str(d / "tiny.gguf"), "--data",
            str(d / "notes.txt"), "--batch", "4", "--seq", "16", "--steps", "2",
            "--eval-every", "0", "--eval-seqs", "2", "--no-progress", "--mesh", "data=2"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run = lambda extra, env: subprocess.Popen(
      [sys.executable, *common, *extra], cwd=ROOT, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  started = {
      "one": run(["--out", str(d / "one")], subprocess_env(
          XLA_FLAGS="--xla_force_host_platform_device_count=2 " + SUBPROCESS_XLA)),
      **{f"two_{k}": run(["--out", str(d / "two"), "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(k)],
                         subprocess_env())
         for k in range(2)}}
  logs = {}
  try:
    for name, p in started.items():
      logs[name] = p.communicate(timeout=TIMEOUT_S)[0]
      assert p.returncode == 0, f"{name}:\n{logs[name][-4000:]}"
  finally:
    for p in started.values():
      if p.poll() is None:
        p.kill()
        p.communicate()
  summaries = {name: json.loads((d / path / "summary.json").read_text())
               for name, path in (("one", "one"), ("two", "two"),
                                  ("two_1", "two/process_1"))}
  return summaries, logs, d


def test_two_processes_end_with_the_parameters_of_one(program_runs):
  summaries, logs, d = program_runs
  one, two, other = summaries["one"], summaries["two"], summaries["two_1"]
  assert one["processes"] == 1 and two["processes"] == 2
  assert one["mesh"] == two["mesh"] == {"data": 2, "fsdp": 1}
  assert one["params_sha256"] == two["params_sha256"] == other["params_sha256"]
  losses = lambda path: [json.loads(l)["loss"] for l in
                         (d / path / "metrics.jsonl").read_text().splitlines()]
  assert losses("one") == losses("two") and len(losses("one")) == 2
  # The parameters moved: the digest differs from the untrained model's.
  assert one["ppl_after"] != one["ppl_before"]
  assert os.path.isdir(d / "two" / "checkpoints" / "2")


# -- in process: mesh syntax, shardings, rules ---------------------------------------


def test_parse_mesh():
  assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1}
  assert sharding.parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
  assert sharding.parse_mesh("fsdp=4", 4) == {"data": 1, "fsdp": 4}
  assert sharding.parse_mesh("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize("text, message", [
    ("data=2,fsdp=2", "has 4 devices but there are 8: the axis sizes must multiply"),
    ("data=2,model=4", "unknown mesh axis 'model': the axes are 'data', 'fsdp'"),
    ("data:2", "is not AXIS=SIZE"),
    ("data=0,fsdp=8", "at least 1"),
    ("data=2,data=4", "names axis 'data' twice"),
    ("data=3,fsdp=-1", "no whole number of devices"),
])
def test_bad_mesh_is_a_clear_error(text, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    sharding.parse_mesh(text, 8)


def test_infer_spec_takes_the_largest_divisible_dimension():
  assert sharding.infer_spec((64, 256), 4) == P(None, "fsdp")
  assert sharding.infer_spec((256, 64), 4) == P("fsdp")
  assert sharding.infer_spec((49, 6), 4) == P()  # nothing divides: replicated
  assert sharding.infer_spec((30, 8), 4) == P(None, "fsdp")  # 30 does not divide
  assert sharding.infer_spec((64, 64), 4) == P("fsdp")  # ties: the first
  assert sharding.infer_spec((64,), 1) == P()
  assert sharding.infer_spec((), 4) == P()


class _FakeMesh:
  axis_names = ("data", "fsdp")
  shape = {"data": 2, "fsdp": 4}


def test_rules_override_the_inferred_spec_by_path():
  params = {"embed": np.zeros((48, 16)), "layers": [{"w": np.zeros((16, 64))}],
            "norm": np.zeros((6,))}
  specs = sharding.param_specs(params, _FakeMesh(), rules=[(r"embed", P(None, "fsdp")),
                                                          (r"layers/\d+/w", P())])
  assert specs["embed"] == P(None, "fsdp")  # inferred would be dim 0 (48)
  assert specs["layers"][0]["w"] == P()
  assert specs["norm"] == P()
  assert sharding.param_specs(params, _FakeMesh())["embed"] == P("fsdp")


@pytest.mark.parametrize("rule, message", [
    (P("data"), "names axis 'data': parameters are sharded over 'fsdp' only"),
    (P("model"), "names axis 'model', which is not a mesh axis"),
    (P(None, None, "fsdp"), "more entries than the leaf has dimensions"),
    (P(None, "fsdp"), "splits dimension 1 of \\(48, 6\\) over 4 devices"),
])
def test_bad_rule_is_a_clear_error(rule, message):
  with pytest.raises(ValueError, match=message):
    sharding.param_specs({"embed": np.zeros((48, 6))}, _FakeMesh(),
                         rules=[("embed", rule)])


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=2,model=4"], "--mesh: unknown mesh axis 'model'"),
    (["--mesh", "data:2"], "is not AXIS=SIZE"),
    (["--num-processes", "2"], "needs --coordinator HOST:PORT and --process-id K"),
    (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"],
     "--process-id must be in [0, 2), got 2"),
])
def test_program_refuses_bad_mesh_and_process_options(argv, message, capsys):
  from absign_jax.llm import finetune

  with pytest.raises(SystemExit) as e:
    finetune.parse_args(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
