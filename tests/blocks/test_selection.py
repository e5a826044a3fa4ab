"""Block selection schemes, checked against independent references."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import absign_jax
from absign_jax.blocks import selection


# ---------------------------------------------------------------------------------
# An independent reference of the selection rule: exact rationals, unbounded Python integers,
# no rescaling and no clock shifting.
# ---------------------------------------------------------------------------------


def ref_taus(n: int, c) -> list[Fraction]:
  c = Fraction(c)
  return [Fraction(n) + c * (n - i) for i in range(n)]


def ref_run(tau: list[Fraction], steps: int, clock: list[Fraction] | None = None):
  """Returns (picks, final clock). Ties go to the lower index."""
  t = list(tau) if clock is None else list(clock)
  picks = []
  for _ in range(steps):
    s = min(range(len(t)), key=lambda i: (t[i], i))
    t[s] += tau[s]
    picks.append(s)
  return picks, t


def run_scheme(scheme, state, steps):
  """Runs ``steps`` selections from ``state``: (picks, final state, max clock)."""

  @jax.jit
  def go(state):
    def body(s, _):
      b, s = scheme.select(s)
      return s, (b, jnp.max(s.clock))
    return jax.lax.scan(body, state, None, length=steps)

  state, (picks, clock_max) = go(state)
  return np.asarray(picks), state, np.asarray(clock_max)


# ---------------------------------------------------------------------------------
# Depth-biased
# ---------------------------------------------------------------------------------


def test_first_twelve_picks_n36():
  expected = [35, 34, 33, 32, 31, 35, 30, 29, 34, 28, 27, 33]
  assert selection.schedule("depth_biased", 36, 12).tolist() == expected
  assert selection.schedule(selection.depth_biased(10.0), 36, 12).tolist() == expected
  assert ref_run(ref_taus(36, 10), 12)[0] == expected


@pytest.mark.parametrize("n,c", [(36, 10), (12, 10), (7, 2.5), (5, 0.3), (32, 1), (3, 0)])
def test_depth_biased_matches_reference(n, c):
  steps = 3000
  got = selection.schedule(selection.depth_biased(c), n, steps)
  want, _ = ref_run(ref_taus(n, c), steps)
  assert got.tolist() == want


def test_first_pick_is_deepest():
  for n in (1, 2, 5, 30):
    assert selection.schedule("depth_biased", n, 1).tolist() == [n - 1]


def test_ties_go_to_shallower_block():
  # c = 0: every block costs N, so every choice is a tie: round robin from block 0.
  assert selection.schedule(selection.depth_biased(0), 4, 9).tolist() == [
      0, 1, 2, 3, 0, 1, 2, 3, 0]
  # T = (2, 1, 2): block 1 first, then (2, 2, 2): a three-way tie -> block 0.
  got = selection.schedule(selection.costs([2, 1, 2]), 3, 6).tolist()
  assert got[:2] == [1, 0]
  assert got == ref_run([Fraction(2), Fraction(1), Fraction(2)], 6)[0]


def test_long_run_frequency_follows_inverse_cost():
  n, c = 32, 10
  steps = 40_000
  picks = selection.schedule("depth_biased", n, steps)
  visits = np.bincount(picks, minlength=n).astype(np.float64)
  tau = np.array([n + c * (n - i) for i in range(n)], np.float64)
  ratio = visits[-1] / visits[0]
  assert ratio == pytest.approx(n * (1 + c) / (n + c), rel=0.02)  # 8.38
  assert ratio == pytest.approx(8.38, abs=0.15)
  f = visits / visits.sum()
  np.testing.assert_allclose(f, (1 / tau) / (1 / tau).sum(), rtol=0.03)


def test_visit_counters_in_state():
  scheme = selection.depth_biased(10)
  picks, state, _ = run_scheme(scheme, scheme.init(6), 500)
  assert int(state.count) == 500
  np.testing.assert_array_equal(np.asarray(state.visits), np.bincount(picks, minlength=6))


def test_clock_stays_bounded():
  n, c = 36, 10
  scheme = selection.depth_biased(c)
  _, state, clock_max = run_scheme(scheme, scheme.init(n), 20_000)
  tau = np.asarray(state.costs)
  assert state.clock.dtype == jnp.int32
  assert clock_max.max() <= 2 * tau.max()
  assert int(jnp.min(state.clock)) == 0


def test_exact_after_1e8_steps():
  """The state at step 10^8 (computed exactly) continues like the exact reference.

  With integer costs the schedule is periodic: after P = sum_i L / tau_i steps,
  L = lcm(tau), every T_i has grown by exactly L. That lets the reference jump to
  step 10^8 exactly, where T ~ 10^9 is far beyond float32's exact integers.
  """
  n, c = 5, 10
  tau = ref_taus(n, c)
  ints = [int(t) for t in tau]
  lcm = math.lcm(*ints)
  period = sum(lcm // t for t in ints)
  picks_p, t_p = ref_run(tau, period)
  assert t_p == [t + lcm for t in tau]  # the periodicity the jump relies on
  big = 10**8
  q, r = divmod(big, period)
  _, t_r = ref_run(tau, r)
  t_big = [t + q * lcm for t in t_r]  # exact reference clock after 10^8 steps
  assert max(t_big) > 2**24 * 10  # float32 cannot hold these exactly

  cont = 3000
  want, _ = ref_run(tau, cont, clock=t_big)

  scheme = selection.depth_biased(c)
  state = scheme.init(n)
  lo = min(t_big)
  state = state._replace(
      count=jnp.asarray(big, jnp.int32),
      clock=jnp.asarray([int(t - lo) for t in t_big], jnp.int32))
  got, end, _ = run_scheme(scheme, state, cont)
  assert got.tolist() == want
  assert int(end.count) == big + cont

  # A float32 accumulation of the same clock gets it wrong: the test can fail.
  t32 = np.asarray([float(t) for t in t_big], np.float32)
  tau32 = np.asarray([float(t) for t in tau], np.float32)
  naive = []
  for _ in range(cont):
    s = int(np.argmin(t32))
    t32[s] = t32[s] + tau32[s]
    naive.append(s)
  assert naive != want


def test_side_by_side_from_a_shifted_clock():
  """A clock shifted by a huge constant (exact in Python) selects the same."""
  n, c = 9, 2.5
  tau = ref_taus(n, c)
  shift = Fraction(10**12)
  want, _ = ref_run(tau, 2000, clock=[t + shift for t in tau])
  assert selection.schedule(selection.depth_biased(c), n, 2000).tolist() == want


# ---------------------------------------------------------------------------------
# Other schemes
# ---------------------------------------------------------------------------------


def test_uniform_reproducible_and_seeded():
  a = selection.schedule(selection.uniform(seed=3), 8, 400)
  b = selection.schedule(selection.uniform(seed=3), 8, 400)
  c = selection.schedule(selection.uniform(seed=4), 8, 400)
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.5
  assert a.min() >= 0 and a.max() <= 7


def test_uniform_is_roughly_uniform():
  n, steps = 8, 16_000
  picks = selection.schedule(selection.uniform(seed=0), n, steps)
  counts = np.bincount(picks, minlength=n)
  expected = steps / n
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 30, counts  # 7 degrees of freedom: p ~ 1e-4
  assert len(set(picks[:50].tolist())) > 4


def test_cyclic_ascending_and_descending():
  assert selection.schedule("cyclic", 4, 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
  assert selection.schedule("cyclic_descending", 4, 10).tolist() == [
      3, 2, 1, 0, 3, 2, 1, 0, 3, 2]
  assert selection.schedule("descending", 3, 4).tolist() == [2, 1, 0, 2]


def test_random_reshuffle_is_a_permutation_per_pass():
  n, passes = 6, 40
  picks = selection.schedule(selection.random_reshuffle(seed=1), n, n * passes)
  chunks = picks.reshape(passes, n)
  for chunk in chunks:
    assert sorted(chunk.tolist()) == list(range(n))
  distinct = {tuple(ch) for ch in chunks.tolist()}
  assert len(distinct) > passes // 2  # fresh permutations, not one repeated order
  other = selection.schedule(selection.random_reshuffle(seed=2), n, n * passes)
  assert (picks != other).any()
  np.testing.assert_array_equal(
      picks, selection.schedule(selection.random_reshuffle(seed=1), n, n * passes))


def test_costs_follow_inverse_tau():
  tau = [1.0, 2.0, 4.0, 0.5]
  picks = selection.schedule(selection.costs(tau), 4, 15_000)
  f = np.bincount(picks, minlength=4) / len(picks)
  inv = 1 / np.asarray(tau)
  np.testing.assert_allclose(f, inv / inv.sum(), rtol=0.01)
  # Same exact sequence as the reference with these rational costs.
  want, _ = ref_run([Fraction(t) for t in tau], 500)
  assert picks[:500].tolist() == want


def test_fixed_order_repeats():
  got = selection.schedule(selection.fixed_order([2, 0, 2, 1]), 3, 10).tolist()
  assert got == [2, 0, 2, 1, 2, 0, 2, 1, 2, 0]


def test_state_is_a_pytree_that_resumes():
  """Checkpoint round trip: numpy copy of the state continues the same sequence."""
  scheme = selection.uniform(seed=7)
  full, _, _ = run_scheme(scheme, scheme.init(5), 60)
  _, mid, _ = run_scheme(scheme, scheme.init(5), 25)
  restored = jax.tree.map(lambda x: jnp.asarray(np.array(x)), mid)
  rest, _, _ = run_scheme(scheme, restored, 35)
  np.testing.assert_array_equal(full[25:], rest)


# ---------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------


def test_negative_depth_bias():
  with pytest.raises(ValueError, match="depth_bias"):
    selection.depth_biased(-1.0)
  with pytest.raises(ValueError, match="depth_bias"):
    selection.depth_biased(float("nan"))


def test_unknown_scheme_lists_choices():
  with pytest.raises(ValueError, match="unknown selection scheme 'bogus'.*uniform"):
    selection.resolve("bogus")
  with pytest.raises(ValueError, match="unknown selection scheme"):
    absign_jax.absignsgd(1e-3, selection="bogus")


def test_empty_fixed_order():
  with pytest.raises(ValueError, match="empty"):
    selection.fixed_order([])


def test_out_of_range_fixed_order():
  scheme = selection.fixed_order([0, 5, -1])
  with pytest.raises(ValueError, match=r"\[5, -1\].*outside 0\.\.2"):
    scheme.init(3)


def test_bad_costs_and_block_counts():
  with pytest.raises(ValueError, match="tau"):
    selection.costs([1.0, 0.0])
  with pytest.raises(ValueError, match="tau"):
    selection.costs([])
  with pytest.raises(ValueError, match="2 costs for 3 blocks"):
    selection.costs([1.0, 2.0]).init(3)
  with pytest.raises(ValueError, match="num_blocks"):
    selection.cyclic().init(0)
  with pytest.raises(ValueError):
    selection.depth_biased().init(0)
