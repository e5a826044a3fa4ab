"""Changing the depth bias between steps (``with_depth_bias``, ``set_depth_bias``),
checked against a reference in exact rationals."""

from __future__ import annotations

import collections
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import absign_jax
from absign_jax.blocks import selection


def taus(n: int, c) -> list[Fraction]:
  return [Fraction(n) + Fraction(c) * (n - i) for i in range(n)]


def reference(n: int, c0, c1, before: int, after: int) -> list[int]:
  """Picks of the rule with bias ``c0`` for ``before`` steps, then ``c1``: each
  block's remaining wait scaled by its new cost over its old one, rounded down to the
  new table's resolution (its least common denominator)."""
  tau0, tau1 = taus(n, c0), taus(n, c1)
  t, picks = list(tau0), []
  for k in range(before + after):
    if k == before:
      now = min(t)
      unit = math.lcm(*(x.denominator for x in tau1))
      t = [Fraction(math.floor((t[i] - now) * tau1[i] * unit / tau0[i]), unit)
           for i in range(n)]
    tau = tau0 if k < before else tau1
    s = min(range(n), key=lambda i: (t[i], i))
    t[s] += tau[s]
    picks.append(s)
  return picks


def picks_with_change(n: int, c0, c1, before: int, after: int):
  scheme = selection.depth_biased(c0)
  state, picks = scheme.init(n), []
  select = jax.jit(scheme.select)
  for k in range(before + after):
    if k == before:
      state = selection.with_depth_bias(state, c1)
    block, state = select(state)
    picks.append(int(block))
  return picks, state


@pytest.mark.parametrize("c0,c1", [(10, 0), (0, 10), (10, 2.5), (2.5, 7.75), (4, 4)])
def test_picks_after_a_change_follow_the_reference(c0, c1):
  got, _ = picks_with_change(9, c0, c1, before=31, after=120)
  assert got == reference(9, c0, c1, before=31, after=120)


def test_visit_rates_after_a_change_follow_the_new_costs():
  n, after = 12, 2400
  got, state = picks_with_change(n, 10.0, 0.0, before=200, after=after)
  counts = collections.Counter(got[-after:])
  assert max(counts.values()) - min(counts.values()) <= 2  # round-robin at bias 0
  got, _ = picks_with_change(n, 0.0, 10.0, before=200, after=after)
  rate = np.asarray([1 / float(t) for t in taus(n, 10)])
  want = after * rate / rate.sum()
  counts = collections.Counter(got[-after:])
  np.testing.assert_allclose([counts[i] for i in range(n)], want, atol=3)
  assert state.costs.dtype == jnp.int32 and state.clock.dtype == jnp.int32


def test_the_same_bias_changes_nothing():
  scheme = selection.depth_biased(10.0)
  state = scheme.init(6)
  for _ in range(17):
    _, state = scheme.select(state)
  same = selection.with_depth_bias(state, 10.0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(same)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_set_depth_bias_reaches_the_optimizer_without_a_retrace():
  params = {"layers": [{"w": jnp.ones(3)} for _ in range(5)]}
  tx = absign_jax.absignsgd(1e-3, depth_bias=10.0)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  state, blocks = tx.init(params), []
  for k in range(40):
    if k == 10:
      state = absign_jax.set_depth_bias(state, 0.0)
    blocks.append(int(absign_jax.active_block(state)))
    _, state = update(grads, state, params)
  assert update._cache_size() == 1  # pylint: disable=protected-access
  counts = collections.Counter(blocks[-25:])
  assert sorted(counts) == list(range(5)) and max(counts.values()) - min(counts.values()) <= 1
  assert absign_jax.find_state(state).selection.costs.tolist() == [5] * 5


def test_a_change_is_refused_where_there_is_no_depth_bias():
  params = {"layers": [{"w": jnp.ones(3)} for _ in range(3)]}
  uniform = absign_jax.absignsgd(1e-3, selection="uniform").init(params)
  with pytest.raises(ValueError, match="selects blocks with 'uniform'; a depth bias "
                     "applies to selection='depth_biased' only"):
    absign_jax.set_depth_bias(uniform, 1.0)
  with pytest.raises(ValueError, match="no block-coordinate state"):
    absign_jax.set_depth_bias({"count": jnp.zeros(())}, 1.0)
  user_costs = selection.costs([1.0, 3.0, 2.0]).init(3)
  with pytest.raises(ValueError, match="needs the state of a depth-biased selection"):
    selection.with_depth_bias(user_costs, 1.0)
  with pytest.raises(ValueError, match="depth_bias must be finite and >= 0"):
    selection.with_depth_bias(selection.depth_biased(1.0).init(3), -1.0)
