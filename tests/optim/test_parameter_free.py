"""Parameter-free ABSignSGD: ALIAS step sizes on one block per step, against float64
references of the documented block rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from absign_jax import active_block, alias_absignsgd

LAYER = {"b": (2,), "w": (3, 2)}  # sorted: jax dict order


def _depth_biased_order(num_layers, c, visits):
  """The depth-biased rule by hand: tau_i = N + c (N - i), argmin T (ties: lower), T += tau."""
  tau = [num_layers + c * (num_layers - i) for i in range(num_layers)]
  clock = list(tau)
  order = []
  for _ in range(visits):
    s = min(range(num_layers), key=lambda i: (clock[i], i))
    clock[s] += tau[s]
    order.append(s)
  return order


def _layer_trees(seed, num_layers, steps):
  rng = np.random.default_rng(seed)
  new = lambda scale=1.0: {"layers": [
      {k: rng.normal(loc=0.3, size=s) * scale for k, s in LAYER.items()}
      for _ in range(num_layers)]}
  return new(), [new(1.0 / (1 + t)) for t in range(steps)]


def _lflat(layer):
  return np.concatenate([np.ravel(layer[k]) for k in sorted(LAYER)])


def _block_reference(params, grads, order, k, *, d0=1e-8, l0=1.0, mu=0.0,
                     wd=0.0):
  """The documented block rule in NumPy float64: pairs only within a visit."""
  x = [_lflat(l) for l in params["layers"]]
  s_sum, d_sum, d = l0, 0.0, d0
  g_prev, m, gam_prev = None, None, 0.0
  out = []
  for t, gt in enumerate(grads):
    blk = order[t // k]
    g = _lflat(gt["layers"][blk])
    new_visit = t % k == 0
    if not new_visit:
      prev_sign = np.sign(m if mu > 0 else g_prev)
      if np.any(prev_sign != 0):
        s_sum += np.sum(np.abs(g - g_prev)) / gam_prev
      d_sum += gam_prev * np.dot(g, prev_sign)
      d = max(d, d_sum)
    gam = math.sqrt(d / s_sum)
    m = (0.0 if new_visit or m is None else mu * m) + (1 - mu) * g
    direction = np.sign(m if mu > 0 else g)
    x[blk] = x[blk] - gam * (direction + wd * x[blk])
    g_prev, gam_prev = g, gam
    out.append([v.copy() for v in x])
  return out


@pytest.mark.parametrize("kw", [{}, {"mu": 0.6, "wd": 0.05}, {"k": 3}])
def test_alias_absignsgd_matches_float64_reference(x64, kw):
  k = kw.get("k", 2)
  params, grads = _layer_trees(10, 3, 9)
  order = _depth_biased_order(3, 10.0, 5)
  want = _block_reference(params, grads, order, k, mu=kw.get("mu", 0.0),
                          wd=kw.get("wd", 0.0))
  tx = alias_absignsgd(momentum=kw.get("mu", 0.0),
                       weight_decay=kw.get("wd", 0.0), steps_per_block=k)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    assert int(active_block(state)) == order[t // k]
    before = p
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
    for i, layer in enumerate(p["layers"]):
      np.testing.assert_allclose(_lflat(layer), want[t][i], rtol=1e-12,
                                 atol=1e-12)
      if i != order[t // k]:  # inactive layers are bit-identical
        for key in LAYER:
          assert np.array_equal(np.asarray(layer[key]),
                                np.asarray(before["layers"][i][key]))


def test_alias_absignsgd_estimates_survive_block_switches():
  params, grads = _layer_trees(11, 3, 8)
  tx = alias_absignsgd(steps_per_block=2)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  update = jax.jit(tx.update)
  steps = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, u)
    inner = state[0].inner[0]
    steps.append(float(inner.step_size))
  # 4 visits of 2 steps: 4 pairs, nothing reset at a switch.
  assert int(inner.count) == 8 and int(inner.num_pairs) == 4
  assert float(inner.smoothness_sum) > 1.0
  # The first step of a visit forms no pair and keeps the current estimates:
  # its step equals the previous one (no return to the probe sqrt(d0 / L0)).
  assert steps[0] == pytest.approx(1e-4)
  for t in (2, 4, 6):
    assert steps[t] == steps[t - 1]
  for t in (1, 3, 5, 7):
    assert steps[t] != steps[t - 1]


def test_alias_absignsgd_sparse_block_mode_matches_full_mode():
  params, grads = _layer_trees(12, 3, 6)
  tx = alias_absignsgd()
  full = sparse = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  s_full = s_sparse = tx.init(full)
  update = jax.jit(tx.update, static_argnames="block")
  for g in grads:
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
    b = int(active_block(s_sparse))
    u, s_full = update(g, s_full, full)
    full = optax.apply_updates(full, u)
    g_sparse = {"layers": [g["layers"][i] if i == b else
                           jax.tree.map(lambda _: None, g["layers"][i])
                           for i in range(3)]}
    u, s_sparse = update(g_sparse, s_sparse, sparse, block=b)
    sparse = {"layers": [
        optax.apply_updates(sparse["layers"][i], u["layers"][i]) if i == b
        else sparse["layers"][i] for i in range(3)]}
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(sparse)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_alias_absignsgd_converges_without_learning_rate():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(200, 20)), jnp.float32)
  b = a @ jnp.asarray(rng.normal(size=20), jnp.float32)

  def loss(p):
    x = jnp.concatenate([l["w"] for l in p["layers"]])
    return 0.5 * jnp.mean((a @ x - b) ** 2)

  p0 = {"layers": [{"w": jnp.zeros(5)} for _ in range(4)]}
  tx = alias_absignsgd()

  @jax.jit
  def run(p):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=300)
    return loss(p)

  assert float(run(p0)) < 0.01 * float(loss(p0))


def test_alias_absignsgd_bad_inputs():
  for k in (1, 0, 2.5):
    with pytest.raises(ValueError, match="steps_per_block"):
      alias_absignsgd(steps_per_block=k)
  with pytest.raises(ValueError, match="clamp"):
    alias_absignsgd(clamp=0.0)


