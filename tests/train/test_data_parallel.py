"""ABSignSGD-MV: data-parallel majority vote on simulated devices.

Multi-device checks run in subprocesses, because the CPU device count must be set
before JAX is imported and other tests in this pytest process import JAX first:

* ``tests/train/_dp_worker.py`` on 8 simulated CPU devices: the votes against an
  8-worker simulation (ties and exact zeros included), ``mean``, the non-finite
  skip, a batch that does not divide over the devices, and the bytes per step read
  from the compiled HLO;
* ``examples/multiprocess_launch.py``: 2 processes joined by ``jax.distributed``
  on 127.0.0.1, each training on its own shard, must end with identical parameters.

Both subprocesses start together (session fixtures in ``conftest.py``, shared with
``test_sharding.py``) so that they overlap on a multi-core machine. The in-process
tests below use one device.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from absign_jax.train import data_parallel as dist

from tests.train.conftest import TIMEOUT_S


def _ok(checks, name):
  assert name in checks, f"check {name} did not run: {sorted(checks)}"
  r = checks[name]
  assert r["ok"], json.dumps(r, indent=1)
  return r


@pytest.mark.parametrize("aggregation", ["majority", "majority_1bit"])
@pytest.mark.parametrize("zeros", ["nozeros", "zeros"])
def test_vote_equals_simulated_workers_bit_for_bit(checks, aggregation, zeros):
  """Rows A,A,A,-A,-A,-A,B,C on 8 workers: exact ties, and (``zeros``) exact zeros."""
  r = _ok(checks, f"toy_{aggregation}_{zeros}")
  assert len(r["steps"]) == 3
  assert {s["block"] for s in r["steps"]} == {1, 2}  # depth-biased: 2, 1, 2
  for s in r["steps"]:
    assert s["bit_equal"] and s["replicated"]
    assert 0 < s["ties"] < s["size"]  # ties really happened, and not everywhere


def test_1bit_vote_on_small_lm_matches_per_worker_grads(checks):
  """Partial backprop of a small language model on 8 shards vs. per-shard jax.grad."""
  r = _ok(checks, "lm_majority_1bit")
  (s,) = r["steps"]
  assert s["bit_equal"] and s["replicated"] and s["block"] == 3
  assert 0 < s["ties"] < s["size"]


def test_vote_over_one_axis_of_a_2d_mesh(checks):
  """Mesh (data=4, model=2): 4 voters, parameters identical on all 8 devices."""
  r = _ok(checks, "toy_2d_mesh_majority_1bit")
  assert all(s["bit_equal"] and s["replicated"] for s in r["steps"])


def test_mean_is_sign_of_mean_gradient(checks):
  _ok(checks, "toy_mean")


@pytest.mark.parametrize("aggregation", dist.AGGREGATIONS)
def test_nonfinite_on_one_worker_skips_everywhere(checks, aggregation):
  _ok(checks, f"nonfinite_{aggregation}")


def test_batch_of_5_rows_on_8_devices_is_refused_before_compiling(checks):
  r = _ok(checks, "indivisible_batch")
  assert "5 rows" in r["error"] and "8 data-parallel devices" in r["error"]
  assert "multiple of 8" in r["error"] and r["compiled_programs"] == 0


def test_1bit_bytes_at_least_30n_below_adamw(checks):
  """1 bit of one block vs 32 bits of all blocks (>= 30 N measured)."""
  r = _ok(checks, "comm_bytes")
  n_blocks, block, params = r["num_blocks"], r["block_params"], r["params"]
  one_bit, adamw = r["majority_1bit"], r["adamw"]
  # The parser sees every gradient in AdamW's all-reduce (plus the loss) ...
  assert adamw["all-reduce"] >= 4 * params
  assert adamw["all-gather"] == 0
  # ... and exactly the packed block (+1 flag byte) in the vote's all-gather; the
  # only other collective is 3 float32 statistics (loss, finite flag, grad norm).
  assert one_bit["all-gather"] == -(-block // 8) + 1
  assert one_bit["all-reduce"] == 12
  assert one_bit["conditional"] == -(-block // 8)  # the zero mask, only if needed
  assert adamw["total"] >= 30 * n_blocks * one_bit["total"], (adamw, one_bit)


def test_two_processes_end_with_identical_params(launch):
  p = launch
  try:
    out, _ = p.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    p.kill()
    out, _ = p.communicate()
    pytest.fail(f"2-process launch timed out:\n{out[-3000:]}")
  assert p.returncode == 0, out[-4000:]
  sums = [line.split("checksum ")[1].split()[0] for line in out.splitlines()
          if line.startswith("process ") and "checksum " in line]
  assert len(sums) == 2 and sums[0] == sums[1], out[-4000:]
  assert out.count("local_replicas_agree True") == 2
  assert "step 1:" in out and "skipped 0" in out


# -- in process, one device -------------------------------------------------------

def test_aggregation_name_is_checked():
  import jax
  import absign_jax
  mesh = dist.data_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="aggregation"):
    dist.data_parallel_block_step(lambda p, x: 0.0, absign_jax.absignsgd(0.1), mesh,
                                  aggregation="median")
  with pytest.raises(ValueError, match="axis"):
    dist.data_parallel_block_step(lambda p, x: 0.0, absign_jax.absignsgd(0.1), mesh,
                                  axis="batch")


@pytest.mark.parametrize("aggregation", dist.AGGREGATIONS)
def test_one_device_equals_block_train_step(aggregation):
  """With one worker every aggregation is sign(g): the plain step's result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import absign_jax
  rng = np.random.default_rng(0)
  params = {"layers": [{"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
                       for _ in range(3)]}
  loss = lambda p, x: sum(jnp.mean(jnp.tanh(x @ l["w"])) for l in p["layers"])
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  tx = absign_jax.absignsgd(0.01, weight_decay=0.1)
  mesh = dist.data_mesh(devices=jax.devices()[:1])
  plain = absign_jax.BlockTrainStep(loss, tx, donate=False)
  want = plain(plain.init(params), x)
  step = dist.data_parallel_block_step(loss, tx, mesh, aggregation=aggregation,
                                       donate=False)
  got = step(step.init(params), x)
  assert isinstance(step, absign_jax.BlockTrainStep)
  for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(got[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(got[1]["loss"]) == pytest.approx(float(want[1]["loss"]))


def test_full_step_on_one_device_equals_full_train_step():
  """The data-parallel baseline with one worker: the plain full step's result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import absign_jax
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)}
  loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"]))
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  tx = optax.adamw(1e-2)
  mesh = dist.data_mesh(devices=jax.devices()[:1])
  plain = absign_jax.FullTrainStep(loss, tx, donate=False)
  step = dist.data_parallel_full_step(loss, tx, mesh, donate=False)
  want, got = plain(plain.init(params), x), step(step.init(params), x)
  for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(got[0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(got[1]["skipped"]) == 0


def test_batch_that_does_not_divide_over_the_devices_is_a_clear_error():
  """Checked before anything compiles: the message names sizes and the fix."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import absign_jax
  from jax.sharding import Mesh

  # A mesh of 3 workers needs 3 devices; the placement check needs only its shape.
  class FakeMesh:
    axis_names = ("data",)
    shape = {"data": 3}

  placement = dist.DataParallel(FakeMesh(), "data")
  with pytest.raises(ValueError, match=r"5 rows .* 3 data-parallel devices .* "
                                       r"multiple of 3 \(e\.g\. 6\)"):
    placement.place_batch({"x": np.zeros((5, 2))})
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  step = dist.data_parallel_block_step(lambda p, x: jnp.sum(x),
                                       absign_jax.absignsgd(0.1), mesh)
  assert step.placement.num_workers == 1
  with pytest.raises(ValueError, match="no rows"):  # a scalar cannot be split
    step.placement.place_batch(jnp.float32(1.0))
