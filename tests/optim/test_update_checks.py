"""``update`` checks the gradient and parameter trees against the initialised state.

The checks read static paths and shapes only, so they run when ``update`` is traced
and a jitted update raises the same error; a sparse tree (None for the leaves of
inactive blocks) passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import absign_jax


def layers(n=3, width=3):
  return {"layers": [{"w": jnp.full((width,), float(i + 1)), "b": jnp.zeros(2)}
                     for i in range(n)]}


def stacked(n=3, width=3):
  return {"layers": {"w": jnp.ones((n, width)), "b": jnp.zeros((n, 2))},
          "head": jnp.ones(4)}


def with_leaf(tree, path, value):
  """A copy of ``tree`` with ``tree[path[0]][path[1]]...`` replaced by ``value``."""
  tree = jax.tree.map(lambda x: x, tree)
  node = tree
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = value
  return tree


@pytest.mark.parametrize("jit", [False, True])
def test_gradient_of_another_shape_is_named(jit):
  params = layers()
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(params)
  grads = with_leaf(params, ("layers", 1, "w"), jnp.ones(4))
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=r"^block_coordinate: the gradient at "
                     r"'layers\.1\.w' has shape \(4,\), but the parameters the optimizer "
                     r"state was initialised with have \(3,\) there\. Pass gradients"):
    update(grads, state, params)


def test_renamed_gradient_key_is_named():
  params = layers()
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x, params)
  grads["layers"][0] = {"v": grads["layers"][0]["w"], "b": grads["layers"][0]["b"]}
  with pytest.raises(ValueError, match=r"the gradient tree differs from the parameters "
                     r"the optimizer state was initialised with: leaf 1 is 'layers\.0\.v'"
                     r" where the parameters have 'layers\.0\.w'"):
    jax.jit(tx.update)(grads, state, params)
  missing = {"layers": params["layers"][:2] + [{"b": params["layers"][2]["b"]}]}
  with pytest.raises(ValueError, match=r"it lacks 'layers\.2\.w' \(5 leaves, not 6\)"):
    tx.update(missing, state, params)


def test_parameters_of_another_shape_are_named():
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(layers(width=3))
  params = layers(width=5)
  with pytest.raises(ValueError, match=r"the parameter at 'layers\.0\.w' has shape "
                     r"\(5,\), but .* have \(3,\) there\. Pass the parameters the state "
                     r"was initialised with"):
    tx.update(params, state, params)


def test_inside_chain_and_inject_hyperparams():
  params = layers()
  bad = with_leaf(params, ("layers", 0, "b"), jnp.zeros(3))
  for tx in (optax.chain(optax.clip_by_global_norm(1.0), absign_jax.absignsgd(0.1)),
             optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=0.1)):
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"gradient at 'layers\.0\.b' has shape \(3,\)"):
      jax.jit(tx.update)(bad, state, params)
    tx.update(params, state, params)  # the right tree still works


def test_sparse_tree_with_none_for_inactive_blocks():
  params = layers()
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(params)
  b = int(absign_jax.active_block(state))
  sparse = {"layers": [params["layers"][i] if i == b else {"w": None, "b": None}
                       for i in range(3)]}
  updates, _ = jax.jit(tx.update, static_argnames="block")(sparse, state, params, block=b)
  assert updates["layers"][b - 1]["w"] is None
  assert updates["layers"][b]["w"].shape == (3,)
  wrong = with_leaf(sparse, ("layers", b, "w"), jnp.ones(2))
  with pytest.raises(ValueError, match=rf"gradient at 'layers\.{b}\.w' has shape \(2,\)"):
    tx.update(wrong, state, params, block=b)
  renamed = jax.tree.map(lambda x: x, sparse, is_leaf=lambda x: x is None)
  renamed["layers"][0] = {"v": None, "b": None}
  with pytest.raises(ValueError, match=r"leaf 1 is 'layers\.0\.v'"):
    tx.update(renamed, state, params, block=b)


def test_sparse_stacked_slice_with_traced_block():
  """The training step passes one layer's slice of each stacked leaf."""
  params = stacked()
  tx = absign_jax.absignsgd(0.1)
  state = tx.init(params)

  @jax.jit
  def update(g, state):
    block = absign_jax.find_state(state).active
    return tx.update(g, state, params, block=block)

  sliced = {"layers": {"w": jnp.ones(3), "b": jnp.ones(2)}, "head": None}
  updates, _ = update(sliced, state)
  assert updates["layers"]["w"].shape == (3,) and updates["head"] is None
  whole = {"layers": params["layers"], "head": None}  # the whole stack, not a slice
  with pytest.raises(ValueError, match=r"gradient at 'layers\.b' has shape \(3, 2\), but "
                     r".* have \(2,\) there \(one layer of a stacked \(3, 2\) leaf\)"):
    update(whole, state)


def test_checks_are_static():
  """No array of the state or the trees is read: the jitted update traces once."""
  params = layers()
  tx = absign_jax.absignsgd(0.1)
  traces = []

  def update(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  step = jax.jit(update)
  state = tx.init(params)
  for k in range(3):
    _, state = step(jax.tree.map(lambda x: x + k, params), state, params)
  assert len(traces) == 1
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params)
  assert "callback" not in str(jaxpr)
