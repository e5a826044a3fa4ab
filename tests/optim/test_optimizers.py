"""ABSignSGD and the block-coordinate wrapper as optax transformations.

Numerics are compared with float64 references computed here with NumPy. A sign step
``p - lr * sign(g)`` is one rounding of an exact value, so it is compared exactly.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import absign_jax
from absign_jax.blocks import selection

N_LAYERS = 4


def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def make_params(n=N_LAYERS, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "embed": {"embedding": _normal(rng, (6, 3), dtype)},
      "layers": [{"w": _normal(rng, (3, 3), dtype), "b": _normal(rng, (3,), dtype)}
                 for _ in range(n)],
      "head": {"kernel": _normal(rng, (3, 5), dtype)},
  }
  # Negative zeros in blocks the first step does not touch (block n-1 goes first).
  params["embed"]["embedding"] = params["embed"]["embedding"].at[0, 0].set(-0.0)
  params["layers"][0]["b"] = params["layers"][0]["b"].at[1].set(-0.0)
  return params


def make_grads(params, seed):
  rng = np.random.default_rng(1000 + seed)
  return jax.tree.map(lambda x: _normal(rng, x.shape, x.dtype), params)


def bits(x):
  x = np.asarray(x)
  return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


def block_of_leaf(params):
  """Block id per flattened leaf: layers.i -> i, everything else -> None."""
  spec = absign_jax.block_spec(params)
  return [lb.block for lb in spec.leaf_blocks]


def changed_blocks(old, new):
  blocks = block_of_leaf(old)
  out = set()
  for b, x, y in zip(blocks, jax.tree.leaves(old), jax.tree.leaves(new)):
    if not np.array_equal(bits(x), bits(y)):
      out.add(b)
  return out


def assert_untouched(old, new, active):
  blocks = block_of_leaf(old)
  for b, x, y in zip(blocks, jax.tree.leaves(old), jax.tree.leaves(new)):
    if b != active:
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(bits(x), bits(y))


def sign_step_ref(p, g, lr, dtype):
  """float64 ``p - lr * sign(g)`` with ``lr`` rounded to ``dtype`` first, one rounding."""
  lr = np.float64(np.asarray(lr, dtype))
  p64 = np.asarray(p).astype(np.float64)
  g64 = np.asarray(g).astype(np.float64)
  return (p64 - lr * np.sign(g64)).astype(dtype)


def one_step(tx, params, grads, state=None):
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, updates


def jit_step(tx):
  """A jitted ``(params, grads, state) -> (params, state, updates)``."""
  return jax.jit(lambda p, g, s: one_step(tx, p, g, s))


# ---------------------------------------------------------------------------------
# The update rule
# ---------------------------------------------------------------------------------


def test_active_block_sign_step_and_untouched_bits():
  params = make_params()
  grads = make_grads(params, 0)
  # Exact zeros in the active block's gradient: sign(0) = 0 does not move.
  grads["layers"][3]["w"] = grads["layers"][3]["w"].at[0, :].set(0.0)
  grads["layers"][3]["b"] = grads["layers"][3]["b"].at[2].set(-0.0)
  params["layers"][3]["b"] = params["layers"][3]["b"].at[2].set(-0.0)
  lr = 0.01
  tx = absign_jax.absignsgd(lr)
  state = tx.init(params)
  assert int(absign_jax.active_block(state)) == N_LAYERS - 1  # deepest first
  new, state, _ = jit_step(tx)(params, grads, state)

  assert_untouched(params, new, N_LAYERS - 1)
  p, g = params["layers"][3]["w"], grads["layers"][3]["w"]
  np.testing.assert_array_equal(
      bits(new["layers"][3]["w"]), bits(sign_step_ref(p, g, lr, np.float32)))
  p, g = params["layers"][3]["b"], grads["layers"][3]["b"]
  np.testing.assert_array_equal(new["layers"][3]["b"], sign_step_ref(p, g, lr, np.float32))
  # sign(0): the coordinate does not move (bit for bit where p != -0.0; a -0.0
  # weight with a -0.0 gradient may come back as +0.0, the same value).
  np.testing.assert_array_equal(bits(new["layers"][3]["w"][0]), bits(params["layers"][3]["w"][0]))
  assert float(new["layers"][3]["b"][2]) == 0.0
  # The -0.0 planted in untouched blocks survived.
  assert bits(new["layers"][0]["b"])[1] == np.float32(-0.0).view(np.uint32)
  assert bits(new["embed"]["embedding"])[0, 0] == np.float32(-0.0).view(np.uint32)
  # Every active coordinate with g != 0 moved by lr.
  delta = np.asarray(new["layers"][3]["w"][1:]) - np.asarray(params["layers"][3]["w"][1:])
  np.testing.assert_allclose(np.abs(delta), lr, rtol=1e-4)


def test_weight_decay_only_on_active_block():
  params = make_params()
  grads = make_grads(params, 1)
  grads["layers"][3]["w"] = grads["layers"][3]["w"].at[1, 1].set(0.0)
  lr, wd = 0.01, 0.1
  tx = absign_jax.absignsgd(lr, weight_decay=wd)
  new, _, _ = jit_step(tx)(params, grads, tx.init(params))
  assert_untouched(params, new, N_LAYERS - 1)
  for name in ("w", "b"):
    p = np.asarray(params["layers"][3][name], np.float64)
    g = np.asarray(grads["layers"][3][name], np.float64)
    ref = (1 - lr * wd) * p - lr * np.sign(g)
    np.testing.assert_allclose(np.asarray(new["layers"][3][name], np.float64), ref,
                               rtol=1e-6, atol=1e-7)
  # At g == 0 only the decay acts.
  p11 = float(params["layers"][3]["w"][1, 1])
  assert float(new["layers"][3]["w"][1, 1]) == pytest.approx((1 - lr * wd) * p11, rel=1e-6)


def test_sign_update_ignores_gradient_scale():
  params = make_params()
  grads = make_grads(params, 2)
  tx = absign_jax.absignsgd(0.05)
  step, state = jit_step(tx), tx.init(params)
  a, _, _ = step(params, grads, state)
  b, _, _ = step(params, jax.tree.map(lambda g: g * 1e-6, grads), state)
  c, _, _ = step(params, jax.tree.map(lambda g: g * 1024.0, grads), state)
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
    np.testing.assert_array_equal(bits(x), bits(y))
    np.testing.assert_array_equal(bits(x), bits(z))


# ---------------------------------------------------------------------------------
# Under jit: no retrace, the schedule, active_block
# ---------------------------------------------------------------------------------


def test_jit_no_retrace_and_active_block_predicts_schedule():
  n, steps, lr = 6, 40, 0.01
  params = make_params(n)
  tx = absign_jax.absignsgd(lr)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)  # runs only while tracing
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  expected = selection.schedule("depth_biased", n, steps).tolist()
  predicted = []
  for k in range(steps):
    grads = make_grads(params, k)
    active = int(absign_jax.active_block(state))
    predicted.append(active)
    new, state = step(params, state, grads)
    assert changed_blocks(params, new) == {active}, k
    for name in ("w", "b"):
      np.testing.assert_array_equal(
          bits(new["layers"][active][name]),
          bits(sign_step_ref(params["layers"][active][name],
                             grads["layers"][active][name], lr, np.float32)))
    params = new
  assert predicted == expected
  assert len(traces) == 1
  sel = absign_jax.find_state(state).selection
  assert int(sel.count) == steps + 1  # init already picked the first block
  np.testing.assert_array_equal(
      np.asarray(sel.visits), np.bincount(expected + [int(absign_jax.active_block(state))],
                                          minlength=n))


def test_state_survives_jit_and_checkpoint_round_trip():
  params0 = make_params(5)
  tx = absign_jax.absignsgd(0.02, selection="uniform", seed=3)
  step = jax.jit(lambda p, s, g: one_step(tx, p, g, s)[:2])

  # 12 jitted steps in one go.
  params, state = params0, tx.init(params0)
  for k in range(12):
    params, state = step(params, state, make_grads(params, k))
  straight = (params, state)

  # 6 jitted steps, a NumPy round trip of everything (a checkpoint), a fresh jit.
  params, state = params0, tx.init(params0)
  for k in range(6):
    params, state = step(params, state, make_grads(params, k))
  leaves, treedef = jax.tree.flatten(state)
  state = jax.tree.unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
  params = jax.tree.map(lambda x: jnp.asarray(np.array(x)), params)
  step2 = jax.jit(lambda p, s, g: one_step(tx, p, g, s)[:2])
  for k in range(6, 12):
    params, state = step2(params, state, make_grads(params, k))

  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The uniform draws are the scheme's own, seeded: same as the schedule.
  sel = absign_jax.find_state(state).selection
  np.testing.assert_array_equal(
      np.asarray(sel.visits),
      np.bincount(selection.schedule(selection.uniform(3), 5, 13), minlength=5))


# ---------------------------------------------------------------------------------
# Composition with optax
# ---------------------------------------------------------------------------------


def test_inside_chain_after_clipping():
  params = make_params()
  plain, chained = params, params
  tx_plain = absign_jax.absignsgd(0.01, weight_decay=0.0)
  tx_chain = optax.chain(optax.clip_by_global_norm(1e-3), absign_jax.absignsgd(0.01))
  s_plain, s_chain = tx_plain.init(params), tx_chain.init(params)
  step_plain, step_chain = jit_step(tx_plain), jit_step(tx_chain)
  for k in range(5):
    grads = make_grads(plain, k)
    assert float(optax.tree.norm(grads)) > 1.0  # clipping really rescales
    plain, s_plain, _ = step_plain(plain, grads, s_plain)
    chained, s_chain, _ = step_chain(chained, grads, s_chain)
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(chained)):
    np.testing.assert_array_equal(bits(x), bits(y))
  assert int(absign_jax.active_block(s_chain)) == int(absign_jax.active_block(s_plain))


def _applied_step_sizes(tx, params, steps, jit=True):
  """With all-ones gradients, the active block's update is exactly -lr_k."""
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  sizes = []
  for _ in range(steps):
    active = int(absign_jax.active_block(state))
    updates, state = update(grads, state, params)
    u = np.asarray(updates["layers"][active]["w"])
    assert np.all(u == u.flat[0])
    for b in range(N_LAYERS):
      if b != active:
        assert not np.any(np.asarray(updates["layers"][b]["w"]))
    sizes.append(-float(u.flat[0]))
    params = optax.apply_updates(params, updates)
  return np.asarray(sizes), state


def test_inject_hyperparams_warmup_from_zero_and_manual_change():
  # A warm-up schedule starts at lr = 0: that first step moves nothing.
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.2, warmup_steps=4, decay_steps=20)
  tx = optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=sched,
                                                       weight_decay=0.0)
  sizes, _ = _applied_step_sizes(tx, make_params(), 6)
  np.testing.assert_allclose(sizes, [float(sched(k)) for k in range(6)], rtol=1e-6,
                             atol=1e-9)
  assert sizes[0] == 0.0 and sizes[4] == pytest.approx(0.2)

  # A constant injected lr can be changed in the state between steps.
  params = make_params()
  tx = optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  u, state = update(grads, state, params)
  assert float(u["layers"][3]["w"][0, 0]) == pytest.approx(-0.1)
  state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  active = int(absign_jax.active_block(state))
  u, state = update(grads, state, params)
  assert float(u["layers"][active]["w"][0, 0]) == pytest.approx(-0.5)


def test_inject_hyperparams_weight_decay():
  params = make_params()
  grads = make_grads(params, 4)
  lr, wd = 0.01, 0.1
  tx = optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=lr, weight_decay=wd)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert_untouched(params, new, 3)
  p = np.asarray(params["layers"][3]["w"], np.float64)
  ref = (1 - lr * wd) * p - lr * np.sign(np.asarray(grads["layers"][3]["w"]))
  np.testing.assert_allclose(np.asarray(new["layers"][3]["w"]), ref, rtol=1e-6, atol=1e-7)


def test_schedule_passed_directly():
  sched = optax.linear_schedule(0.05, 0.005, transition_steps=6)
  sizes, _ = _applied_step_sizes(absign_jax.absignsgd(learning_rate=sched), make_params(), 8)
  np.testing.assert_allclose(sizes, [float(sched(k)) for k in range(8)], rtol=1e-6)


# ---------------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------------


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.lin = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


class TinyModel(nnx.Module):
  def __init__(self, n, rngs, d=4):
    self.embed = nnx.Linear(3, d, rngs=rngs)
    self.layers = nnx.List([Block(d, rngs) for _ in range(n)])
    self.head = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


def test_nnx_optimizer():
  n, lr = 3, 0.01
  model = TinyModel(n, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, absign_jax.absignsgd(lr), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jnp.sum(x, axis=1, keepdims=True)
  loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  traces = []

  @nnx.jit
  def train_step(model, optimizer):
    traces.append(1)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  grad_fn = nnx.jit(nnx.grad(loss_fn))
  expected = selection.schedule("depth_biased", n, 6).tolist()
  for k in range(6):
    active = int(absign_jax.active_block(optimizer.opt_state))
    assert int(absign_jax.active_block(optimizer)) == active
    assert active == expected[k]
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    grads = grad_fn(model)
    train_step(model, optimizer)
    after = nnx.state(model, nnx.Param)
    for i in range(n):
      for name in ("kernel", "bias"):
        old = np.asarray(before["layers"][i]["lin"][name][...])
        new = np.asarray(after["layers"][i]["lin"][name][...])
        if i == active:
          g = np.asarray(grads["layers"][i]["lin"][name][...])
          np.testing.assert_array_equal(new, sign_step_ref(old, g, lr, np.float32))
        else:
          np.testing.assert_array_equal(bits(new), bits(old))
    for name in ("embed", "head"):
      np.testing.assert_array_equal(np.asarray(before[name]["kernel"][...]),
                                    np.asarray(after[name]["kernel"][...]))
  assert len(traces) == 1


class StackedModel(nnx.Module):
  """Layers stacked by nnx.vmap (one leaf per parameter with a leading layer axis)."""

  def __init__(self, n, rngs, d=4):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(d, rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
      return layer(x)

    return self.head(run(x, self.layers))


def test_nnx_optimizer_stacked_layers_and_injected_depth_bias():
  n = 3
  model = StackedModel(n, nnx.Rngs(0))
  # depth_bias = 0 through inject_hyperparams: equal costs, so round robin 0, 1, 2, ...
  tx = optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=0.01, depth_bias=0.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  actives = []
  for _ in range(5):
    active = int(absign_jax.active_block(optimizer))
    actives.append(active)
    before = np.array(model.layers.lin.kernel[...])
    head = np.array(model.head.kernel[...])
    train_step(model, optimizer)
    after = np.array(model.layers.lin.kernel[...])
    changed = [j for j in range(n) if not np.array_equal(bits(before[j]), bits(after[j]))]
    assert changed == [active]
    np.testing.assert_array_equal(bits(head), bits(model.head.kernel[...]))
  assert actives == [0, 1, 2, 0, 1]


def test_inject_hyperparams_bad_values():
  params = make_params()
  with pytest.raises(ValueError, match="learning_rate"):
    optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=-1.0).init(params)
  with pytest.raises(ValueError, match="depth_bias"):
    optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=0.1,
                                                   depth_bias=-1.0).init(params)


# ---------------------------------------------------------------------------------
# Dtypes and stacked layers
# ---------------------------------------------------------------------------------


def test_bfloat16_params():
  lr = 2.0**-6  # bf16 sums with |p| ~ 1 are exact in f32: one rounding, as the reference
  params = make_params(dtype=jnp.bfloat16)
  grads = make_grads(params, 5)
  tx = absign_jax.absignsgd(lr)
  new, state, updates = jax.jit(lambda p, g: one_step(tx, p, g))(params, grads)
  for x in jax.tree.leaves((new, updates)):
    assert x.dtype == jnp.bfloat16
  assert_untouched(params, new, 3)
  assert bits(new["layers"][0]["b"])[1] == np.asarray(-0.0, ml_dtypes.bfloat16).view(np.uint16)
  for name in ("w", "b"):
    ref = sign_step_ref(params["layers"][3][name], grads["layers"][3][name], lr,
                        ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bits(new["layers"][3][name]), bits(ref))
  assert changed_blocks(params, new) == {3}


def test_stacked_layer_leaves():
  n, lr, steps = 5, 0.01, 12
  rng = np.random.default_rng(0)
  params = {"embed": _normal(rng, (6, 3)),
            "layers": {"w": _normal(rng, (n, 3, 3)),
                       "b": _normal(rng, (n, 3)).at[0, 0].set(-0.0)}}
  tx = absign_jax.absignsgd(lr)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: one_step(tx, p, g, s)[:2])
  expected = selection.schedule("depth_biased", n, steps).tolist()
  for k in range(steps):
    grads = make_grads(params, k)
    active = int(absign_jax.active_block(state))
    assert active == expected[k]
    new, state = step(params, state, grads)
    np.testing.assert_array_equal(bits(new["embed"]), bits(params["embed"]))
    for name in ("w", "b"):
      old, upd = np.asarray(params["layers"][name]), np.asarray(new["layers"][name])
      changed = [j for j in range(n) if not np.array_equal(bits(old[j]), bits(upd[j]))]
      assert changed == [active]
      np.testing.assert_array_equal(
          bits(upd[active]),
          bits(sign_step_ref(old[active], grads["layers"][name][active], lr, np.float32)))
    params = new


# ---------------------------------------------------------------------------------
# Block Adam (BAdam-style baseline)
# ---------------------------------------------------------------------------------


def _adam_states(state):
  return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]


def test_block_adam_memory_is_one_block():
  params = make_params(6)
  state = absign_jax.block_adam(1e-3).init(params)
  adam = _adam_states(state)
  assert len(adam) == 1
  one_layer = sum(x.size for x in jax.tree.leaves(params["layers"][0]))
  assert sum(x.size for x in jax.tree.leaves(adam[0].mu)) == one_layer
  assert sum(x.size for x in jax.tree.leaves(adam[0].nu)) == one_layer


def test_block_adam_k_steps_and_reset_on_switch():
  k_steps, n, lr, steps = 3, N_LAYERS, 1e-2, 14
  params = make_params(n)
  tx = absign_jax.block_adam(lr, steps_per_block=k_steps, selection="cyclic")
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: one_step(tx, p, g, s)[:2])
  want_order = [(k // k_steps) % n for k in range(steps)]

  ref_params = params
  ref_adam = optax.adam(lr)
  ref_state = None
  for k in range(steps):
    grads = make_grads(params, k)
    active = int(absign_jax.active_block(state))
    assert active == want_order[k]
    new, state = step(params, state, grads)
    assert changed_blocks(params, new) == {active}
    # Reference: a fresh optax.adam on this block at every switch.
    if k % k_steps == 0:
      ref_state = ref_adam.init(ref_params["layers"][active])
    upd, ref_state = ref_adam.update(grads["layers"][active], ref_state,
                                     ref_params["layers"][active])
    ref_params = jax.tree.map(lambda x: x, ref_params)
    ref_params["layers"][active] = optax.apply_updates(ref_params["layers"][active], upd)
    for name in ("w", "b"):
      np.testing.assert_allclose(np.asarray(new["layers"][active][name]),
                                 np.asarray(ref_params["layers"][active][name]),
                                 rtol=1e-6, atol=1e-7)
    params = new


def test_absignsgd_momentum_is_signum_on_the_active_block_reset_on_switch():
  """momentum=beta, 3 steps per block: the step is -lr * sign(m) with m the float64
  average of this visit's gradients only (m starts at zero at every switch)."""
  k_steps, n, lr, beta, steps = 3, N_LAYERS, 1e-2, 0.9, 14
  params = make_params(n)
  tx = absign_jax.absignsgd(lr, momentum=beta, steps_per_block=k_steps,
                            selection="cyclic")
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: one_step(tx, p, g, s)[:2])
  m = None
  for k in range(steps):
    grads = make_grads(params, k)
    active = int(absign_jax.active_block(state))
    assert active == (k // k_steps) % n
    if k % k_steps == 0:
      m = {name: np.zeros(np.shape(params["layers"][active][name])) for name in "wb"}
    new, state = step(params, state, grads)
    assert_untouched(params, new, active)
    for name in ("w", "b"):
      m[name] = beta * m[name] + (1 - beta) * np.asarray(grads["layers"][active][name],
                                                         np.float64)
      want = (np.asarray(params["layers"][active][name], np.float64)
              - np.float64(np.float32(lr)) * np.sign(m[name])).astype(np.float32)
      np.testing.assert_array_equal(np.asarray(new["layers"][active][name]), want)
    params = new


def test_absignsgd_momentum_errors():
  with pytest.raises(ValueError, match="steps_per_block > 1"):
    absign_jax.absignsgd(1e-3, momentum=0.9)
  for beta in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="momentum must be in"):
      absign_jax.absignsgd(1e-3, momentum=beta, steps_per_block=4)
  with pytest.raises(ValueError, match="steps_per_block must be an int >= 1"):
    absign_jax.absignsgd(1e-3, steps_per_block=0)


# ---------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), float("inf")])
def test_bad_learning_rate(lr):
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    absign_jax.absignsgd(lr)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="depth_bias"):
    absign_jax.absignsgd(1e-3, depth_bias=-1.0)
  with pytest.raises(ValueError, match="unknown selection scheme 'sideways'"):
    absign_jax.absignsgd(1e-3, selection="sideways")
  with pytest.raises(ValueError, match="flip the sign"):
    absign_jax.absignsgd(0.1, weight_decay=10.0)
  with pytest.raises(ValueError, match="weight_decay"):
    absign_jax.absignsgd(0.1, weight_decay=-0.1)
  with pytest.raises(TypeError, match="learning_rate"):
    absign_jax.absignsgd("fast")
  with pytest.raises(ValueError, match="steps_per_block"):
    absign_jax.block_adam(1e-3, steps_per_block=0)
  with pytest.raises(ValueError, match="needs params"):
    tx = absign_jax.absignsgd(1e-3)
    params = make_params()
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------------
# The block options, declared once for every block optimizer
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [absign_jax.absignsgd, absign_jax.block_adam,
                                absign_jax.alias_absignsgd, absign_jax.block_coordinate])
def test_every_block_optimizer_takes_the_block_options(fn):
  parameters = inspect.signature(fn).parameters
  for name in absign_jax.BlockOptions._fields:
    assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert f"    {name}: " in fn.__doc__, name  # documented in the Args section
  assert "blocks" not in parameters


def test_block_options_reach_the_selection_and_partition():
  params = make_params()
  # block_adam's own default order is a random reshuffle; cyclic_descending given as
  # an option starts at the deepest layer and walks down.
  assert inspect.signature(absign_jax.block_adam).parameters["selection"].default == (
      "random_reshuffle")
  tx = absign_jax.block_adam(1e-2, steps_per_block=1, selection="cyclic_descending")
  state = tx.init(params)
  order = []
  for k in range(3):
    order.append(int(absign_jax.active_block(state)))
    _, state = tx.update(make_grads(params, k), state, params)
  assert order == [3, 2, 1]
  # include_head: the head is one more block, the deepest, so depth-biased selection
  # picks it first, and only the head moves.
  tx = absign_jax.absignsgd(0.1, include_head=True)
  state = tx.init(params)
  assert int(absign_jax.active_block(state)) == N_LAYERS
  updates, _ = tx.update(make_grads(params, 0), state, params)
  new = optax.apply_updates(params, updates)
  assert not np.array_equal(new["head"]["kernel"], params["head"]["kernel"])
  for old_layer, new_layer in zip(params["layers"], new["layers"]):
    assert all(np.array_equal(bits(a), bits(b)) for a, b in
               zip(jax.tree.leaves(old_layer), jax.tree.leaves(new_layer)))


def test_unknown_block_option_is_an_error():
  with pytest.raises(TypeError, match="depth_bais"):
    absign_jax.absignsgd(0.1, depth_bais=2.0)


# ---------------------------------------------------------------------------------
# The relative step (lr times each leaf's RMS)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stacked", [False, True])
def test_relative_step_moves_each_leaf_by_lr_times_its_rms(stacked):
  params = make_params()
  params["layers"][2]["b"] = jnp.zeros(3)  # a zero leaf moves by lr * min_scale
  if stacked:
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])
  grads = make_grads(params, 3)
  lr, wd = 0.05, 0.1
  tx = absign_jax.absignsgd(lr, weight_decay=wd, relative=True, min_scale=1e-3,
                            selection="cyclic_descending")
  state = tx.init(params)
  for active in (3, 2):
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for name in ("w", "b"):
      if stacked:
        p, g, got = (np.asarray(t["layers"][name][active], np.float64)
                     for t in (params, grads, new))
      else:
        p, g, got = (np.asarray(t["layers"][active][name], np.float64)
                     for t in (params, grads, new))
      scale = max(np.sqrt(np.mean(p ** 2)), 1e-3)
      want = p - lr * (scale * np.sign(g) + wd * p)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
      if name == "b" and active == 2:
        np.testing.assert_allclose(np.abs(got - p), lr * 1e-3, rtol=1e-6)
    untouched = jax.tree.map(lambda a, b: np.array_equal(bits(a), bits(b)),
                             params["embed"], new["embed"])
    assert all(jax.tree.leaves(untouched))
    params = new


def test_scale_by_param_rms_errors():
  with pytest.raises(ValueError, match="min_scale"):
    absign_jax.scale_by_param_rms(0.0)
  tx = absign_jax.scale_by_param_rms()
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
