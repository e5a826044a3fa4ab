"""SGD-SaI ("SGD-Boost"): SGD with momentum and frozen per-tensor step scales.

SGD-SaI (SGD with Scaling at Initialization) scales each tensor's momentum
update by a gradient signal-to-noise ratio (``gsnr``) that is computed once,
from the first gradient, and then frozen. It needs one buffer (the momentum) per
parameter, like SGD with momentum, and one scalar per tensor.

Per tensor ``p`` with gradient ``g_t`` at step ``t = 1, 2, ...``::

  gsnr = ||g_1||_2 / (std(g_1, ddof=1) + eps)        # frozen; NaN (1 element) -> 0
  m_1  = g_1
  m_t  = mu * m_{t-1} + (1 - mu) * g_t
  p   <- p - lr * wd * p - lr * gsnr * m_t            # decay is not scaled by gsnr

One-element tensors (scalars, shape ``(1,)``) get gsnr 0, so the gradient
never moves them (only weight decay does, if masked in), exactly as in the
reference. With ``normalize=True`` every gsnr is divided by the largest gsnr over all
tensors (the form in the paper; the released code does not normalize).
Under data parallelism pass the all-reduced gradient: gsnr must be computed on
the reduced gradient, not per device.
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
    "ScaleBySaiState",
    "scale_by_sai",
    "sgd_sai",
]

MaskOrFn = Any | Callable[[optax.Params], Any] | None


class ScaleBySaiState(NamedTuple):
  """State of :func:`scale_by_sai`.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    gsnr: one float scalar per leaf, the frozen gradient signal-to-noise ratio
      (zeros before the first update, then fixed forever).
    momentum: the momentum buffer ``m_t`` (same structure and dtypes as the
      parameters), or ``None`` when the transformation was built with
      ``momentum == 0`` (no buffer is stored then).
  """

  count: jax.Array
  gsnr: optax.Updates
  momentum: optax.Updates | None




def _check_momentum(momentum: Any) -> None:
  mu = concrete_float(momentum)
  if mu is not None and not 0.0 <= mu < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")


def _check_nonnegative(name: str, value: Any) -> None:
  v = concrete_float(value)
  if v is not None and (math.isnan(v) or v < 0.0):
    raise ValueError(f"{name} must be a non-negative number, got {value!r}.")


def _stat_dtype(dtype: Any) -> jnp.dtype:
  """Statistics are computed in at least float32 (bf16/fp16 gradients)."""
  return jnp.promote_types(dtype, jnp.float32)


def _leaf_gsnr(g: jax.Array, eps: Any) -> jax.Array:
  """``||g||_2 / (std(g, ddof=1) + eps)`` in float32+, NaN mapped to 0."""
  g = g.astype(_stat_dtype(g.dtype))
  norm = jnp.sqrt(jnp.sum(jnp.square(g)))
  if g.size < 2:  # std with ddof=1 is undefined (NaN in the reference): -> 0.
    return jnp.zeros([], g.dtype)
  gsnr = norm / (jnp.std(g, ddof=1) + eps)
  return jnp.where(jnp.isnan(gsnr), jnp.zeros_like(gsnr), gsnr)


def _gsnr_tree(grads: optax.Updates, eps: Any, normalize: bool) -> optax.Updates:
  gsnr = jax.tree.map(lambda g: _leaf_gsnr(g, eps), grads)
  if normalize:
    leaves = jax.tree.leaves(gsnr)
    if leaves:
      top = jnp.max(jnp.stack([jnp.asarray(x) for x in leaves]))
      top = jnp.where(top > 0, top, jnp.ones_like(top))  # all zero: leave as is
      gsnr = jax.tree.map(lambda x: x / top.astype(x.dtype), gsnr)
  return gsnr


def scale_by_sai(
    momentum: float = 0.9,
    eps: float = 1e-8,
    *,
    normalize: bool = False,
) -> optax.GradientTransformation:
  r"""Scales momentum by a per-tensor gsnr frozen at the first step (SGD-SaI).

  For each leaf, on the first update the gradient signal-to-noise ratio

  .. math::
    \mathrm{gsnr} = \frac{\|g_1\|_2}{\mathrm{std}(g_1, \mathrm{ddof}=1) + \epsilon}

  is computed (0 for one-element leaves, where the sample std is undefined) and
  stored; it never changes afterwards. The output is ``gsnr * m_t`` with
  ``m_1 = g_1`` and ``m_t = momentum * m_{t-1} + (1 - momentum) * g_t``. With
  ``momentum == 0`` the output is ``gsnr * g_t`` and no buffer is kept. The
  statistics are computed in at least float32; the outputs keep the gradient
  dtypes.

  Args:
    momentum: EMA coefficient ``mu`` in ``[0, 1)``.
    eps: added to the standard deviation.
    normalize: if True, divide every gsnr by the largest gsnr over all leaves
      (the paper's form; the released code does not normalize).

  Returns:
    An :class:`optax.GradientTransformation` with state
    :class:`ScaleBySaiState`.

  Raises:
    ValueError: if ``momentum`` is outside ``[0, 1)`` or ``eps`` is negative.

  Examples:
    >>> import jax.numpy as jnp
    >>> from absign_jax.related.sgd_sai import scale_by_sai
    >>> tx = scale_by_sai(momentum=0.0)
    >>> params = {'w': jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.array([1.0, 2.0, 3.0])}, state)
    >>> print(round(float(state.gsnr['w']), 4))  # ||g|| / std(g) = 3.7417 / 1
    3.7417
  """
  _check_momentum(momentum)
  _check_nonnegative("eps", eps)

  def init_fn(params: optax.Params) -> ScaleBySaiState:
    gsnr = jax.tree.map(lambda p: jnp.zeros([], _stat_dtype(p.dtype)), params)
    # A concrete zero momentum needs no buffer. An injected (traced) momentum
    # can change later, so the buffer is kept.
    no_buffer = concrete_float(momentum) == 0.0
    mu = None if no_buffer else optax.tree.zeros_like(params)
    return ScaleBySaiState(jnp.zeros([], jnp.int32), gsnr, mu)

  def update_fn(
      updates: optax.Updates,
      state: ScaleBySaiState,
      params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleBySaiState]:
    del params
    first = state.count == 0
    gsnr = jax.lax.cond(
        first,
        lambda: _gsnr_tree(updates, eps, normalize),
        lambda: state.gsnr,
    )
    if state.momentum is None:
      mu = None
      direction = updates
    else:
      mu = jax.tree.map(
          lambda m, g: jnp.where(
              first, g, momentum * m + (1 - momentum) * g
          ).astype(m.dtype),
          state.momentum,
          updates,
      )
      direction = mu
    new_updates = jax.tree.map(
        lambda s, d: (s * d).astype(d.dtype), gsnr, direction
    )
    return new_updates, ScaleBySaiState(
        optax.safe_increment(state.count), gsnr, mu
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _ndim_at_least_2(params: optax.Params) -> Any:
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def sgd_sai(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    momentum: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    weight_decay_mask: MaskOrFn = None,
    normalize: bool = False,
) -> optax.GradientTransformation:
  r"""SGD-SaI: momentum SGD with per-tensor scales frozen at initialization.

  Implements::

    p <- p - lr * wd * p - lr * gsnr * m_t

  as ``chain(scale_by_sai, add_decayed_weights, scale_by_learning_rate)``: the
  decoupled weight decay is not multiplied by gsnr but is multiplied by the
  learning rate (and follows its schedule).

  Args:
    learning_rate: a scalar or an optax schedule.
    momentum: EMA coefficient in ``[0, 1)``; 0 keeps no momentum buffer.
    eps: added to the gradient standard deviation in the gsnr.
    weight_decay: decoupled weight decay coefficient (``>= 0``).
    weight_decay_mask: a tree of bools or a callable returning one, selecting
      the leaves to decay. Default: leaves with ``ndim >= 2`` (no decay on
      biases, norms and scalars).
    normalize: divide every gsnr by the maximum gsnr over all tensors.

  Returns:
    An :class:`optax.GradientTransformation`. Works under ``jax.jit`` and with
    ``optax.inject_hyperparams(sgd_sai)(learning_rate=...)``.

  Raises:
    ValueError: on a negative or NaN learning rate, eps or weight decay, or a
      momentum outside ``[0, 1)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from absign_jax.related.sgd_sai import sgd_sai
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.2]])
    >>> y = jnp.array([1.0, -2.0, 0.5])
    >>> def loss(p):
    ...   return jnp.mean((x @ p['w'] + p['b'] - y) ** 2)
    >>> params = {'w': jnp.zeros(2), 'b': jnp.zeros(())}
    >>> tx = sgd_sai(learning_rate=0.05)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(bool(loss(params) < 0.2 * loss({'w': jnp.zeros(2), 'b': 0.0})))
    True
  """
  lr = concrete_float(learning_rate)
  if lr is not None and (math.isnan(lr) or lr < 0.0):
    raise ValueError(
        f"learning_rate must be a non-negative number, got {learning_rate!r}."
    )
  _check_nonnegative("weight_decay", weight_decay)
  mask = _ndim_at_least_2 if weight_decay_mask is None else weight_decay_mask
  return optax.chain(
      scale_by_sai(momentum, eps, normalize=normalize),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
