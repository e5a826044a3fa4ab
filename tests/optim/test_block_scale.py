"""A step multiplier per block (``block_scale``, ``depth_scale``).

The updates are compared with float64 references computed here with NumPy; the
sparse calling mode (the partial-backprop step's) with the full one, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax

N_LAYERS = 4
LR = 0.05


def make_params(stacked: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  layers = [{"w": normal(3, 3), "b": normal(3)} for _ in range(N_LAYERS)]
  if stacked:
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {"embed": {"embedding": normal(6, 3)}, "layers": layers,
          "head": {"kernel": normal(3, 5)}}


def grads_like(params, seed: int):
  rng = np.random.default_rng(100 + seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)), params)


def block_leaves(tree, block: int, stacked: bool) -> dict[str, np.ndarray]:
  """Block ``block``'s leaves in float64 (0: embedding, 1..N: layers, N+1: head)."""
  if block == 0:
    return {"embedding": np.asarray(tree["embed"]["embedding"], np.float64)}
  if block == N_LAYERS + 1:
    return {"kernel": np.asarray(tree["head"]["kernel"], np.float64)}
  layers = tree["layers"]
  return {k: np.asarray(layers[k][block - 1] if stacked else layers[block - 1][k],
                        np.float64) for k in ("w", "b")}


@pytest.mark.parametrize("stacked", [False, True])
def test_each_block_moves_by_its_scaled_step(stacked):
  params = make_params(stacked)
  n_blocks = N_LAYERS + 2
  shallowest = 0.25
  tx = absign_jax.absignsgd(LR, block_scale=absign_jax.depth_scale(shallowest),
                            selection="cyclic_descending", include_embedding=True,
                            include_head=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k, block in enumerate(range(n_blocks - 1, -1, -1)):
    assert int(absign_jax.active_block(state)) == block
    grads = grads_like(params, k)
    updates, state = update(grads, state, params)
    new = optax.apply_updates(params, updates)
    scale = shallowest + (1 - shallowest) * block / (n_blocks - 1)
    before, g, after = (block_leaves(t, block, stacked) for t in (params, grads, new))
    for name in before:
      want = before[name] - LR * scale * np.sign(g[name])
      np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=0)
    for other in range(n_blocks):  # every other block is bit-identical
      if other != block:
        for name, old in block_leaves(params, other, stacked).items():
          np.testing.assert_array_equal(block_leaves(new, other, stacked)[name], old)
    params = new


def test_sparse_updates_equal_the_full_ones_bitwise():
  """The partial-backprop step's calling mode (``block=``, a traced index for the
  stacked layers) scales by the same multiplier as the full one."""
  params = make_params(stacked=True)
  tx = absign_jax.absignsgd(LR, block_scale=absign_jax.depth_scale(0.5, 2.0),
                            selection="cyclic_descending")
  state = tx.init(params)
  sparse_update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, block=b))
  for k in range(N_LAYERS):
    block = int(absign_jax.active_block(state))
    grads = grads_like(params, k)
    full, next_state = tx.update(grads, state, params)
    sparse_grads = {"embed": {"embedding": None}, "head": {"kernel": None},
                    "layers": jax.tree.map(lambda x: x[block], grads["layers"])}
    sparse, sparse_state = sparse_update(sparse_grads, state, params, jnp.int32(block))
    for name in ("w", "b"):
      np.testing.assert_array_equal(np.asarray(sparse["layers"][name]),
                                    np.asarray(full["layers"][name][block]))
    assert int(absign_jax.active_block(sparse_state)) == int(
        absign_jax.active_block(next_state))
    params, state = optax.apply_updates(params, full), next_state


def test_a_scale_of_one_is_the_plain_step_bitwise():
  params = make_params(stacked=False)
  plain = absign_jax.absignsgd(LR, weight_decay=0.1)
  scaled = absign_jax.absignsgd(LR, weight_decay=0.1, block_scale=absign_jax.depth_scale(1.0))
  s_plain, s_scaled = plain.init(params), scaled.init(params)
  for k in range(6):
    grads = grads_like(params, k)
    u_plain, s_plain = plain.update(grads, s_plain, params)
    u_scaled, s_scaled = scaled.update(grads, s_scaled, params)
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_scaled)):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                    np.asarray(b).view(np.uint32))
    params = optax.apply_updates(params, u_plain)


def test_depth_scale_is_linear_in_the_block_index():
  scale = absign_jax.depth_scale(0.2, 1.4)
  got = [float(scale(jnp.int32(b), 7)) for b in range(7)]
  np.testing.assert_allclose(got, 0.2 + 1.2 * np.arange(7) / 6, rtol=1e-6)
  assert float(absign_jax.depth_scale(0.3)(jnp.int32(0), 1)) == pytest.approx(0.3)


def test_bad_block_scales_are_refused_before_any_step():
  params = make_params(stacked=False)
  with pytest.raises(TypeError, match="block_scale must be a function"):
    absign_jax.absignsgd(LR, block_scale=[0.5, 1.0])
  with pytest.raises(ValueError, match="shallowest must be a finite number >= 0"):
    absign_jax.depth_scale(-0.5)
  with pytest.raises(ValueError, match="deepest must be a finite number >= 0"):
    absign_jax.depth_scale(0.5, float("nan"))
  negative = absign_jax.absignsgd(LR, block_scale=lambda b, n: 1.0 - b)
  with pytest.raises(ValueError, match=r"finite number >= 0 per block; for 4 blocks"):
    negative.init(params)
  wrong_arity = absign_jax.absignsgd(LR, block_scale=lambda b: 1.0)
  with pytest.raises(ValueError, match=r"block_scale\(block, num_blocks\) failed"):
    wrong_arity.init(params)
