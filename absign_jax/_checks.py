"""Argument checks shared by the optimizers (concrete values only).

Hyperparameters injected by ``optax.inject_hyperparams`` arrive as traced arrays;
those were checked when the optimizer was first built with concrete numbers, so the
checks skip what is not concrete.
"""

from __future__ import annotations

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
