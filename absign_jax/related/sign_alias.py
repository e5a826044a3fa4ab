r"""Parameter-free Sign-SGD step sizes: ALIAS and an SOS-style step-size search.

ALIAS (Medyakov et al., 2025, "Sign-SGD via Parameter-Free Optimization") sets the
Sign-SGD step size from running estimates of the smoothness and of the objective
gap. Sums run over the steps ``t >= 1`` at which a pair of consecutive
gradients exists::

  S_t     = L0 + sum_t ||g_t - g_{t-1}||_1 / ||x_t - x_{t-1}||_inf
  dtil_t  = sum_t gamma_{t-1} * <g_t, sign(u_{t-1})>
  d_t     = max(d_{t-1}, dtil_t)                          (d_0 given)
  gamma_t = min(clamp, sqrt(d_t / S_t))                    (d-form), or
  gamma_t = min(clamp, sqrt((f(x_0) - f_low) / S_t))       (lower-bound form)
  x_{t+1} = x_t - gamma_t * sign(u_t)

where ``u_t = g_t``, or the momentum buffer ``m_t = mu m_{t-1} + (1 - mu) g_t``.
The norms are global over the tree given to the transformation.

This module offers (ALIAS step sizes on ABSignSGD's one-block-per-step updates are
:func:`absign_jax.alias_absignsgd`, with the ABSignSGD family in :mod:`absign_jax.optim`)

* :func:`scale_by_alias`: the step-size transformation (outputs
  ``gamma_t * sign(u_t)``, to be negated), and :func:`alias_sign_sgd`, the
  optimizer;
* :func:`sign_sgd_estimates` and :func:`sos_step_size`: a bisection search for a
  constant Sign-SGD step size driven by the same estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from absign_jax._checks import concrete_float

__all__ = [
    "ScaleByAliasState",
    "SignSGDEstimates",
    "alias_sign_sgd",
    "scale_by_alias",
    "sign_sgd_estimates",
    "sos_step_size",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None


# ----------------------------------------------------------------------------
# Argument checks (concrete values only: traced values from inject_hyperparams
# were checked when the optimizer was first built).




def _check(name: str, value: Any, ok: Callable[[float], bool], what: str) -> None:
  v = concrete_float(value)
  if v is not None and (math.isnan(v) or not ok(v)):
    raise ValueError(f"{name} must be {what}, got {value!r}.")


def _check_alias_args(d0, l0, f_low, clamp, update_gap, warmup_steps,
                      warmup_learning_rate, momentum, weight_decay) -> None:
  _check("d0", d0, lambda v: 0 < v < math.inf, "a finite number > 0")
  _check("l0", l0, lambda v: 0 < v < math.inf, "a finite number > 0")
  _check("f_low", f_low, math.isfinite, "a finite number")
  _check("clamp", clamp, lambda v: v > 0, "a number > 0 (or None)")
  _check("update_gap", update_gap, lambda v: v >= 1 and v == int(v),
         "an integer >= 1")
  _check("warmup_steps", warmup_steps, lambda v: v >= 0 and v == int(v),
         "an integer >= 0")
  _check("warmup_learning_rate", warmup_learning_rate,
         lambda v: 0 <= v < math.inf, "a finite number >= 0")
  _check("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)")
  _check("weight_decay", weight_decay, lambda v: 0 <= v < math.inf,
         "a finite number >= 0")
  steps = concrete_float(warmup_steps)
  if steps is not None and steps > 0 and warmup_learning_rate is None:
    raise ValueError(
        f"warmup_steps={warmup_steps!r} needs warmup_learning_rate (the step "
        "size used during warm-up)."
    )


def _scalar_dtype(tree: Any) -> jnp.dtype:
  """Estimates are kept in at least float32 (float64 under jax_enable_x64)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(optax.tree.dtype(tree, "highest"), jnp.float32)


def _tree_sum(fn: Callable[..., jax.Array], dtype, *trees) -> jax.Array:
  parts = jax.tree.leaves(
      jax.tree.map(lambda *xs: jnp.sum(fn(*(x.astype(dtype) for x in xs))),
                   *trees)
  )
  return sum(parts, jnp.zeros([], dtype))


# ----------------------------------------------------------------------------
# ALIAS.


class ScaleByAliasState(NamedTuple):
  """State of :func:`scale_by_alias`.

  What is stored, and why:

  Attributes:
    count: updates applied so far, ``t`` (int32).
    num_pairs: gradient pairs that entered the estimates so far (int32).
    step_size: ``gamma_{t-1}``, the step of the previous update. It is both
      ``||x_t - x_{t-1}||_inf`` (the sign step moves some coordinate by exactly
      ``gamma_{t-1}``, so no copy of ``x_{t-1}`` is stored) and the step held
      between recomputations when ``update_gap > 1``.
    smoothness_sum: ``S_{t-1}`` (``L0`` plus the local smoothness estimates).
    gap_sum: ``dtil_{t-1}``, the running sum of estimated decreases.
    gap: ``d_{t-1} = max(d0, dtil_1, ..., dtil_{t-1})``.
    initial_value: ``f(x_0)`` (the ``value=`` of the first update) in the
      lower-bound form; 0 in the d-form.
    prev_grad: ``g_{t-1}``, for ``||g_t - g_{t-1}||_1`` and, without momentum,
      for the previous direction ``sign(g_{t-1})``.
    momentum: ``m_{t-1}`` (its sign was the previous direction), or ``None``
      when built with ``momentum == 0``.
    decay: state of the (masked) weight decay, or ``None`` when built with
      ``weight_decay == 0``.
  """

  count: jax.Array
  num_pairs: jax.Array
  step_size: jax.Array
  smoothness_sum: jax.Array
  gap_sum: jax.Array
  gap: jax.Array
  initial_value: jax.Array
  prev_grad: optax.Updates
  momentum: optax.Updates | None
  decay: optax.OptState | None


def scale_by_alias(
    d0: float = 1e-8,
    l0: float = 1.0,
    *,
    f_low: float | None = None,
    clamp: float | None = None,
    update_gap: int = 1,
    warmup_steps: int = 0,
    warmup_learning_rate: optax.ScalarOrSchedule | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ALIAS step sizes for Sign-SGD: outputs ``gamma_t * sign(u_t)``.

  At update ``t`` (``t = 0, 1, ...``) with gradient ``g_t``:

  1. If a previous gradient of the same coordinates exists (``t >= 1``, and not
     ``new_block``), the estimates take one pair::

       S    += ||g_t - g_{t-1}||_1 / gamma_{t-1}   (0 if the previous step did
                                                    not move: sign(u_{t-1}) = 0)
       dtil += gamma_{t-1} * <g_t, sign(u_{t-1})>
       d     = max(d, dtil)

     ``gamma_{t-1} = ||x_t - x_{t-1}||_inf`` holds exactly for the sign step.
     With weight decay the decay's share of the displacement is ignored (it is
     ``gamma * wd * |p|``, small next to ``gamma``). The estimates are updated
     at every step whatever ``update_gap`` is.
  2. The step size:

     * ``t < warmup_steps``: ``gamma_t = warmup_learning_rate`` (a number or a
       schedule of ``t``); the estimates are gathered all the same.
     * otherwise, if ``t % update_gap == 0`` or ``t == warmup_steps``:
       ``gamma_t = min(clamp, sqrt(D / S))`` with ``D = d`` (d-form) or
       ``D = max(f(x_0) - f_low, 0)`` (lower-bound form);
     * otherwise ``gamma_t = gamma_{t-1}`` (held constant).

     **First step convention.** At ``t = 0`` no estimate exists: ``S = L0`` and
     ``d = d0``, so (without warm-up) ``gamma_0 = min(clamp, sqrt(d0 / L0))``,
     a small probe step (``1e-4`` with the defaults). The lower-bound form uses
     the same probe step until the first pair has entered ``S`` (otherwise its
     first step, ``sqrt((f(x_0) - f_low) / L0)``, would rest on the guess
     ``L0`` alone).
  3. The momentum buffer (if any) is ``m_t = mu m_{t-1} + (1 - mu) g_t`` with
     ``m_{-1} = 0`` and ``u_t = m_t``, else ``u_t = g_t``. The output is
     ``gamma_t * (sign(u_t) + weight_decay * p)`` (decay on masked leaves),
     to be negated (see :func:`alias_sign_sgd`).

  Extra arguments of ``update``:

  * ``value``: the loss at the current parameters. Required (at every call,
    as in :func:`optax.polyak_sgd`) in the lower-bound form; only the first is
    used, as ``f(x_0)``.
  * ``new_block``: optional bool. True means the gradient belongs to other
    coordinates than the previous update's (block-coordinate use): no pair is
    formed and the momentum restarts from zero; ``S``, ``d`` and the step size
    are kept. Used by :func:`alias_absignsgd`.

  Args:
    d0: initial gap estimate ``d_0 > 0`` (loss units).
    l0: initial smoothness ``L0 > 0``, added to ``S``.
    f_low: a lower bound of the loss; selects the lower-bound form.
    clamp: the largest allowed step size (``None``: no clamp).
    update_gap: recompute the step size every ``update_gap`` updates.
    warmup_steps: number of first updates taken with ``warmup_learning_rate``.
    warmup_learning_rate: the step size (or schedule) during warm-up.
    momentum: EMA coefficient in ``[0, 1)``; 0 stores no buffer.
    weight_decay: decoupled weight decay, scaled by ``gamma_t``.
    weight_decay_mask: tree of bools or callable selecting the decayed leaves
      (default: all leaves).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state
    :class:`ScaleByAliasState`.

  Raises:
    ValueError: on invalid arguments, or (in ``update``) when the lower-bound
      form is called without ``value=``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from absign_jax.related.sign_alias import scale_by_alias
    >>> tx = scale_by_alias(d0=1e-4, l0=1.0)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> u, state = tx.update(jnp.array([0.5, -3.0]), state)
    >>> [round(v, 6) for v in u.tolist()]  # gamma_0 = sqrt(d0 / L0) = 0.01
    [0.01, -0.01]
  """
  _check_alias_args(d0, l0, f_low, clamp, update_gap, warmup_steps,
                    warmup_learning_rate, momentum, weight_decay)
  no_buffer = concrete_float(momentum) == 0.0
  no_decay = concrete_float(weight_decay) == 0.0
  decay = None if no_decay else optax.add_decayed_weights(
      weight_decay, weight_decay_mask
  )
  lower_bound_form = f_low is not None

  def init_fn(params: optax.Params) -> ScaleByAliasState:
    dtype = _scalar_dtype(params)
    zero = jnp.zeros([], dtype)
    return ScaleByAliasState(
        count=jnp.zeros([], jnp.int32),
        num_pairs=jnp.zeros([], jnp.int32),
        step_size=zero,
        smoothness_sum=jnp.asarray(l0, dtype),
        gap_sum=zero,
        gap=jnp.asarray(d0, dtype),
        initial_value=zero,
        prev_grad=optax.tree.zeros_like(params),
        momentum=None if no_buffer else optax.tree.zeros_like(params),
        decay=None if decay is None else decay.init(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: ScaleByAliasState,
      params: optax.Params | None = None,
      *,
      value: jax.typing.ArrayLike | None = None,
      new_block: jax.typing.ArrayLike | None = None,
      **extra_args,
  ) -> tuple[optax.Updates, ScaleByAliasState]:
    del extra_args
    if lower_bound_form and value is None:
      raise ValueError(
          "alias (lower-bound form, f_low given) needs the loss: call "
          "update(grads, state, params, value=loss)."
      )
    if state.decay is not None and params is None:
      raise ValueError("alias with weight_decay needs params in update().")
    dtype = state.smoothness_sum.dtype
    t = state.count
    fresh = jnp.asarray(False) if new_block is None else jnp.asarray(new_block)

    # 1. One pair (g_{t-1}, g_t) into the estimates.
    pair = (t > 0) & ~fresh
    prev_dir = state.prev_grad if state.momentum is None else state.momentum
    prev_sign = jax.tree.map(jnp.sign, prev_dir)
    moved_any = _tree_sum(jnp.abs, dtype, prev_sign) > 0
    dist = jnp.where(moved_any, state.step_size, 0.0)  # ||x_t - x_{t-1}||_inf
    l1 = _tree_sum(lambda a, b: jnp.abs(a - b), dtype, updates, state.prev_grad)
    inner = _tree_sum(lambda a, b: a * b, dtype, updates, prev_sign)
    use_l = pair & (dist > 0)
    smooth = state.smoothness_sum + jnp.where(
        use_l, l1 / jnp.where(use_l, dist, 1.0), 0.0
    )
    gap_sum = state.gap_sum + jnp.where(pair, state.step_size * inner, 0.0)
    gap = jnp.maximum(state.gap, gap_sum)
    num_pairs = state.num_pairs + pair.astype(jnp.int32)

    # 2. The step size.
    if lower_bound_form:
      f0 = jnp.where(t == 0, jnp.asarray(value, dtype), state.initial_value)
      known = jnp.maximum(f0 - jnp.asarray(f_low, dtype), 0.0)
      numerator = jnp.where(num_pairs > 0, known, gap)
    else:
      f0 = state.initial_value
      numerator = gap
    fresh_step = jnp.sqrt(numerator / smooth)
    if clamp is not None:
      fresh_step = jnp.minimum(jnp.asarray(clamp, dtype), fresh_step)
    recompute = (t % update_gap == 0) | (t == warmup_steps)
    step = jnp.where(recompute, fresh_step, state.step_size)
    if warmup_learning_rate is not None:
      lr = warmup_learning_rate
      lr = lr(t) if callable(lr) else lr
      step = jnp.where(t < warmup_steps, jnp.asarray(lr, dtype), step)

    # 3. Direction and output.
    if state.momentum is None:
      mu = None
      direction = updates
    else:
      mu = jax.tree.map(
          lambda m, g: (
              momentum * jnp.where(fresh, jnp.zeros_like(m), m)
              + (1 - momentum) * g
          ).astype(m.dtype),
          state.momentum,
          updates,
      )
      direction = mu
    direction = jax.tree.map(jnp.sign, direction)
    decay_state = state.decay
    if decay_state is not None and decay is not None:  # inject-safe
      direction, decay_state = decay.update(direction, decay_state, params)
    new_updates = jax.tree.map(
        lambda u, g: (step * u).astype(g.dtype), direction, updates
    )
    return new_updates, ScaleByAliasState(
        count=optax.safe_increment(t),
        num_pairs=num_pairs,
        step_size=step,
        smoothness_sum=smooth,
        gap_sum=gap_sum,
        gap=gap,
        initial_value=f0,
        prev_grad=updates,
        momentum=mu,
        decay=decay_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alias_sign_sgd(
    d0: float = 1e-8,
    l0: float = 1.0,
    *,
    f_low: float | None = None,
    clamp: float | None = None,
    update_gap: int = 1,
    warmup_steps: int = 0,
    warmup_learning_rate: optax.ScalarOrSchedule | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Parameter-free Sign-SGD with ALIAS step sizes (no learning rate).

  ``x_{t+1} = x_t - gamma_t * (sign(u_t) + weight_decay * x_t)`` with the
  step ``gamma_t`` of :func:`scale_by_alias` (see there for the estimates, the
  first-step convention, ``update_gap``, warm-up and momentum). It is
  ``chain(scale_by_alias(...), scale(-1))``.

  Two forms:

  * d-form (default): the gap ``f(x_0) - f*`` is estimated on the fly from
    ``d0`` upwards; the loss is not needed.
  * lower-bound form (``f_low`` given): ``f(x_0) - f_low`` is used instead;
    pass the loss as ``update(grads, state, params, value=loss)``, like
    :func:`optax.polyak_sgd`.

  State: one gradient-sized buffer (the previous gradient), plus the momentum
  buffer when ``momentum > 0``, plus a few scalars.

  Args:
    d0: initial gap estimate (> 0).
    l0: initial smoothness (> 0).
    f_low: a lower bound of the loss (selects the lower-bound form).
    clamp: the largest allowed step size (``None``: no clamp).
    update_gap: recompute the step every ``update_gap`` updates (>= 1).
    warmup_steps: number of first updates taken with ``warmup_learning_rate``.
    warmup_learning_rate: step size (or schedule) during warm-up.
    momentum: use ``sign`` of an EMA of the gradients, coefficient in [0, 1).
    weight_decay: decoupled weight decay, scaled by ``gamma_t``.
    weight_decay_mask: tree of bools or callable selecting the decayed leaves.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from absign_jax.related.sign_alias import alias_sign_sgd
    >>> a = jnp.array([[2.0, 0.5], [0.3, 1.0], [1.0, -1.0]])
    >>> b = jnp.array([1.0, -1.0, 0.5])
    >>> def loss(x):
    ...   return 0.5 * jnp.mean((a @ x - b) ** 2)
    >>> x = jnp.zeros(2)
    >>> tx = alias_sign_sgd()
    >>> state = tx.init(x)
    >>> for _ in range(100):
    ...   updates, state = tx.update(jax.grad(loss)(x), state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> print(bool(loss(x) < 0.5 * loss(jnp.zeros(2))))
    True
  """
  return optax.chain(
      scale_by_alias(
          d0, l0, f_low=f_low, clamp=clamp, update_gap=update_gap,
          warmup_steps=warmup_steps, warmup_learning_rate=warmup_learning_rate,
          momentum=momentum, weight_decay=weight_decay,
          weight_decay_mask=weight_decay_mask,
      ),
      optax.scale(-1.0),
  )


# ----------------------------------------------------------------------------
# SOS-style search for a constant step size.


class SignSGDEstimates(NamedTuple):
  """ALIAS quantities measured along one constant-step Sign-SGD run.

  Attributes:
    step_size: the constant step ``gamma`` of the run.
    smoothness_sum: ``S = L0 + sum_{t=1}^{T-1} ||g_t - g_{t-1}||_1 / gamma``.
    gap: ``D``: ``max(d0, max_t dtil_t)`` with
      ``dtil_t = sum_{s=1}^{t} gamma <g_s, sign(g_{s-1})>`` (d-form), or
      ``max(f(x_0) - f_low, 0)`` (lower-bound form).
    suggested: ``sqrt(D / S)``, the ALIAS step for this run.
    initial_loss: the loss at ``x_0`` on the first batch.
    last_loss: the loss at ``x_{T-1}`` on the last batch.
  """

  step_size: jax.Array
  smoothness_sum: jax.Array
  gap: jax.Array
  suggested: jax.Array
  initial_loss: jax.Array
  last_loss: jax.Array


def _stack_batches(batches: Any) -> tuple[Any, int]:
  if isinstance(batches, list):
    if not batches:
      raise ValueError("batches is an empty list.")
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("batches has no arrays.")
  num = {int(jnp.shape(x)[0]) for x in leaves}
  if len(num) != 1:
    raise ValueError(f"batch leaves disagree on the number of steps: {num}.")
  return batches, num.pop()


def _estimates_fn(loss_fn, d0, l0, f_low):
  """A jitted ``(params, stacked_batches, gamma) -> SignSGDEstimates``."""

  def run(params, batches, gamma):
    dtype = _scalar_dtype(params)
    gamma = jnp.asarray(gamma, dtype)
    vg = jax.value_and_grad(loss_fn)
    first = jax.tree.map(lambda x: x[0], batches)
    f0, g0 = vg(params, first)
    x1 = jax.tree.map(lambda p, g: p - (gamma * jnp.sign(g)).astype(p.dtype),
                      params, g0)
    rest = jax.tree.map(lambda x: x[1:], batches)

    def body(carry, batch):
      x, g_prev, smooth, dsum, dmax = carry
      f, g = vg(x, batch)
      sign_prev = jax.tree.map(jnp.sign, g_prev)
      smooth = smooth + _tree_sum(lambda a, b: jnp.abs(a - b), dtype,
                                  g, g_prev) / gamma
      dsum = dsum + gamma * _tree_sum(lambda a, b: a * b, dtype, g, sign_prev)
      dmax = jnp.maximum(dmax, dsum)
      x = jax.tree.map(lambda p, gg: p - (gamma * jnp.sign(gg)).astype(p.dtype),
                       x, g)
      return (x, g, smooth, dsum, dmax), f

    zero = jnp.zeros([], dtype)
    carry = (x1, g0, jnp.asarray(l0, dtype), zero, jnp.asarray(d0, dtype))
    (_, _, smooth, _, dmax), losses = jax.lax.scan(body, carry, rest)
    if f_low is None:
      gap = dmax
    else:
      gap = jnp.maximum(f0.astype(dtype) - jnp.asarray(f_low, dtype), 0.0)
    last = losses[-1] if losses.shape[0] else f0
    return SignSGDEstimates(gamma, smooth, gap, jnp.sqrt(gap / smooth),
                            f0, last)

  return jax.jit(run)


def sign_sgd_estimates(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Any,
    step_size: float,
    *,
    d0: float = 1e-8,
    l0: float = 1.0,
    f_low: float | None = None,
) -> SignSGDEstimates:
  """Runs constant-step Sign-SGD and returns the ALIAS estimates along it.

  Step ``t = 0, ..., T-1`` uses batch ``t``: ``x_{t+1} = x_t - step_size *
  sign(grad loss_fn(x_t, batch_t))``. The sums take the ``T - 1`` consecutive
  gradient pairs; ``||x_t - x_{t-1}||_inf = step_size``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the starting point ``x_0``.
    batches: a ``list`` of ``T`` batches, or one pytree whose leaves have a
      leading axis of length ``T`` (a tuple is read as one stacked batch).
      For full-batch descent pass the same batch ``T`` times.
    step_size: the constant step ``gamma > 0``.
    d0: initial gap estimate (d-form).
    l0: initial smoothness ``L0``.
    f_low: a lower bound of the loss (lower-bound form).

  Returns:
    A :class:`SignSGDEstimates`.
  """
  _check("step_size", step_size, lambda v: 0 < v < math.inf,
         "a finite number > 0")
  _check_alias_args(d0, l0, f_low, None, 1, 0, None, 0.0, 0.0)
  stacked, _ = _stack_batches(batches)
  return _estimates_fn(loss_fn, d0, l0, f_low)(params, stacked, step_size)


def sos_step_size(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Any,
    *,
    lower: float = 1e-8,
    upper: float = 1.0,
    rtol: float = 0.05,
    max_iters: int = 60,
    d0: float = 1e-8,
    l0: float = 1.0,
    f_low: float | None = None,
) -> float:
  r"""SOS-style search: a constant Sign-SGD step size by bisection.

  For a constant step ``gamma``, run ``T = len(batches)`` Sign-SGD steps from
  ``params`` and measure the ALIAS estimates ``S(gamma)`` and ``D(gamma)``
  (:func:`sign_sgd_estimates`). The step ALIAS would take for that run is
  ``phi(gamma) = sqrt(D(gamma) / S(gamma))``, the constant step that is
  optimal for a horizon of ``T`` steps (``sqrt(Delta / (L T))``) with the
  constants measured along the run itself. The search looks for a fixed point
  ``gamma = phi(gamma)``: a step that is consistent with what it observes.
  Small steps give ``phi(gamma) > gamma``; too large steps oscillate, which
  inflates ``S`` and deflates ``D``, giving ``phi(gamma) < gamma``.

  Stopping rule (chosen here; the paper's exact rule is not public):

  1. Evaluate ``phi(lower)``. If not ``phi(lower) >= lower``, raise
     ``ValueError`` (the bracket's lower end is already too large).
  2. Evaluate ``phi(upper)``. If ``phi(upper) >= upper``, return ``upper``
     (``upper`` acts as a clamp).
  3. Bisect in log space: ``mid = sqrt(lo * hi)``; if ``phi(mid) >= mid``
     (a non-finite ``phi``, from a diverging run, counts as false), set
     ``lo = mid``, else ``hi = mid``.
  4. Stop as soon as ``hi / lo <= 1 + rtol``, or after ``max_iters``
     bisection steps, and return ``lo``: the largest step tried that passed
     ``phi(gamma) >= gamma`` (the conservative end of the final bracket).

  It costs ``2 + min(max_iters, ceil(log2(log(upper / lower) /
  log(1 + rtol))))`` runs of ``T`` steps (11 with the defaults), all from the
  same compiled function.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the starting point.
    batches: ``T >= 2`` batches, as in :func:`sign_sgd_estimates`.
    lower: lower end of the bracket (> 0).
    upper: upper end of the bracket (> lower).
    rtol: relative width of the final bracket (> 0).
    max_iters: the most bisection steps.
    d0: initial gap estimate (d-form).
    l0: initial smoothness ``L0``.
    f_low: a lower bound of the loss (lower-bound form).

  Returns:
    The step size, a Python float. Use it with a constant-step Sign-SGD, e.g.
    ``optax.sign_sgd(step)``, for about ``T`` steps.

  Raises:
    ValueError: on an invalid bracket or arguments.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from absign_jax.related.sign_alias import sos_step_size
    >>> a = jnp.array([[2.0, 0.5], [0.3, 1.0], [1.0, -1.0]])
    >>> b = jnp.array([1.0, -1.0, 0.5])
    >>> def loss(x, batch):
    ...   a, b = batch
    ...   return 0.5 * jnp.mean((a @ x - b) ** 2)
    >>> step = sos_step_size(loss, jnp.zeros(2), [(a, b)] * 50)
    >>> print(0.0 < step < 1.0)
    True
  """
  _check("lower", lower, lambda v: 0 < v < math.inf, "a finite number > 0")
  _check("upper", upper, lambda v: v > float(lower) and v < math.inf,
         "a finite number > lower")
  _check("rtol", rtol, lambda v: v > 0, "a number > 0")
  _check("max_iters", max_iters, lambda v: v >= 0 and v == int(v),
         "an integer >= 0")
  _check_alias_args(d0, l0, f_low, None, 1, 0, None, 0.0, 0.0)
  stacked, num = _stack_batches(batches)
  if num < 2:
    raise ValueError(f"sos_step_size needs at least 2 batches, got {num}.")
  run = _estimates_fn(loss_fn, d0, l0, f_low)

  def passes(gamma: float) -> bool:
    phi = float(run(params, stacked, gamma).suggested)
    return math.isfinite(phi) and phi >= gamma

  lo, hi = float(lower), float(upper)
  if not passes(lo):
    raise ValueError(
        f"sos_step_size: the lower end {lo:g} is already too large "
        "(phi(lower) < lower); pass a smaller `lower`."
    )
  if passes(hi):
    return hi
  for _ in range(int(max_iters)):
    if hi / lo <= 1.0 + rtol:
      break
    mid = math.sqrt(lo * hi)
    if passes(mid):
      lo = mid
    else:
      hi = mid
  return lo
