"""The partial-backprop training step on a small NNX language model.

Checked against the plain path (full gradients -> ``tx.update`` ->
``optax.apply_updates``): same parameters, same optimizer state, the metrics it
reports, that the compiled program really backpropagates to one block only, that it
never retraces after warm-up, and that a non-finite step changes nothing.

The parameters are equal bit for bit under XLA's default CPU fusion code generator.
Under the older one (``--xla_cpu_use_fusion_emitters=false``) a few entries of the
update round differently between the two programs (by 1.5e-8 at lr 1e-2).

Compilation dominates the run time of this file, so the compiled steps are shared
between tests (module-scoped fixtures) and every step uses ``donate=False`` (the
inputs are compared afterwards).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import absign_jax
from tests.models import Config, TinyLM, cut, make_batch

STEPS = 20
LR = 1e-2


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b, what=""):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb), what
  for i, (x, y) in enumerate(zip(la, lb)):
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
    if not np.array_equal(x, y, equal_nan=True):
      bad = int(np.sum(x != y))
      raise AssertionError(f"{what}: leaf {i} differs in {bad}/{x.size} entries, "
                           f"max |diff| {np.nanmax(np.abs(x - y))}")


def counting(loss_fn, counter: collections.Counter, key: str):
  """``loss_fn`` that counts how often it is traced (each call is a trace under jit)."""

  def wrapped(params, batch):
    counter[key] += 1
    return loss_fn(params, batch)

  return wrapped


def block_norms(spec, grads) -> list[float]:
  flat = jax.tree.leaves(grads)
  return [float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                            for g in absign_jax.blocks.partition.gather_block(spec, flat, b))))
          for b in range(spec.num_blocks)]


def plain_runner(loss_fn, tx):
  """The reference: full gradients -> tx.update -> optax.apply_updates (jitted)."""

  @jax.jit
  def plain(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grads

  return plain


def step_once(step, params, opt_state, batch):
  """One step from ``params`` and ``opt_state``: ``(params, opt_state, metrics)``."""
  state, metrics = step(step.init(params, opt_state), batch)
  return state.params, state.opt_state, metrics


def run_pair(step, plain, params, state, batches):
  """Runs the block step and the plain path side by side; records both trajectories."""
  spec = absign_jax.find_state(state).partition.spec(params)
  rec = collections.defaultdict(list)
  train = step.init(params, state)
  pp, sp = params, state
  for batch in batches:
    block = int(absign_jax.active_block(train.opt_state))
    train, metrics = step(train, batch)
    pp, sp, loss, grads = plain(pp, sp, batch)
    rec["block"].append(block)
    rec["metrics"].append(jax.device_get(metrics))
    rec["plain_loss"].append(float(loss))
    rec["plain_grad_norm"].append(block_norms(spec, grads)[block])
    rec["block_params"].append(train.params)
    rec["plain_params"].append(pp)
    rec["block_state"].append(train.opt_state)
    rec["plain_state"].append(sp)
  return rec


def hlo_ops(compiled) -> collections.Counter:
  """(op, result shape) counts of dots and scatters in an optimized HLO module."""
  ops = collections.Counter()
  pattern = re.compile(r"=\s*(\w+\[[\d,]*\])\S*\s+(dot|convolution|scatter)\(")
  for line in compiled.as_text().splitlines():
    m = pattern.search(line)
    if m:
      ops[(m.group(2), m.group(1))] += 1
  return ops


def stack_params(list_params, stacked_template):
  """The list-layout parameters in the stacked layout (same weights)."""
  d = list_params.to_pure_dict()
  layers = [d["layers"][i] for i in range(len(d["layers"]))]
  d["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  out = jax.tree.map(lambda x: x, stacked_template)
  out.replace_by_pure_dict(d)
  return out


# ---------------------------------------------------------------------------------
# fixtures: one model and every compiled step, warmed up concurrently
# ---------------------------------------------------------------------------------


def with_active(state, block: int):
  """``state`` with block ``block`` active (to compile its program ahead of time)."""
  return jax.tree.map(
      lambda s: s._replace(active=jnp.asarray(block, jnp.int32))
      if isinstance(s, absign_jax.BlockCoordinateState) else s,
      state, is_leaf=lambda s: isinstance(s, absign_jax.BlockCoordinateState))


@pytest.fixture(scope="module")
def env():
  """The model, its steps and optimizers; every program compiled once, in parallel.

  XLA compiles without holding the GIL, so compiling the ~12 programs of this file
  from a thread pool roughly halves the file's run time on two cores. The warm-up
  runs each program through its public call path (so the dispatch caches the tests
  inspect are the ones that get filled).
  """
  e = types.SimpleNamespace()
  e.cfg = cfg = Config()
  e.parts = parts = absign_jax.split_nnx(TinyLM(cfg, rngs=nnx.Rngs(0)))
  e.spec = absign_jax.block_spec(parts.params)
  e.batches = batches = [make_batch(i, cfg.vocab) for i in range(STEPS + 10)]
  e.traces = collections.Counter()
  e.tx = absign_jax.absignsgd(LR, weight_decay=0.1)
  e.state0 = e.tx.init(parts.params)
  e.step = absign_jax.BlockTrainStep(counting(parts.loss_fn, e.traces, "block"), e.tx,
                                     dispatch="per_block", donate=False)
  e.plain = plain_runner(counting(parts.loss_fn, e.traces, "plain"), e.tx)
  e.switch = absign_jax.BlockTrainStep(parts.loss_fn, e.tx, dispatch="switch",
                                       donate=False)
  # The stacked layout with the same weights.
  e.sparts = sparts = cut(TinyLM(cfg.replace(stacked=True), rngs=nnx.Rngs(1)))
  e.sparams = stack_params(parts.params, sparts.params)
  layered = sparts.layered._replace(
      layer=counting(sparts.layered.layer, e.traces, "stacked_layer"))
  e.stacked = absign_jax.BlockTrainStep(sparts.loss_fn, e.tx, layered=layered,
                                        donate=False)
  e.stacked_loss = jax.jit(sparts.loss_fn)
  # Full backprop (the baseline the FLOPs are compared with).
  e.full_tx = absign_jax.sign_sgd(LR)
  e.full = absign_jax.FullTrainStep(parts.loss_fn, e.full_tx, donate=False)
  # Block Adam, 3 steps per block.
  e.adam_tx = absign_jax.block_adam(1e-3, steps_per_block=3, weight_decay=0.01)
  e.adam_step = absign_jax.BlockTrainStep(parts.loss_fn, e.adam_tx, dispatch="switch",
                                          donate=False)
  e.adam_plain = plain_runner(parts.loss_fn, e.adam_tx)

  p, x = parts.params, batches[0]
  adam_state = e.adam_tx.init(p)
  jobs = [lambda b=b: e.step(e.step.init(p, with_active(e.state0, b)), x)
          for b in range(e.spec.num_blocks)]
  jobs += [
      lambda: e.plain(p, e.state0, x),
      lambda: e.switch(e.switch.init(p, e.state0), x),
      lambda: e.stacked(e.stacked.init(e.sparams), x),
      lambda: e.stacked_loss(e.sparams, x),
      lambda: e.full(e.full.init(p), x),
      lambda: e.adam_step(e.adam_step.init(p, adam_state), x),
      lambda: e.adam_plain(p, adam_state, x),
  ]
  with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
    for out in pool.map(lambda job: job(), jobs):
      jax.block_until_ready(out)
  e.warm_traces = dict(e.traces)
  return e


@pytest.fixture(scope="module")
def per_block_run(env):
  """20 steps of per-block dispatch beside the plain path."""
  return run_pair(env.step, env.plain, env.parts.params, env.state0,
                  env.batches[:STEPS])


# ---------------------------------------------------------------------------------
# same result as the plain path
# ---------------------------------------------------------------------------------


def test_per_block_equals_plain_path_bitwise(env, per_block_run):
  rec, spec = per_block_run, env.spec
  assert sorted(set(rec["block"])) == list(range(spec.num_blocks))
  for k in range(STEPS):
    assert_trees_equal(rec["block_params"][k], rec["plain_params"][k], f"params, step {k}")
    assert_trees_equal(rec["block_state"][k], rec["plain_state"][k], f"state, step {k}")
  # Every block moved; frozen leaves (embedding, final norm, head) did not.
  first, last = leaves(env.parts.params), leaves(rec["block_params"][-1])
  for i, lb in enumerate(spec.leaf_blocks):
    assert np.array_equal(first[i], last[i]) == (lb.block is None), spec.leaf_paths[i]


def test_switch_dispatch_equals_plain_path_bitwise(env, per_block_run):
  rec = per_block_run
  state = env.switch.init(env.parts.params, env.state0)
  for k in range(STEPS):
    state, metrics = env.switch(state, env.batches[k])
    assert int(metrics["block"]) == rec["block"][k]
    assert_trees_equal(state.params, rec["plain_params"][k], f"switch params, step {k}")
    assert_trees_equal(state.opt_state, rec["plain_state"][k], f"switch state, step {k}")
  # One executable holding every block, and no per-block programs.
  assert env.switch.compiled_programs == 1


def test_stacked_dynamic_program_equals_list_layout(env, per_block_run):
  """The stacked layout (LayeredLoss, dynamic block index) against the list layout.

  Bitwise: sign descent only needs the gradient's signs, and the dynamic program's
  gradient of the active layer agrees with the static list-layout program's to float32
  rounding, which does not flip any sign on this trajectory. The loss is equal to
  float32 rounding (the programs are fused differently).
  """
  rec, sparts = per_block_run, env.sparts
  assert sparts.layered is not None
  assert absign_jax.block_spec(env.sparams).stacked_range() == (0, env.cfg.n_layers)
  np.testing.assert_allclose(float(env.stacked_loss(env.sparams, env.batches[0])),
                             rec["plain_loss"][0], rtol=1e-6)
  state = env.stacked.init(env.sparams)
  for k in range(STEPS):
    state, metrics = env.stacked(state, env.batches[k])
    params = state.params
    assert int(metrics["block"]) == rec["block"][k]
    np.testing.assert_allclose(float(metrics["loss"]), rec["plain_loss"][k], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), rec["plain_grad_norm"][k],
                               rtol=1e-5)
    expected = stack_params(rec["plain_params"][k], sparts.params)
    assert_trees_equal(params, expected, f"stacked params, step {k}")
  # One program for every block, traced during warm-up only.
  assert env.traces["stacked_layer"] == env.warm_traces["stacked_layer"]
  assert env.stacked.compiled_programs == 1


def test_stacked_dynamic_program_holds_no_copy_of_the_stack():
  """The dynamic program's temporaries stay far below the stacked weights' bytes.

  Plain autodiff of a scan over the stack saves every layer's weights as residuals:
  temporaries of about two copies of the stack. With it, what remains is the active
  layer's weights, gradient and update and the per-layer inputs.
  """
  cfg = Config(stacked=True, dim=256, hidden=512, n_layers=6)
  parts = cut(nnx.eval_shape(lambda: TinyLM(cfg, rngs=nnx.Rngs(0))))
  tx = absign_jax.absignsgd(1e-3)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        parts.params)
  batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("inputs", "targets")}
  stack = absign_jax.profiling.tree_bytes(params["layers"])
  layer = stack // cfg.n_layers

  def memory(residuals):
    step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                     residuals=residuals)
    state = jax.eval_shape(step.init, params)
    return absign_jax.profiling.program_memory(
        step.lower(state, batch, block=0).compile())

  recompute_all, keep_all = memory(0), memory(cfg.n_layers - 1)
  assert recompute_all["temp"] < 4 * layer < stack, (recompute_all, layer, stack)
  assert recompute_all["alias"] >= absign_jax.profiling.tree_bytes(params)  # in place
  # Kept layers hold their activations (tiny at 2 x 16 tokens), never their weights:
  # five kept layers add less than one layer's bytes.
  grown = keep_all["temp"] - recompute_all["temp"]
  assert 0 < grown < layer, (grown, layer)


# ---------------------------------------------------------------------------------
# partial backprop is partial
# ---------------------------------------------------------------------------------


def test_compiled_step_backpropagates_to_the_active_block_only(env):
  cfg, parts, spec = env.cfg, env.parts, env.spec
  n = spec.num_blocks
  params, batch = parts.params, env.batches[0]
  blocks = [env.step.lower(env.step.init(params, env.state0), batch, block=b).compile()
            for b in range(n)]
  full_c = env.full.lower(env.full.init(params), batch).compile()

  # FLOPs (XLA's count): full backprop ~3 forwards; block i ~ a forward, (N-1-i)
  # layers of activation gradients and one layer's weight gradients.
  flops = [c.cost_analysis()["flops"] for c in blocks]
  full_flops = full_c.cost_analysis()["flops"]
  assert all(f < full_flops for f in flops), (flops, full_flops)
  assert all(a > b for a, b in zip(flops, flops[1:])), flops  # shallow costs more
  assert flops[n // 2] < 0.8 * full_flops, (flops, full_flops)
  assert flops[-1] < 0.6 * full_flops, (flops, full_flops)
  per_layer = np.diff(flops)  # one layer of activation backprop per level of depth
  np.testing.assert_allclose(per_layer, per_layer.mean(), rtol=0.05)

  # Structure: a weight-gradient dot is a dot whose result has a kernel's shape
  # (forward and activation-gradient dots have [tokens, features] results).
  kernel_shapes = {f"f32[{','.join(map(str, x.shape))}]"
                   for x in absign_jax.blocks.partition.gather_block(
                       spec, jax.tree.leaves(parts.params), 0) if x.ndim == 2}
  head_shape = f"f32[{cfg.dim},{cfg.vocab}]"
  embed_shape = f"f32[{cfg.vocab},{cfg.dim}]"
  assert head_shape not in kernel_shapes and embed_shape not in kernel_shapes

  def weight_grad_dots(ops):
    return sum(c for (op, shape), c in ops.items()
               if op == "dot" and shape in kernel_shapes)

  full_ops = hlo_ops(full_c)
  full_w = weight_grad_dots(full_ops)
  assert full_w >= n * len(kernel_shapes), full_ops
  assert full_ops[("dot", head_shape)] >= 1        # head weight gradient
  assert full_ops[("scatter", embed_shape)] >= 1   # embedding gradient
  for b, c in enumerate(blocks):
    ops = hlo_ops(c)
    # One layer's weight gradients: none for the layers above (activation gradients
    # only) or below (forward only).
    assert weight_grad_dots(ops) * n == full_w, (b, ops)
    # Frozen embedding and head: no gradient at all.
    assert ops[("dot", head_shape)] == 0, (b, ops)
    assert ops[("scatter", embed_shape)] == 0, (b, ops)


def test_block_gradient_tree_has_block_leaves_only(env):
  """The traced step hands tx.update gradients for the block's leaves, None elsewhere."""
  seen = []
  tx = env.tx

  class Spy:
    def init(self, params):
      return tx.init(params)

    def update(self, grads, state, params=None, **kw):
      seen.append(jax.tree.flatten(grads, is_leaf=lambda x: x is None)[0])
      return tx.update(grads, state, params, **kw)

  step = absign_jax.BlockTrainStep(env.parts.loss_fn, Spy(), donate=False)
  step.lower(step.init(env.parts.params, env.state0), env.batches[0], block=1)  # traces
  (grads,) = seen
  present = [i for i, g in enumerate(grads) if g is not None]
  assert present == sorted(env.spec.block_leaf_indices(1))


# ---------------------------------------------------------------------------------
# dispatch: no retrace after warm-up
# ---------------------------------------------------------------------------------


def test_no_retrace_after_warm_up(env, per_block_run):
  n = env.spec.num_blocks
  # Warm-up traced each block's program once, and the plain path once.
  assert env.warm_traces["block"] == n and env.warm_traces["plain"] == 1, env.warm_traces
  assert env.step.compiled_programs == n
  # The 20 steps of per_block_run, then 20 more: no trace, no compile.
  state = env.step.init(per_block_run["block_params"][-1],
                        per_block_run["block_state"][-1])
  blocks = set(per_block_run["block"])
  for k in range(STEPS):
    blocks.add(int(absign_jax.active_block(state.opt_state)))
    state, _ = env.step(state, env.batches[k])
  assert blocks == set(range(n))
  assert env.traces["block"] == n and env.traces["plain"] == 1, env.traces
  assert env.step.compiled_programs == n


# ---------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------


def test_metrics_match_the_plain_path(per_block_run):
  rec = per_block_run
  for k, m in enumerate(rec["metrics"]):
    assert int(m["block"]) == rec["block"][k]
    assert int(m["skipped"]) == 0
    # The loss at the pre-step parameters. Two differently fused XLA programs: equal
    # to float32 rounding (bitwise on most steps).
    np.testing.assert_allclose(float(m["loss"]), rec["plain_loss"][k], rtol=1e-6)
    # The norm of the active block's gradient, as computed by full backprop.
    np.testing.assert_allclose(float(m["grad_norm"]), rec["plain_grad_norm"][k],
                               rtol=1e-5)
    assert float(m["grad_norm"]) > 0


# ---------------------------------------------------------------------------------
# non-finite gradients
# ---------------------------------------------------------------------------------


def _poison(params, spec, block):
  """``params`` with one NaN in a kernel of ``block``."""
  flat, treedef = jax.tree.flatten(params)
  i = [i for i, _ in spec.members[block] if flat[i].ndim == 2][0]
  flat = list(flat)
  flat[i] = flat[i].at[0, 0].set(jnp.nan)
  return jax.tree.unflatten(treedef, flat)


@pytest.mark.parametrize("where", ["active_block_param", "lower_block_param",
                                   "batch_nan", "batch_inf"])
def test_non_finite_step_changes_nothing(env, per_block_run, where):
  spec, step = env.spec, env.step
  clean = per_block_run["block_params"][-1]
  params, state = clean, per_block_run["block_state"][-1]
  active = int(absign_jax.active_block(state))
  batch = env.batches[STEPS]
  if where == "active_block_param":
    params = _poison(params, spec, active)
  elif where == "lower_block_param":  # a frozen layer feeding the active one
    params = _poison(params, spec, (active - 1) % spec.num_blocks)
  else:  # a batch whose loss is NaN / inf
    bad = jnp.nan if where == "batch_nan" else jnp.inf
    batch = dict(batch, mask=batch["mask"].at[0, 0].set(bad))
  before = dict(env.traces)
  new_params, new_state, metrics = step_once(step, params, state, batch)
  assert dict(env.traces) == before  # same shapes: the compiled programs are reused
  assert int(metrics["skipped"]) == 1
  assert int(metrics["block"]) == active
  assert not np.isfinite(float(metrics["loss"])) or not np.isfinite(
      float(metrics["grad_norm"]))
  assert_trees_equal(new_params, params, "params after a skipped step")
  assert_trees_equal(new_state, state, "optimizer state after a skipped step")
  # The block keeps its turn; a finite step afterwards proceeds as usual.
  assert int(absign_jax.active_block(new_state)) == active
  p2, s2, m2 = step_once(step, clean, new_state, env.batches[STEPS])
  assert int(m2["skipped"]) == 0 and int(m2["block"]) == active
  pp, sp, _, _ = env.plain(clean, state, env.batches[STEPS])
  assert_trees_equal(p2, pp, "first finite step after the skip")
  assert_trees_equal(s2, sp, "state after the first finite step")


# ---------------------------------------------------------------------------------
# block Adam
# ---------------------------------------------------------------------------------


def test_block_adam_equals_plain_path(env):
  """BAdam-style block Adam, 3 steps per block, through the partial-backprop step.

  Adam does not take signs, so float32 rounding differences between the two XLA
  programs (the same gradient, fused differently) reach the parameters: equal to a
  tight tolerance (a few float32 ulps of the update), with the state (moments,
  selection, counters) checked alike.
  """
  spec, tx, params = env.spec, env.adam_tx, env.parts.params
  rec = run_pair(env.adam_step, env.adam_plain, params, tx.init(params),
                 env.batches[:12])
  blocks = rec["block"]
  assert [blocks[k] for k in range(0, 12, 3)] == [blocks[k + 2] for k in range(0, 12, 3)]
  assert [blocks[k] for k in range(0, 12, 3)] == [blocks[k + 1] for k in range(0, 12, 3)]
  assert sorted(set(blocks)) == list(range(spec.num_blocks))
  for k in range(12):
    # An Adam step moves a weight by about lr = 1e-3 (m / sqrt(v) ~ 1). Where the
    # gradient is ~eps, m / (sqrt(v) + eps) amplifies its rounding (seen: 1.8e-6 on
    # 1 entry of 8192 right after a block switch), so: every entry within 1% of a
    # step, and all but 0.1% of them within 1e-4 of a step plus 4 float32 ulps.
    off, total = 0, 0
    for a, b in zip(leaves(rec["block_params"][k]), leaves(rec["plain_params"][k])):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"params {k}")
      off += int(np.sum(np.abs(a - b) > 1e-7 + 4 * np.spacing(np.abs(b))))
      total += a.size
    assert off < 1e-3 * total, f"params {k}: {off} of {total} entries off"
    for a, b in zip(leaves(rec["block_state"][k]), leaves(rec["plain_state"][k])):
      if np.issubdtype(a.dtype, np.floating):
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        # The two programs sum the gradient's token terms in different orders:
        # entries that nearly cancel differ by ~1e-5 of the largest (seen).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"state {k}")
      else:
        np.testing.assert_array_equal(a, b, err_msg=f"state {k}")
    np.testing.assert_allclose(float(rec["metrics"][k]["loss"]), rec["plain_loss"][k],
                               rtol=1e-6)
  # Frozen leaves are bit-identical, and every block moved.
  init, final = leaves(params), leaves(rec["block_params"][-1])
  for i, lb in enumerate(spec.leaf_blocks):
    assert np.array_equal(init[i], final[i]) == (lb.block is None)


# ---------------------------------------------------------------------------------
# micro-batches: the gradient of the whole batch at the memory of one slice
# ---------------------------------------------------------------------------------


def test_micro_batches_step_on_the_gradient_of_the_whole_batch():
  """Two slices of 2 rows: every block (embedding and head by their own programs, the
  layers by the stacked one) moves by ``lr * sign`` of the 4-row gradient, computed
  here with ``jax.grad`` of the model's own loss; where that gradient is rounding
  noise the sign is arbitrary. The full-backprop step averages the same way."""
  cfg = Config(n_layers=2, stacked=True)
  parts = cut(TinyLM(cfg, rngs=nnx.Rngs(3)))
  tx = absign_jax.absignsgd(LR, selection="cyclic", include_embedding=True,
                            include_head=True)
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                   micro_batches=2, donate=False)
  n_blocks = absign_jax.block_spec(parts.params, include_embedding=True,
                                   include_head=True).num_blocks
  state = step.init(parts.params)
  grad = jax.jit(jax.value_and_grad(parts.loss_fn))
  for i in range(n_blocks):
    batch = make_batch(i, cfg.vocab, batch=4)
    want_loss, g = grad(state.params, batch)
    before = state.params
    state, m = step(state, batch)
    assert int(m["block"]) == i
    np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-6)
    noise = 1e-5 * max(float(jnp.max(jnp.abs(x))) for x in leaves(g))
    paths = [jax.tree_util.keystr(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(before)[0]]
    for path, p0, p1, gi in zip(paths, leaves(before), leaves(state.params), leaves(g)):
      moved = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
      want = -LR * np.sign(np.asarray(gi, np.float64))
      if "layers" in path:  # stacked: row i - 1 belongs to block i
        active = np.zeros(moved.shape[0], bool)
        if 0 < i < n_blocks - 1:
          active[i - 1] = True
        moved_on, want_on, g_on = moved[active], want[active], gi[active]
        assert not moved[~active].any(), f"block {i} moved {path} outside its row"
      elif (0 if "embed" in path else n_blocks - 1) == i:  # embedding or head
        moved_on, want_on, g_on = moved, want, gi
      else:
        assert not moved.any(), f"block {i} moved {path}"
        continue
      wrong = ~np.isclose(moved_on, want_on, rtol=1e-5, atol=0) & (np.abs(g_on) > noise)
      assert not wrong.any(), f"block {i}, {path}: {int(wrong.sum())} entries"
  assert step.compiled_programs == 3  # embedding, the stacked layers, head

  full = absign_jax.FullTrainStep(parts.loss_fn, optax.sgd(0.5), micro_batches=4,
                                  donate=False)
  batch = make_batch(0, cfg.vocab, batch=4)
  new, m = full(full.init(parts.params), batch)
  want_loss, g = grad(parts.params, batch)
  np.testing.assert_allclose(float(m["loss"]), float(want_loss), rtol=1e-6)
  for p0, p1, gi in zip(leaves(parts.params), leaves(new.params), leaves(g)):
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p0 - 0.5 * gi),
                               rtol=1e-5, atol=1e-7)


def test_micro_batches_bad_input():
  parts = absign_jax.split_nnx(TinyLM(Config(n_layers=2), rngs=nnx.Rngs(0)))
  tx = absign_jax.absignsgd(LR)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
      absign_jax.BlockTrainStep(parts.loss_fn, tx, micro_batches=bad)
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
      absign_jax.FullTrainStep(parts.loss_fn, optax.sgd(0.1), micro_batches=bad)
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, micro_batches=2)
  with pytest.raises(ValueError, match="multiple of 2"):
    step(step.init(parts.params), make_batch(0, batch=3))
