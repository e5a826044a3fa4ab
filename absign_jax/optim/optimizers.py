"""Composed optimizers: ABSignSGD, a BAdam-style block Adam, full sign descent.

Each is a short ``optax.chain`` of the block-coordinate wrapper, an inner
transformation and the learning rate, in the optax style.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absign_jax._checks import (
    check_bool, check_int, check_real, concrete_float)
from absign_jax.optim.block_coordinate import (
    BlockOptions, BlockScale, block_coordinate, takes_block_options)

ScalarOrSchedule = float | jax.Array | optax.Schedule


# Steps at which a callable schedule is checked when the optimizer is built: every
# step of the first thousand (warm-up), then log-spaced up to ten million.
_PROBE_STEPS = np.unique(np.concatenate([
    np.arange(1000), np.logspace(3, 7, 41).astype(np.int64)])).astype(np.int32)


def _check_schedule(schedule, name: str) -> None:
  """Evaluates ``schedule`` on the host at :data:`_PROBE_STEPS`; errors name a bad step."""
  try:
    values = np.asarray(jax.vmap(schedule)(jnp.asarray(_PROBE_STEPS)), np.float64)
  except Exception:  # pylint: disable=broad-except
    # Not vmappable (host-side Python control flow): evaluate step by step, briefly.
    values = np.asarray([float(schedule(int(k))) for k in _PROBE_STEPS[:100]], np.float64)
  bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
  if bad.size:
    k = int(_PROBE_STEPS[bad[0]])
    raise ValueError(
        f"{name}: the learning-rate schedule returns {values[bad[0]]:g} at step {k}; "
        "a learning rate must be finite and >= 0 at every step (a negative one "
        "climbs the loss). Fix the schedule's start/end values.")


def check_hyperparams(learning_rate: ScalarOrSchedule, weight_decay: float = 0.0,
                      name: str = "optimizer") -> None:
  """Clear errors for a learning rate <= 0 or NaN, and decay that flips signs.

  A callable schedule is evaluated on the host when the optimizer is built, at every
  step below 1000 and at log-spaced steps up to 10^7: a negative or non-finite value
  is an error that names the step. Traced values (inside ``inject_hyperparams``) are
  not checked here; :func:`checked_learning_rate` guards them inside the program.

  Raises:
    TypeError: a learning rate that is neither a number nor a schedule, a weight
      decay that is not a number (bools are neither).
    ValueError: a value out of range.
  """
  if isinstance(learning_rate, (bool, np.bool_)) or (
      isinstance(learning_rate, (np.ndarray, jax.Array))
      and (np.ndim(learning_rate) or learning_rate.dtype == np.bool_)):
    raise TypeError(f"{name}: learning_rate must be a number > 0 or an optax schedule "
                    f"(a callable of the step), got {learning_rate!r} "
                    f"({type(learning_rate).__name__}).")
  check_real(name, "weight_decay", weight_decay, "a finite number >= 0")
  lr = concrete_float(learning_rate)
  if lr is not None:
    # An array is a value injected by optax.inject_hyperparams, often a schedule's
    # value, where 0 is legitimate (warm-up start, end of a decay to 0).
    zero_ok = isinstance(learning_rate, (np.ndarray, jax.Array))
    if not (math.isfinite(lr) and (lr > 0 or (zero_ok and lr == 0))):
      raise ValueError(f"{name}: learning_rate must be a finite number > 0, got {lr}.")
  elif callable(learning_rate):
    _check_schedule(learning_rate, name)
  elif not isinstance(learning_rate, jax.core.Tracer):
    raise TypeError(f"{name}: learning_rate must be a number > 0 or an optax schedule "
                    f"(a callable of the step), got {learning_rate!r} "
                    f"({type(learning_rate).__name__}).")
  wd = concrete_float(weight_decay)
  if wd is not None:
    if not (math.isfinite(wd) and wd >= 0):
      raise ValueError(f"{name}: weight_decay must be finite and >= 0, got {wd}.")
    if lr is not None and lr * wd >= 1:
      raise ValueError(
          f"{name}: learning_rate * weight_decay = {lr * wd:g} >= 1 would flip the "
          "sign of every weight it decays; lower one of them.")


def _check_range(name: str, option: str, value, lo: float, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = True) -> None:
  """A number; a concrete ``value`` must lie in the range. Messages name the option."""
  rng = f"{'(' if lo_open else '['}{lo:g}, {'inf)' if hi is None else f'{hi:g}'}"
  rng += "" if hi is None else (")" if hi_open else "]")
  check_real(name, option, value, f"a finite number in {rng}")
  if concrete_float(value) is None:
    return
  v = float(value)
  ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (
      hi is None or (v < hi if hi_open else v <= hi))
  if not ok:
    raise ValueError(f"{name}: {option} must be finite and in {rng}, got {v:g}.")


def checked_learning_rate(learning_rate: ScalarOrSchedule) -> ScalarOrSchedule:
  """``learning_rate`` guarded inside the compiled program.

  A value that is only known inside ``jit`` (a schedule, or an array injected by
  ``optax.inject_hyperparams``) and is negative or NaN becomes NaN, so the update is
  NaN instead of a silent step up the loss: a plain loop sees NaN parameters and
  loss, the training steps skip the step and raise after their limit of consecutive
  skipped steps. A Python number was checked when the optimizer was built.
  """
  def guard(lr):
    lr = jnp.asarray(lr)
    return jnp.where(lr >= 0, lr, jnp.nan).astype(lr.dtype)

  if callable(learning_rate):
    return lambda count: guard(learning_rate(count))
  if isinstance(learning_rate, (int, float, np.number)):
    return learning_rate
  return guard(learning_rate)


class ScaleByParamRmsState(NamedTuple):
  """:func:`scale_by_param_rms` keeps no state."""


def scale_by_param_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the RMS of that leaf's parameters.

  ``u <- u * max(rms(p), min_scale)``, computed in float32. After a sign this makes
  the step *relative*: every leaf moves by the same fraction of its typical weight,
  so one learning rate suits matrices (RMS ~ 0.02) and norm scales (RMS ~ 1) alike,
  and transfers between model families whose weights have other scales. The floor
  (Adafactor's ``epsilon2``) lets leaves that start at zero move.

  Args:
    min_scale: the smallest scale a leaf gets (> 0).

  Returns:
    An ``optax.GradientTransformation`` (stateless; needs ``params`` in ``update``).
  """
  _check_range("scale_by_param_rms", "min_scale", min_scale, 0.0, lo_open=True)

  def init(params):
    del params
    return ScaleByParamRmsState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_rms needs the parameters: call "
                       "update(updates, state, params).")

    def scale(u, p):
      if u is None:
        return None
      p32 = jnp.asarray(p, jnp.float32)
      rms = jnp.sqrt(jnp.mean(jnp.square(p32))) if p32.size else jnp.float32(0)
      return (u * jnp.maximum(rms, min_scale)).astype(u.dtype)

    return jax.tree.map(scale, updates, params, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init, update)


@takes_block_options()
def absignsgd(
    learning_rate: ScalarOrSchedule = 1e-3,
    *,
    weight_decay: float = 0.0,
    relative: bool = False,
    min_scale: float = 1e-3,
    momentum: float | None = None,
    steps_per_block: int = 1,
    block_scale: BlockScale | None = None,
    blocks: BlockOptions = BlockOptions(),
) -> optax.GradientTransformationExtraArgs:
  r"""ABSignSGD: sign descent on one block (transformer layer) per step.

  For the active block ``i``, every leaf ``p`` with gradient ``g`` becomes
  ``(1 - lr * wd) * p - lr * sign(g)``; all other leaves stay bit-identical. Then the
  selection scheme picks the next block (depth-biased by default: deeper layers,
  cheaper to backpropagate to, are picked more often).

  Gradient clipping and positive loss scaling never change ``sign(g)``, so neither is
  needed in front of this optimizer.

  Args:
    learning_rate: a float or an optax schedule (counted in optimizer steps). The
      default, 1e-3, is the best of the equal-wall-clock sweep on SmolLM2-135M in
      docs/tasks.md (with warm-up and a cosine decay to 1e-4; 3e-4 and 3e-3 were
      worse). A constant 1e-3 over a long run is too high for chat behaviour there:
      decay it.
    weight_decay: decoupled decay, applied to the active block only.
    relative: step relative to each leaf's scale: ``-lr * max(rms(p), min_scale) *
      sign(g)`` for every leaf ``p`` of the active block (per layer for stacked
      leaves; see :func:`scale_by_param_rms`). The learning rate is then a fraction
      of each weight's RMS, so it needs a larger value than the absolute step.
    min_scale: with ``relative``, the smallest scale a leaf gets.
    momentum: ``beta`` of a momentum of the active block only (Signum on the block),
      or None (none; a number, even 0, adds the buffer to the state's structure):
      the step is ``sign(m)`` with ``m <- beta m + (1 - beta) g``, and ``m`` starts
      from zero whenever another block becomes active, so it holds one block's
      buffers (per group of layers with one shape), not the model's. It needs
      ``steps_per_block > 1``: with one step per visit ``sign(m) = sign(g)``.
    steps_per_block: updates of a block before the selection picks the next one.
    block_scale: a multiplier of each block's step, a function ``(block,
      num_blocks) -> number`` (see :func:`block_coordinate`), e.g.
      ``absign_jax.depth_scale(0.5)``: half the step on the first layer, rising
      linearly to the full step on the last. None: the same step everywhere. With
      ``optax.inject_hyperparams``, name it in ``static_args``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: an option of the wrong type (e.g. a string for a number, a bool for
      an int); the message names it and what it accepts.
    ValueError: an option out of range, ``momentum`` outside ``[0, 1)``, or a
      momentum with ``steps_per_block`` 1 (it would change nothing).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import absign_jax
    >>> params = {"layers": [{"w": jnp.ones(3)}, {"w": jnp.ones(3)}]}
    >>> tx = absign_jax.absignsgd(0.1)
    >>> state = tx.init(params)
    >>> int(absign_jax.active_block(state))   # the deepest layer goes first
    1
    >>> grads = {"layers": [{"w": jnp.ones(3)}, {"w": -jnp.ones(3)}]}
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["layers"][1]["w"].tolist()
    [1.100000023841858, 1.100000023841858, 1.100000023841858]
  """
  check_hyperparams(learning_rate, weight_decay, "absignsgd")
  check_bool("absignsgd", "relative", relative)
  _check_range("absignsgd", "min_scale", min_scale, 0.0, lo_open=True)
  if momentum is not None:
    check_real("absignsgd", "momentum", momentum, "a number in [0, 1) or None")
  check_int("absignsgd", "steps_per_block", steps_per_block, lo=1)
  beta = None if momentum is None else concrete_float(momentum)  # None: traced
  if beta is not None and not 0.0 <= beta < 1.0:
    raise ValueError(f"absignsgd: momentum must be in [0, 1), got {beta}.")
  if momentum is not None and concrete_float(steps_per_block) == 1:
    raise ValueError(
        "absignsgd: a momentum needs steps_per_block > 1: the buffer restarts from "
        "zero when the block changes, so with one step per visit sign(m) = sign(g). "
        "Set steps_per_block (e.g. 10), or drop momentum.")
  # The chain's structure never depends on a value inject_hyperparams may trace: the
  # decay is always there (optax skips a Python 0), the momentum whenever given.
  average = () if momentum is None else (optax.ema(momentum, debias=False),)
  step = (*average, optax.scale_by_sign()) + (
      (scale_by_param_rms(min_scale),) if relative else ())
  inner = optax.chain(*step, optax.add_decayed_weights(weight_decay))
  return optax.chain(
      block_coordinate(inner, steps_per_block=steps_per_block,
                       reset_on_switch=bool(average), block_scale=block_scale,
                       **blocks._asdict()),
      optax.scale_by_learning_rate(checked_learning_rate(learning_rate)),
  )


@takes_block_options(selection="random_reshuffle")
def block_adam(
    learning_rate: ScalarOrSchedule = 1e-5,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    steps_per_block: int = 50,
    blocks: BlockOptions = BlockOptions(),
) -> optax.GradientTransformationExtraArgs:
  """A BAdam-style baseline: Adam on one block for ``steps_per_block`` steps.

  The Adam moments exist for one block only and are reset at every switch (BAdam's
  memory saving); the order is a fresh random permutation per pass by default, or
  ``"cyclic"`` / ``"cyclic_descending"``.

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's denominator offset.
    weight_decay: decoupled decay, applied to the active block only.
    steps_per_block: Adam steps on a block before the next one (BAdam's K).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: an option of the wrong type.
    ValueError: an option out of range.
  """
  check_hyperparams(learning_rate, weight_decay, "block_adam")
  _check_range("block_adam", "b1", b1, 0.0, 1.0)
  _check_range("block_adam", "b2", b2, 0.0, 1.0)
  _check_range("block_adam", "eps", eps, 0.0)
  check_int("block_adam", "steps_per_block", steps_per_block, lo=1)
  inner = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                      optax.add_decayed_weights(weight_decay))
  return optax.chain(
      block_coordinate(inner, steps_per_block=steps_per_block, reset_on_switch=True,
                       **blocks._asdict()),
      optax.scale_by_learning_rate(checked_learning_rate(learning_rate)),
  )


def sign_sgd(learning_rate: ScalarOrSchedule = 1e-5, *,
             weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Full-parameter sign descent: ``p <- (1 - lr wd) p - lr sign(g)`` on every leaf."""
  check_hyperparams(learning_rate, weight_decay, "sign_sgd")
  return optax.chain(optax.scale_by_sign(), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(checked_learning_rate(learning_rate)))
