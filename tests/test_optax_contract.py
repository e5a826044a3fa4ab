"""The optax contract, checked once for every optimizer the package offers.

Each optimizer must behave as an ``optax.GradientTransformation``: ``init`` and
``update`` under ``jax.jit`` (traced once, equal to the eager result), inside
``optax.chain``, under ``optax.inject_hyperparams`` (same trajectory as the plain
optimizer; hyperparameters readable and changeable in the state), with a state that is
a pytree of arrays (a NumPy round trip continues bit for bit), and
``optax.tree_map_params`` where the state holds per-parameter trees.
Optimizer-specific numerics are tested beside each optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax

N_LAYERS, STEPS = 3, 4
BLOCK = "one block's buffers per group of layers"

# name -> (optimizer function, keyword arguments, static_args for inject_hyperparams,
#          the injected hyperparameter to change mid-run or None, and why the state has
#          no trees shaped like the parameters, or None where it has)
CASES = {
    "absignsgd": (absign_jax.absignsgd, dict(learning_rate=0.01, weight_decay=0.1),
                  (), "learning_rate", BLOCK),
    "absignsgd_relative": (absign_jax.absignsgd,
                           dict(learning_rate=0.05, weight_decay=0.1, relative=True), (),
                           "learning_rate", BLOCK),
    "absignsgd_depth_scaled": (absign_jax.absignsgd,
                               dict(learning_rate=0.01,
                                    block_scale=absign_jax.depth_scale(0.5)),
                               ("block_scale",), "learning_rate", BLOCK),
    "absignsgd_momentum": (absign_jax.absignsgd,
                           dict(learning_rate=0.01, momentum=0.9, steps_per_block=2),
                           ("steps_per_block",), "learning_rate", BLOCK),
    "block_adam": (absign_jax.block_adam, dict(learning_rate=1e-2, steps_per_block=2),
                   ("steps_per_block",), "learning_rate", BLOCK),
    "sign_sgd": (absign_jax.sign_sgd, dict(learning_rate=0.01, weight_decay=0.1), (),
                 "learning_rate", "stateless"),
    "alias_absignsgd": (absign_jax.alias_absignsgd, dict(momentum=0.5),
                        ("steps_per_block", "seed"), None, BLOCK),
    "sgd_sai": (absign_jax.sgd_sai, dict(learning_rate=0.1, momentum=0.9), (),
                "learning_rate", None),
    "alias_sign_sgd": (absign_jax.alias_sign_sgd, dict(momentum=0.5), (), None, None),
}


def make_params(seed=0):
  r = np.random.default_rng(seed)
  return {"layers": [{"w": jnp.asarray(r.normal(size=(3, 2)), jnp.float32),
                      "b": jnp.asarray(r.normal(size=(2,)), jnp.float32)}
                     for _ in range(N_LAYERS)]}


def make_grads(k):
  return jax.tree.map(lambda x: x * (1.0 + 0.1 * k) - 0.05 * k, make_params(100 + k))


def run(tx, params, steps=STEPS, update=None, state=None, start=0):
  update = update or tx.update
  state = tx.init(params) if state is None else state
  for k in range(start, start + steps):
    updates, state = update(make_grads(k), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def assert_close(a, b, rtol=1e-6, atol=1e-7):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def assert_bits(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(params=sorted(CASES))
def case(request):
  return request.param, *CASES[request.param]


def test_update_under_jit_equals_eager_and_traces_once(case):
  name, fn, kw, *_ = case
  tx = fn(**kw)
  traces = []

  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  params = make_params()
  eager, eager_state = run(tx, params)
  jitted, jit_state = run(tx, params, update=jax.jit(update))
  assert len(traces) == 1, name
  assert_close(jitted, eager)
  assert_close(jit_state, eager_state)
  assert not all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(params), jax.tree.leaves(jitted))), name


def test_inject_hyperparams_matches_the_plain_optimizer(case):
  name, fn, kw, static, changed, _ = case
  params = make_params()
  want, _ = run(fn(**kw), params, update=None)
  tx = optax.inject_hyperparams(fn, static_args=static)(**kw)
  got, state = run(tx, params, update=jax.jit(tx.update))
  assert_close(got, want, rtol=1e-5, atol=1e-6)
  for key, value in kw.items():
    if key not in static and not isinstance(value, bool):  # optax keeps bools static
      assert float(state.hyperparams[key]) == pytest.approx(value), key
  if changed is not None:
    # A value changed in the state takes effect at the next step: 0 moves nothing.
    state.hyperparams[changed] = jnp.zeros_like(state.hyperparams[changed])
    updates, _ = jax.jit(tx.update)(make_grads(9), state, got)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates)), name


def test_injected_schedule_equals_the_schedule_passed_directly(case):
  """A schedule as the injected learning rate: the same trajectory as the optimizer
  given the schedule itself, and the state shows the schedule's current value."""
  name, fn, kw, static, changed, _ = case
  if changed != "learning_rate":
    pytest.skip(f"{name} has no learning rate")
  sched = optax.linear_schedule(2 * kw["learning_rate"], kw["learning_rate"] / 4, 3)
  kw = dict(kw, learning_rate=sched)
  params = make_params()
  want, _ = run(fn(**kw), params)
  tx = optax.inject_hyperparams(fn, static_args=static)(**kw)
  got, state = run(tx, params, update=jax.jit(tx.update))
  assert_close(got, want, rtol=1e-5, atol=1e-6)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(sched(STEPS - 1)))


def test_inject_hyperparams_needs_static_integer_arguments():
  params = make_params()
  with pytest.raises(ValueError, match="static_args"):
    optax.inject_hyperparams(absign_jax.alias_absignsgd)().init(params)


def test_inside_a_chain(case):
  name, fn, kw, *_ = case
  tx = optax.chain(optax.clip_by_global_norm(1.0), fn(**kw))
  params = make_params()
  got, state = run(tx, params, update=jax.jit(tx.update))
  assert isinstance(state, tuple) and len(state) == 2
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(got))
  assert not all(np.array_equal(x, y) for x, y in
                 zip(jax.tree.leaves(params), jax.tree.leaves(got))), name


def test_state_round_trips_through_numpy(case):
  _, fn, kw, *_ = case
  tx = fn(**kw)
  update = jax.jit(tx.update)
  params = make_params()
  straight, straight_state = run(tx, params, steps=2 * STEPS, update=update)
  half, state = run(tx, params, update=update)
  leaves, treedef = jax.tree.flatten(state)
  state = jax.tree.unflatten(treedef, [jnp.asarray(np.array(x)) for x in leaves])
  resumed, resumed_state = run(tx, half, update=jax.jit(tx.update), state=state,
                               start=STEPS)
  assert_bits(resumed, straight)
  assert_bits(resumed_state, straight_state)


def test_tree_map_params(case):
  name, fn, kw, _, _, no_param_trees = case
  if no_param_trees:
    pytest.skip(f"{name}: state without parameter-shaped trees ({no_param_trees})")
  tx = fn(**kw)
  params = make_params()
  _, state = run(tx, params)
  zeroed = optax.tree_map_params(tx, jnp.zeros_like, state)
  assert jax.tree.structure(zeroed) == jax.tree.structure(state)
  shaped = [x for x in jax.tree.leaves(zeroed) if np.shape(x) in {(3, 2), (2,)}]
  assert shaped and all(not np.any(np.asarray(x)) for x in shaped), name
