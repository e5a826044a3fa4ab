"""Subprocess side of tests/train/test_data_parallel.py: checks on 8 simulated CPU devices.

Run as ``python tests/train/_dp_worker.py [CHECK ...]``; the device count must be set
before JAX is imported, which is why this runs in its own process. Every check prints
one JSON line ``{"check": name, "ok": bool, ...details}``; the exit status is 0 even
when a check fails (the test reads the lines).

The reference for every vote is a single-process simulation of the 8 workers: each
worker's block gradient from plain ``jax.grad`` of the loss on its own shard, signs
summed in NumPy, ties -> 0; an exact zero gradient casts no vote (``sign(0) = 0``),
the rule both ``majority`` and ``majority_1bit`` implement.
"""

from __future__ import annotations

import os
import sys

NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={NUM_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

# The repository root: the package and tests.models.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import absign_jax  # noqa: E402
from absign_jax.train import data_parallel as dist  # noqa: E402
from absign_jax.blocks import partition as partition_lib  # noqa: E402
from absign_jax.profiling import (  # noqa: E402
    collective_bytes, collective_bytes_by_axis, per_device_bytes)

LR = 2.0 ** -4  # a power of two: p - LR * vote rounds once, as in NumPy float32


def emit(check: str, ok: bool, **detail) -> None:
  print(json.dumps({"check": check, "ok": bool(ok), **detail}), flush=True)


def replicas_identical(tree) -> bool:
  """Every device holds bit-identical copies of every leaf."""
  for x in jax.tree.leaves(tree):
    shards = [np.asarray(s.data) for s in x.addressable_shards]
    if len(shards) != NUM_DEVICES:
      return False
    if any(s.tobytes() != shards[0].tobytes() for s in shards[1:]):
      return False
  return True


def host(tree):
  return jax.tree.map(lambda x: np.asarray(x), tree)


_GRADS = {}


def _block_grad_fn(loss_fn, wrt):
  """``(params, batch, block) -> the block's gradient leaves``, jitted, one device.

  ``wrt="full"``: ``jax.grad`` with respect to every parameter, then the block's
  leaves are picked. ``wrt="block"``: ``jax.grad`` with respect to the block's leaves
  only (everything else a constant: the same function the step differentiates). The
  two are the same math but different programs, so float rounding may differ in the
  last bit, which can flip the sign of a gradient coordinate that is ~0.
  """
  if (loss_fn, wrt) not in _GRADS:
    def grad(params, batch, block):
      spec = absign_jax.block_spec(params)
      flat, treedef = jax.tree.flatten(params)
      if wrt == "full":
        return partition_lib.gather_block(
            spec, jax.tree.leaves(jax.grad(loss_fn)(params, batch)), block)

      def block_loss(block_leaves):
        leaves = partition_lib.scatter_block(spec, flat, block, block_leaves)
        return loss_fn(jax.tree.unflatten(treedef, leaves), batch)
      return jax.grad(block_loss)(partition_lib.gather_block(spec, flat, block))
    _GRADS[loss_fn, wrt] = jax.jit(grad, static_argnums=2)
  return _GRADS[loss_fn, wrt]


def simulate_vote(loss_fn, params, shards, block, wrt="full"):
  """The 8-worker reference: per-shard jax.grad, signs summed in NumPy, ties -> 0."""
  grad = _block_grad_fn(loss_fn, wrt)
  total, per_worker = None, []
  for shard in shards:
    g = [np.asarray(x, np.float32) for x in grad(params, shard, block)]
    per_worker.append(g)
    s = [np.sign(x).astype(np.int64) for x in g]
    total = s if total is None else [a + b for a, b in zip(total, s)]
  return [np.sign(t).astype(np.float32) for t in total], per_worker


_STEPS = {}


def get_step(loss_fn, aggregation, mesh=None, **kw):
  """One step object (and its compiled programs) per loss, aggregation and mesh."""
  mesh = dist.data_mesh() if mesh is None else mesh
  key = (loss_fn, aggregation, mesh)
  if key not in _STEPS:
    tx = absign_jax.absignsgd(LR)
    _STEPS[key] = (tx, dist.data_parallel_block_step(
        loss_fn, tx, mesh, aggregation=aggregation, donate=False, **kw))
  return _STEPS[key]


def expected_params(params, block, vote):
  """``p - LR * vote`` on the block's leaves (weight decay 0), in float32."""
  spec = absign_jax.block_spec(params)
  leaves, treedef = jax.tree.flatten(host(params))
  leaves = list(leaves)
  for (i, s), v in zip(spec.members[block], vote):
    new = (leaves[i] if s is None else leaves[i][s]) + np.float32(-LR) * v
    if s is None:
      leaves[i] = new.astype(np.float32)
    else:
      leaves[i] = leaves[i].copy()
      leaves[i][s] = new
  return jax.tree.unflatten(treedef, leaves)


def bit_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
  return len(la) == len(lb) and all(
      x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def run_and_compare(name, loss_fn, params, batches, aggregation, wrt="full",
                    **step_kw):
  """Trains ``len(batches)`` steps and compares each with the simulated vote."""
  tx, step = get_step(loss_fn, aggregation, **step_kw)
  workers = step.placement.num_workers
  state = step.init(params)
  p, s = state.params, state.opt_state
  ok, details = True, []
  for batch in batches:
    b = int(absign_jax.active_block(s))
    shards = [jax.tree.map(lambda x: x[k:k + 1], batch) for k in range(workers)]
    vote, _ = simulate_vote(loss_fn, host(p), shards, b, wrt)
    want = expected_params(p, b, vote)
    state, m = step(state, batch)
    p, s = state.params, state.opt_state
    same = bit_equal(p, want)
    replicated = replicas_identical(p) and replicas_identical(s)
    ok &= same and replicated and int(m["skipped"]) == 0
    details.append({"block": b, "bit_equal": same, "replicated": replicated,
                    "ties": int(sum(np.sum(v == 0) for v in vote)),
                    "size": int(sum(v.size for v in vote))})
  emit(name, ok, steps=details)
  return p, s


# -- a toy model whose gradients are linear in the data: exact ties by construction --

D = 37  # not a multiple of 8: the 1-bit packing pads


def toy_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"layers": [{"w": jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
                      * rng.choice([-1, 1], D),
                      "v": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
                     for _ in range(3)]}


def toy_loss(p, x):
  h = x
  for layer in p["layers"]:
    h = h * layer["w"]
  out = jnp.sum(h, -1)
  for layer in p["layers"]:
    out = out + jnp.sum(layer["v"].reshape(-1) * x[:, :6], -1)
  return jnp.mean(out)


def toy_batch(seed, zeros: bool):
  """Rows A, A, A, -A, -A, -A, B, C: ties wherever sign(B) != sign(C).

  With ``zeros``, some coordinates of A are exactly 0 (six workers cast no vote
  there) and C is -B on half the coordinates and exactly 0 on the rest (worker 7
  casts no vote there; the vote is B's sign).
  """
  rng = np.random.default_rng(seed)
  a, b, c = (rng.normal(size=D).astype(np.float32) for _ in range(3))
  if zeros:
    a[rng.random(D) < 0.3] = 0
    c = np.where(rng.random(D) < 0.5, -b, 0).astype(np.float32)
  return np.stack([a, a, a, -a, -a, -a, b, c])


def check_toy_votes():
  params = toy_params()
  for aggregation in ("majority", "majority_1bit"):
    for zeros in (False, True):
      batches = [toy_batch(10 * k + zeros, zeros) for k in range(3)]
      run_and_compare(f"toy_{aggregation}_{'zeros' if zeros else 'nozeros'}",
                      toy_loss, params, batches, aggregation)


def check_toy_2d_mesh():
  """A (data=4, model=2) mesh: 4 workers vote, each pair of devices computes alike."""
  from jax.sharding import Mesh
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  batches = [toy_batch(7 + k, zeros=True)[[0, 3, 6, 7]] for k in range(2)]
  run_and_compare("toy_2d_mesh_majority_1bit", toy_loss, toy_params(), batches,
                  "majority_1bit", mesh=mesh)


def check_toy_mean():
  params = toy_params()
  tx, step = get_step(toy_loss, "mean")
  s = tx.init(params)
  batch = toy_batch(5, zeros=False)
  b = int(absign_jax.active_block(s))
  shards = [batch[k:k + 1] for k in range(NUM_DEVICES)]
  _, grads = simulate_vote(toy_loss, host(params), shards, b)
  mean = [np.mean([np.float64(g[k]) for g in grads], axis=0)
          for k in range(len(grads[0]))]
  p = step(step.init(params, s), batch)[0].params
  spec = absign_jax.block_spec(params)
  moved = partition_lib.gather_block(spec, jax.tree.leaves(host(p)), b)
  before = partition_lib.gather_block(spec, jax.tree.leaves(host(params)), b)
  ok = replicas_identical(p)
  for new, old, mu in zip(moved, before, mean):
    step_sign = np.sign(old - new)  # p - lr * sign(mean)
    clear = np.abs(mu) > 1e-5 * np.max(np.abs(mu))  # rounding cannot flip these
    ok &= bool(np.all(step_sign[clear] == np.sign(mu[clear])))
  emit("toy_mean", ok)


def check_nonfinite_skip():
  params = toy_params()
  for aggregation in dist.AGGREGATIONS:
    tx, step = get_step(toy_loss, aggregation)
    s = tx.init(params)
    batch = toy_batch(1, zeros=False)
    batch[5, 3] = np.inf  # one worker's gradient is not finite
    out, m = step(step.init(params, s), batch)
    ok = (bit_equal(out.params, params) and int(m["skipped"]) == 1
          and int(absign_jax.active_block(out.opt_state)) == int(absign_jax.active_block(s)))
    emit(f"nonfinite_{aggregation}", ok)


def check_indivisible_batch():
  """A global batch of 5 rows on 8 devices: a clear error before anything compiles."""
  tx, step = get_step(toy_loss, "majority")
  fresh = dist.data_parallel_block_step(toy_loss, tx, dist.data_mesh(), donate=False)
  try:
    fresh(fresh.init(toy_params()), toy_batch(3, zeros=False)[:5])
  except ValueError as e:
    emit("indivisible_batch", True, error=str(e), compiled_programs=fresh.compiled_programs)
  else:
    emit("indivisible_batch", False, error="no error")


# -- a small language model: partial backprop on the shards, votes vs. plain jax.grad --


def small_lm():
  from flax import nnx

  from tests.models import Config, TinyLM
  cfg = Config()
  return absign_jax.split_nnx(TinyLM(cfg, rngs=nnx.Rngs(0))), cfg


def lm_batch(cfg, seed, rows=NUM_DEVICES, seq=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab, (rows, seq + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((rows, seq), np.float32)}


def check_lm():
  """Small LM: the 1-bit vote vs. plain jax.grad, then bytes per step from the HLO.

  The compiled per-block program that ran is the one measured (``lower`` hits the
  compilation cache), against a data-parallel AdamW step of the same model.
  """
  parts, cfg = small_lm()
  params = parts.params
  batch = lm_batch(cfg, 0)
  run_and_compare("lm_majority_1bit", parts.loss_fn, params, [batch],
                  "majority_1bit", wrt="block", dispatch="per_block")
  tx, step = get_step(parts.loss_fn, "majority_1bit")
  mesh = dist.data_mesh()
  spec = absign_jax.block_spec(params)
  out = {"num_blocks": spec.num_blocks,
         "block_params": spec.block_sizes(jax.tree.leaves(params))[0],
         "params": sum(int(np.size(x)) for x in jax.tree.leaves(params))}
  out["majority_1bit"] = collective_bytes(step.lower(step.init(params), batch).compile())
  adamw = optax.adamw(1e-3)
  full = dist.data_parallel_full_step(parts.loss_fn, adamw, mesh, donate=False)
  out["adamw"] = collective_bytes(full.lower(full.init(params), batch).compile())
  emit("comm_bytes", True, **out)


# -- parameters sharded over (data, fsdp) meshes ---------------------------------------

FSDP_MESHES = ("data=8", "data=4,fsdp=2", "data=2,fsdp=4", "data=1,fsdp=8")
_FSDP_STEPS = {}


def fsdp_lm():
  """A 2-layer small LM (every leaf divides by 8): the sharded checks compile less."""
  from flax import nnx

  from tests.models import Config, TinyLM
  cfg = Config(n_layers=2)
  return absign_jax.split_nnx(TinyLM(cfg, rngs=nnx.Rngs(0))), cfg


def check_fsdp_meshes():
  """Every mesh shape: the step equals the simulated vote of its ``data`` workers bit
  for bit, and each device holds exactly 1/fsdp of the parameters' bytes."""
  from absign_jax.train import sharding
  parts, cfg = fsdp_lm()
  params = parts.params
  total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  for shape in FSDP_MESHES:
    mesh = sharding.make_mesh(shape)
    workers, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    rows = NUM_DEVICES // workers
    step = sharding.sharded_block_step(parts.loss_fn, absign_jax.absignsgd(LR), mesh,
                                       aggregation="majority_1bit", donate=False,
                                       dispatch="per_block")
    _FSDP_STEPS[shape] = step, parts, cfg  # the bytes check reads its compiled program
    state = step.init(params)
    p, details, ok = host(params), [], True
    for k in range(1):
      batch = lm_batch(cfg, 100 + k)
      b = int(absign_jax.active_block(state.opt_state))
      shards = [jax.tree.map(lambda x: x[w * rows:(w + 1) * rows], batch)
                for w in range(workers)]
      vote, _ = simulate_vote(parts.loss_fn, p, shards, b, wrt="block")
      want = expected_params(p, b, vote)
      state, m = step(state, batch)
      p = host(state.params)
      per_device = per_device_bytes(state.params)
      same = bit_equal(p, want)
      ok &= same and int(m["skipped"]) == 0
      details.append({"block": b, "bit_equal": same})
    bytes_ok = (len(per_device) == NUM_DEVICES
                and set(per_device.values()) == {total // fsdp} and total % fsdp == 0)
    emit(f"fsdp_{shape}", ok and bytes_ok, steps=details, total_bytes=total,
         per_device_bytes=sorted(set(per_device.values())), fsdp=fsdp)


def check_fsdp_comm_bytes():
  """Collective bytes per step on data=2,fsdp=4, per mesh axis, beside AdamW."""
  from absign_jax.train import sharding
  step, parts, cfg = _FSDP_STEPS["data=2,fsdp=4"]
  params, batch = parts.params, lm_batch(cfg, 100)
  mesh = step.placement.mesh
  spec = absign_jax.block_spec(params)
  out = {"block_params": spec.block_sizes(jax.tree.leaves(params))[spec.num_blocks - 1],
         "params": sum(int(np.size(x)) for x in jax.tree.leaves(params))}
  keep = ("all-reduce", "all-gather", "reduce-scatter", "total", "conditional", "wire")
  for agg in ("majority_1bit", "majority"):
    if agg == "majority":
      step = sharding.sharded_block_step(parts.loss_fn, absign_jax.absignsgd(LR), mesh,
                                         aggregation=agg, donate=False,
                                         dispatch="per_block")
    axes = collective_bytes_by_axis(
        step.lower(step.init(params), batch).compile(), mesh)
    out[agg] = {a: {k: v[k] for k in keep} for a, v in axes.items()}
  # The int8 majority on fsdp slices: the simulated vote of the 2 workers, bit for bit.
  b = int(absign_jax.active_block(step.init(params).opt_state))
  vote, _ = simulate_vote(parts.loss_fn, host(params), [
      jax.tree.map(lambda x: x[:4], batch), jax.tree.map(lambda x: x[4:], batch)], b,
      wrt="block")
  out["majority_bit_equal"] = bit_equal(step(step.init(params), batch)[0].params,
                                        expected_params(host(params), b, vote))
  full = sharding.sharded_full_step(parts.loss_fn, optax.adamw(1e-3), mesh,
                                    donate=False)
  state = full.init(params)
  axes = collective_bytes_by_axis(full.lower(state, batch).compile(), mesh)
  out["adamw"] = {a: {k: v[k] for k in keep} for a, v in axes.items()}
  # AdamW on the shardings vs. one device (the mean gradient's sums run in another
  # order, so to float32 rounding: a sign flip of a ~0 gradient moves a weight 2 lr).
  one = absign_jax.FullTrainStep(parts.loss_fn, optax.adamw(1e-3), donate=False)
  got = jax.tree.leaves(host(full(state, batch)[0].params))
  want = jax.tree.leaves(host(one(one.init(params), batch)[0].params))
  out["adamw_max_abs_diff"] = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x)]
  out["adamw_state_bytes"] = sum(x.nbytes for x in moments)
  out["adamw_state_bytes_per_device"] = sorted(
      set(per_device_bytes(moments).values()))
  emit("fsdp_comm_bytes", out["majority_bit_equal"] and out["adamw_max_abs_diff"] < 1e-5,
       **out)


def check_fsdp_checkpoint():
  """A sharded state saved on data=2,fsdp=4 restores onto (4, 2) and (8, 1) meshes."""
  import tempfile

  from absign_jax.train import checkpoint, sharding
  parts, cfg = fsdp_lm()
  params = parts.params
  tx = optax.chain(absign_jax.block_adam(1e-3))
  saved_on = sharding.sharded_block_step(parts.loss_fn, tx, sharding.make_mesh(
      "data=2,fsdp=4"), aggregation="mean", donate=False)
  state, _ = saved_on(saved_on.init(params), lm_batch(cfg, 3))
  ok, details = True, {}
  with tempfile.TemporaryDirectory() as d:
    with checkpoint.Checkpointer(d, async_save=False) as ckpt:
      ckpt.save(1, state)
      for shape in ("data=4,fsdp=2", "data=8"):
        mesh = sharding.make_mesh(shape)
        target_step = sharding.sharded_block_step(parts.loss_fn, tx, mesh,
                                                  aggregation="mean", donate=False)
        target = target_step.init(params)
        restored = ckpt.restore(1, target).state
        same = bit_equal(restored, state)
        placed = all(r.sharding == t.sharding for r, t in
                     zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
        fsdp = mesh.shape["fsdp"]
        moments = [x for x in jax.tree.leaves(restored.opt_state) if np.ndim(x) == 2]
        sliced = all(s.data.size * fsdp == x.size for x in moments
                     for s in x.addressable_shards)
        ok &= same and placed and sliced and bool(moments)
        details[shape] = {"bit_equal": same, "target_shardings": placed,
                          "moments_sliced": sliced}
  emit("fsdp_checkpoint", ok, **details)


def check_fsdp_indivisible_batch():
  """A batch of 4 rows on data=2,fsdp=4: a clear error before anything compiles."""
  from absign_jax.train import sharding
  parts, cfg = fsdp_lm()
  step = sharding.sharded_block_step(parts.loss_fn, absign_jax.absignsgd(LR),
                                     sharding.make_mesh("data=2,fsdp=4"), donate=False)
  try:
    step(step.init(parts.params), lm_batch(cfg, 0, rows=4))
  except ValueError as e:
    emit("fsdp_indivisible_batch", step.compiled_programs == 0, error=str(e))
  else:
    emit("fsdp_indivisible_batch", False, error="no error")


CHECKS = {
    "toy_votes": check_toy_votes,
    "toy_2d_mesh": check_toy_2d_mesh,
    "toy_mean": check_toy_mean,
    "nonfinite": check_nonfinite_skip,
    "indivisible_batch": check_indivisible_batch,
    "lm": check_lm,
    "fsdp_meshes": check_fsdp_meshes,
    "fsdp_comm_bytes": check_fsdp_comm_bytes,
    "fsdp_checkpoint": check_fsdp_checkpoint,
    "fsdp_indivisible_batch": check_fsdp_indivisible_batch,
}


def main(argv):
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  for name in argv or list(CHECKS):
    t0, c0 = time.time(), time.process_time()
    try:
      CHECKS[name]()
    except Exception:  # reported, so that the other checks still run
      emit(name, False, error=traceback.format_exc())
    print(f"# {name}: {time.time() - t0:.1f}s wall, {time.process_time() - c0:.1f}s cpu",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
