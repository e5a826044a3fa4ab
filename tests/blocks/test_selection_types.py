"""Selection constructors: options of the wrong type are one-line errors.

The message names the constructor, the option, the value and what is accepted;
bools never pass for a number.
"""

from __future__ import annotations

import pytest

from absign_jax.blocks import selection


def one_line(excinfo) -> str:
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


@pytest.mark.parametrize("make, kind, match", [
    (lambda: selection.depth_biased("10"), TypeError,
     r"^depth_biased: depth_bias must be a finite number >= 0, got '10' \(str\)\.$"),
    (lambda: selection.depth_biased(True), TypeError, r"got True \(bool\)"),
    (lambda: selection.uniform("x"), TypeError,
     r"^uniform: seed must be an int in \[0, 4294967295\], got 'x' \(str\)\.$"),
    (lambda: selection.uniform(False), TypeError, r"uniform: seed must be an int"),
    (lambda: selection.random_reshuffle(1.5), TypeError,
     r"random_reshuffle: seed must be an int .* got 1.5 \(float\)"),
    (lambda: selection.random_reshuffle(-3), ValueError, r"seed must be .* got -3"),
    (lambda: selection.cyclic("yes"), TypeError,
     r"cyclic: descending must be True or False, got 'yes' \(str\)"),
    (lambda: selection.costs("123"), TypeError,
     r"costs: tau must be a sequence of numbers > 0"),
    (lambda: selection.costs([1.0, "2"]), TypeError,
     r"costs: tau\[1\] must be a finite number > 0, got '2' \(str\)"),
    (lambda: selection.costs([1.0, True]), TypeError, r"tau\[1\] .* got True"),
    (lambda: selection.fixed_order(3), TypeError,
     r"fixed_order: order must be a sequence of block ids \(ints\), got 3 \(int\)"),
    (lambda: selection.fixed_order([0, 1.0]), TypeError,
     r"fixed_order: order\[1\] must be an int, got 1.0 \(float\)"),
    (lambda: selection.resolve(None), TypeError,
     r"selection must be a scheme name .* got None \(NoneType\)"),
    (lambda: selection.cyclic().init(True), ValueError, r"num_blocks must be a positive int"),
])
def test_selection_constructors(make, kind, match):
  with pytest.raises(kind, match=match) as excinfo:
    make()
  one_line(excinfo)
