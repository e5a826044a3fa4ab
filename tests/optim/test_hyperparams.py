"""Hyperparameters are checked where they enter; a bad one is a message, not a climb."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax


def layers(n, width=3):
  return {"layers": [{"w": jnp.full(width, float(i + 1))} for i in range(n)]}


@pytest.mark.parametrize("make, match", [
    (lambda: absign_jax.absignsgd(-1e-3), r"absignsgd: learning_rate must be a finite "
     r"number > 0, got -0.001"),
    (lambda: absign_jax.absignsgd(float("nan")), r"learning_rate .* got nan"),
    (lambda: absign_jax.block_adam(float("inf")), r"block_adam: learning_rate .* got inf"),
    (lambda: absign_jax.sign_sgd(1e-3, weight_decay=-0.1),
     r"sign_sgd: weight_decay must be finite and >= 0, got -0.1"),
    (lambda: absign_jax.absignsgd(1e-3, depth_bias=-1.0),
     r"depth_bias must be finite and >= 0, got -1.0"),
    (lambda: absign_jax.absignsgd(1e-3, depth_bias=float("nan")), r"depth_bias .* got nan"),
    (lambda: absign_jax.block_adam(1e-3, steps_per_block=0),
     r"steps_per_block must be an int >= 1, got 0"),
    (lambda: absign_jax.block_adam(1e-3, b1=1.0), r"block_adam: b1 must be finite and in "
     r"\[0, 1\), got 1"),
    (lambda: absign_jax.block_adam(1e-3, b2=-0.5), r"b2 must be finite and in \[0, 1\)"),
    (lambda: absign_jax.block_adam(1e-3, eps=float("nan")),
     r"eps must be finite and in \[0, inf\), got nan"),
    (lambda: absign_jax.absignsgd(optax.linear_schedule(-1e-3, 1e-3, 10)),
     r"absignsgd: the learning-rate schedule returns -0.001 at step 0"),
    (lambda: absign_jax.block_adam(optax.linear_schedule(1e-3, -1e-3, 3000)),
     r"block_adam: the learning-rate schedule returns -5.6e-05 at step 1584"),
    (lambda: absign_jax.sign_sgd(lambda k: jnp.where(k == 7, jnp.nan, 1e-3)),
     r"sign_sgd: the learning-rate schedule returns nan at step 7"),
])
def test_bad_hyperparameter_is_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_a_valid_schedule_is_accepted_and_used():
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 100)
  tx = absign_jax.sign_sgd(sched)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  grads = {"w": jnp.asarray([1.0, -1.0, 2.0])}
  for k in range(3):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], -float(sched(k)) * np.sign(grads["w"]),
                               rtol=1e-6)


def test_negative_injected_learning_rate_does_not_climb_silently():
  """Inside jit the value is not known to the host: the update becomes NaN."""
  tx = optax.inject_hyperparams(absign_jax.absignsgd, static_args=("depth_bias",))(
      learning_rate=0.1)
  params = layers(2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for lr, finite in ((0.1, True), (0.0, True), (-0.1, False), (float("nan"), False)):
    state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, _ = update(params, state, params)
    leaves = [np.asarray(u) for u in jax.tree.leaves(updates)]
    assert all(np.all(np.isfinite(u)) for u in leaves) == finite, lr
    if finite:  # never a step up the gradient
      assert all(np.all(u * np.sign(p) <= 0) for u, p in
                 zip(leaves, jax.tree.leaves(params)))


def test_state_for_another_block_count_is_an_error():
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(layers(4))
  params = layers(6)
  with pytest.raises(ValueError, match=r"initialised for 4 blocks, but the parameters "
                     r"passed to update have 6 \(layers.0, .*tx.init\(params\)"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="initialised for 4 blocks"):
    jax.jit(tx.update)(params, state, params)


@pytest.mark.parametrize("make", [
    lambda: absign_jax.absignsgd(0.1),
    lambda: absign_jax.block_adam(0.1, steps_per_block=2),
    lambda: optax.inject_hyperparams(absign_jax.absignsgd, static_args=("depth_bias",))(
        learning_rate=0.1),
])
def test_tree_map_params(make):
  """optax.tree_utils.tree_map_params initialises with a tree without leaves."""
  tx = make()
  params = layers(3)
  state = tx.init(params)
  same = optax.tree_utils.tree_map_params(tx, lambda p: p, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
    assert a is b
  # No parameter-shaped tree in a block-coordinate state: every entry is "non-params".
  seen = []
  optax.tree_utils.tree_map_params(tx, lambda p: p, state,
                                   transform_non_params=lambda x: seen.append(x))
  assert sum(len(jax.tree.leaves(x)) for x in seen) == len(jax.tree.leaves(state))
  # An empty state is no state for real parameters.
  empty = tx.init({})
  with pytest.raises(ValueError, match="initialised for 0 blocks"):
    tx.update(params, empty, params)
