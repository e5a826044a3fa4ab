"""Accuracy intervals and the paired test, against SciPy's implementations."""

import numpy as np
import pytest

from absign_jax.llm import significance

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("correct,total", [(0, 500), (1, 500), (45, 500), (250, 500),
                                           (499, 500), (500, 500), (3, 7)])
def test_wilson_interval_matches_scipy(correct, total):
  ref = stats.binomtest(correct, total).proportion_ci(0.95, method="wilson")
  got = significance.wilson_interval(correct, total)
  assert got.estimate == correct / total
  np.testing.assert_allclose([got.low, got.high], [ref.low, ref.high], rtol=0, atol=1e-12)
  assert got.low <= got.estimate <= got.high


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(seed):
  rng = np.random.default_rng(seed)
  n = 500
  a = rng.random(n) < 0.4
  b = np.where(rng.random(n) < 0.2, ~a, a)  # disagree on about a fifth
  b[: seed * 3] = False  # and lean one way, more with the seed
  got = significance.mcnemar(list(a), list(b))
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  assert (got.only_first, got.only_second) == (only_a, only_b)
  ref = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
  assert got.p_value == pytest.approx(ref, rel=1e-9)
  assert got.difference == pytest.approx(a.mean() - b.mean())


def test_mcnemar_of_identical_answers_is_one():
  assert significance.mcnemar([True, False], [True, False]).p_value == 1.0


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="correct <= total"):
    significance.wilson_interval(5, 4)
  with pytest.raises(ValueError, match="equally long"):
    significance.mcnemar([True], [True, False])
