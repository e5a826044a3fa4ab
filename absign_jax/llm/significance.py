"""How sure an accuracy is: intervals for one model, a paired test for two.

Exact-match accuracy on a few hundred problems moves by a few points between two
runs of the same method, so a figure without its interval, or two methods compared
without a test, says little. :func:`wilson_interval` is the 95% interval of one
accuracy (Wilson's score interval: sound near 0 and 1, where the normal
approximation is not); :func:`mcnemar` compares two models answering the same
problems by the problems where they disagree (McNemar's exact test), which is far
more sensitive than comparing two intervals.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

__all__ = ["Interval", "PairedTest", "wilson_interval", "mcnemar"]

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


class Interval(NamedTuple):
  """An estimated proportion and its confidence interval."""

  estimate: float
  low: float
  high: float


class PairedTest(NamedTuple):
  """McNemar's exact test of two models on the same problems.

  Attributes:
    only_first: problems the first model got right and the second wrong.
    only_second: problems the second got right and the first wrong.
    p_value: two-sided exact p-value of "both are equally accurate".
    difference: accuracy of the first minus that of the second.
  """

  only_first: int
  only_second: int
  p_value: float
  difference: float


def wilson_interval(correct: int, total: int, z: float = Z_95) -> Interval:
  """Wilson's score interval of ``correct / total`` (95% by default).

  >>> lo, hi = wilson_interval(45, 500)[1:]
  >>> round(lo, 4), round(hi, 4)
  (0.0679, 0.1183)
  """
  if total <= 0 or not 0 <= correct <= total:
    raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
  p = correct / total
  denom = 1 + z * z / total
  centre = (p + z * z / (2 * total)) / denom
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
  # (the bounds hold p exactly: at 0 or 1, rounding could leave it just outside)
  return Interval(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> PairedTest:
  """McNemar's exact test: are two models equally accurate on these problems?

  Only the discordant problems count: under the null hypothesis each is equally
  likely to favour either model, so the smaller count is binomial(n, 1/2).

  Args:
    first: Per problem, whether the first model answered correctly.
    second: The same for the second model, problem by problem.

  >>> mcnemar([True] * 12 + [False] * 8, [False] * 12 + [False] * 8).p_value < 0.001
  True
  """
  if len(first) != len(second) or not first:
    raise ValueError("mcnemar needs two equally long, non-empty lists of outcomes "
                     f"(got {len(first)} and {len(second)})")
  b = sum(1 for x, y in zip(first, second) if x and not y)
  c = sum(1 for x, y in zip(first, second) if y and not x)
  n = b + c
  if n == 0:
    p = 1.0
  else:
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    p = min(1.0, 2.0 * tail)
  return PairedTest(b, c, p, (b - c) / len(first))
