"""Argument checks shared by the optimizers and the selection schemes.

Hyperparameters injected by ``optax.inject_hyperparams`` arrive as arrays, traced
inside ``jit``; those were checked when the optimizer was first built with concrete
numbers, so the checks accept any traced scalar and check the range of concrete
values only. Every error is one line that names the option, the value and what is
accepted.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_float(value: Any) -> float | None:
  """``float(value)`` for a concrete number or 0-d array; None for anything else
  (tracers, schedules, None)."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (int, float, np.number)) or (
      isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0):
    return float(value)
  return None


def _shown(value: Any) -> str:
  """``repr(value)`` and its type, shortened for a one-line message."""
  text = repr(value).replace("\n", " ")
  if len(text) > 60:
    text = text[:57] + "..."
  return f"{text} ({type(value).__name__})"


def _scalar_kind(value: Any) -> str | None:
  """``"int"``, ``"float"``, ``"bool"`` or ``"other"`` for a number or 0-d array
  (traced included); None for anything else."""
  if isinstance(value, (bool, np.bool_)):
    return "bool"
  if isinstance(value, (int, np.integer)):
    return "int"
  if isinstance(value, (float, np.floating)):
    return "float"
  if isinstance(value, (np.ndarray, jax.Array, jax.core.Tracer)) and np.ndim(value) == 0:
    # jax.dtypes.issubdtype also knows bfloat16, float8 and typed PRNG keys.
    dtype = value.dtype
    if jax.dtypes.issubdtype(dtype, np.bool_):
      return "bool"
    if jax.dtypes.issubdtype(dtype, np.integer):
      return "int"
    if jax.dtypes.issubdtype(dtype, np.floating):
      return "float"
    return "other"
  return None


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
  if lo is None and hi is None:
    return ""
  if hi is None:
    return f" {'>' if lo_open else '>='} {lo:g}"
  if lo is None:
    return f" {'<' if hi_open else '<='} {hi:g}"
  return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_real(owner: str, option: str, value: Any, what: str) -> None:
  """Only the type of :func:`check_number`: a real number (not a bool), or traced.

  Args:
    owner: the function the option belongs to, named first in the message.
    option: the option's name.
    value: the value given.
    what: what is accepted, for the message (e.g. ``"a finite number >= 0"``).

  Raises:
    TypeError: ``value`` is not a real number.
  """
  if _scalar_kind(value) not in ("int", "float"):
    raise TypeError(f"{owner}: {option} must be {what}, got {_shown(value)}.")


def check_number(owner: str, option: str, value: Any, *, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, hi_open: bool = True,
                 none_ok: bool = False) -> None:
  """A real number (a Python int or float, a NumPy scalar, a 0-d array) in a range.

  Bools are rejected. Traced values pass (their range is not known).

  Args:
    owner: the function the option belongs to, named first in the message.
    option: the option's name.
    value: the value given.
    lo: the lower bound, or None.
    hi: the upper bound, or None.
    lo_open: exclude ``lo``.
    hi_open: exclude ``hi``.
    none_ok: accept None.

  Raises:
    TypeError: ``value`` is not a real number.
    ValueError: ``value`` is not finite or outside the range.
  """
  if value is None and none_ok:
    return
  what = f"a finite number{_range_text(lo, hi, lo_open, hi_open)}"
  check_real(owner, option, value, what + (" or None" if none_ok else ""))
  v = concrete_float(value)
  if v is None:
    return
  ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
      hi is None or (v < hi if hi_open else v <= hi))
  if not ok:
    raise ValueError(f"{owner}: {option} must be {what}, got {v:g}.")


def check_int(owner: str, option: str, value: Any, *, lo: int | None = None,
              hi: int | None = None) -> None:
  """An integer (a Python int, a NumPy integer, a 0-d integer array) in ``[lo, hi]``.

  Bools and floats (even ``2.0``) are rejected. Traced values pass.

  Raises:
    TypeError: ``value`` is not an integer.
    ValueError: ``value`` is outside the range.
  """
  if lo is not None and hi is not None:
    what = f"an int in [{lo}, {hi}]"
  else:
    what = "an int" + _range_text(lo, hi, False, False)
  if _scalar_kind(value) != "int":
    raise TypeError(f"{owner}: {option} must be {what}, got {_shown(value)}.")
  if isinstance(value, jax.core.Tracer):
    return
  v = int(value)
  if (lo is not None and v < lo) or (hi is not None and v > hi):
    raise ValueError(f"{owner}: {option} must be {what}, got {v}.")


def check_bool(owner: str, option: str, value: Any) -> None:
  """A Python or NumPy bool (not 0/1, not a string).

  Raises:
    TypeError: ``value`` is not a bool.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}: {option} must be True or False, got {_shown(value)}.")
