"""Low-precision training: loss scaling, stochastic rounding, an active-block master copy.

Everything here is used by the training steps (:class:`absign_jax.BlockTrainStep`,
:class:`absign_jax.FullTrainStep`) in their one calling form::

    state = step.init(params, opt_state)        # a TrainState(params, opt_state, precision)
    state, metrics = step(state, batch)

This module also holds the arithmetic the steps run inside their compiled programs:
the scaled loss (:func:`scaled_loss`), the unscaled float32 gradient
(:func:`unscale`), the update applied in float32 and rounded once
(:func:`apply_block_update`), the counters after a step (:func:`advance`) and the
host-side check that training still makes progress (:func:`check_progress`).

The :class:`PrecisionState` inside the :class:`~absign_jax.train.step.TrainState` is an
ordinary pytree of arrays (loss scale, skip counters, rounding key and counter, the
master copy), so a checkpoint of the ``TrainState`` restores training exactly.

Precision policies
----------------------------
A fine-tuning program exposes ``--precision {fp32,bf16,bf16-sr,bf16-master,fp16}`` with::

    pol = absign_jax.policy(args.precision)
    model = build_model(...)                      # in a dtype the model computes in
    parts = split_nnx(model)
    params = pol.cast_params(parts.params)        # storage dtype (fp16: see below)
    step = BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                          **pol.step_options())
    state = step.init(params)

========== ========= ================== =======================================
name       weights   rounding of update  notes
========== ========= ================== =======================================
fp32       float32   (exact enough)      reference
bf16       bfloat16  nearest             ``lr * sign(g)`` is often below half an
                                         ulp: most weights never move at lr 1e-5
bf16-sr    bfloat16  stochastic          unbiased: ``E[w_new] = w + update``;
                                         no memory beyond the updated block
bf16-master bfloat16 nearest, from an    fp32 copy of the active block only
           + fp32    fp32 master copy    (see :class:`PrecisionState`)
           block copy
fp16       float16   nearest             dynamic loss scale (2^15, halve on
                                         overflow, double after 2000 good steps)
========== ========= ================== =======================================

``fp16`` stores the weights in float16 (``cast_params``) of a model built to compute in
float32 (e.g. ``nnx.Linear`` promotes float16 weights to its float32 compute dtype), so
gradients are float16 (they overflow/underflow, which is what the loss scale handles)
while the arithmetic is float32. Which dtype a model is built in is the model's
business (the LLM program maps a policy to its config).

Loss scaling
------------
The loss is multiplied by the scale before differentiation. A step whose block gradient
(or loss) has an inf or NaN changes no parameter and no optimizer state (the block keeps
its turn), halves the scale and counts a skip; after ``growth_interval`` finite steps in
a row the scale doubles. The gradient is unscaled in float32 before the optimizer: sign
descent would not need it (a positive scale never changes a sign), but inner
transformations that are not scale invariant (``block_adam``) do.

Stochastic rounding
-------------------
``stochastic_round(x, dtype, key)`` rounds a float32 array up or down to the two
neighbouring values of ``dtype`` with probabilities that make it unbiased. The key of
step ``t`` is ``fold_in(rng, t)`` with ``rng`` (from the step's ``seed``) and ``t`` held
in the :class:`PrecisionState`: runs are reproducible and resume exactly.

Active-block master copy
------------------------
With ``master_copy=True`` the step keeps a float32 copy of the active block. Its memory
is one float32 buffer per *group* of equally shaped blocks (all transformer layers form
one group): ``4 * M / N`` bytes for M parameters in N layers (twice one layer's bf16
weights), plus the size of the embedding/head block when those are trained. At a block
switch the copy for the new block is initialised from its bf16 weights, so sub-ulp
progress survives only while a block stays active: this helps block Adam
(``steps_per_block`` > 1) and is equivalent to nearest rounding for ABSignSGD's
one-step turns; use stochastic rounding there. The optimizer reads the bf16
weights (weight decay ``wd * p`` differs from ``wd * master`` by at most half a bf16
ulp of ``p``, relative to a term that is itself ``lr * wd`` small).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from absign_jax.blocks import partition as partition_lib

PyTree = Any

ROUNDINGS = ("nearest", "stochastic")
POLICIES = ("fp32", "bf16", "bf16-sr", "bf16-master", "fp16")

__all__ = [
    "DynamicLossScale",
    "LossScaleState",
    "POLICIES",
    "PrecisionState",
    "Policy",
    "ROUNDINGS",
    "cast_floating",
    "init_precision_state",
    "policy",
    "stochastic_round",
]


# ---------------------------------------------------------------------------------
# Loss scaling
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
  """Configuration of the dynamic loss scale (the defaults below).

  Attributes:
    init_scale: the first scale (2^15).
    growth_factor: multiplier after ``growth_interval`` finite steps in a row.
    backoff_factor: multiplier after a step with a non-finite gradient (1 keeps
      a static scale).
    growth_interval: finite steps in a row before the scale grows (2000).
    max_scale: the scale never grows beyond this.
    min_scale: a scale that falls below this is an underflow: the step raises.
  """

  init_scale: float = 2.0**15
  growth_factor: float = 2.0
  backoff_factor: float = 0.5
  growth_interval: int = 2000
  max_scale: float = 2.0**24
  min_scale: float = 2.0**-14

  def __post_init__(self):
    def positive(name, value):
      if not (isinstance(value, (int, float, np.number)) and math.isfinite(value)
              and value > 0):
        raise ValueError(f"DynamicLossScale: {name} must be a finite number > 0, "
                         f"got {value!r}.")
    for name in ("init_scale", "max_scale", "min_scale"):
      positive(name, getattr(self, name))
    positive("growth_factor", self.growth_factor)
    positive("backoff_factor", self.backoff_factor)
    if self.growth_factor < 1:
      raise ValueError(f"DynamicLossScale: growth_factor must be >= 1, got "
                       f"{self.growth_factor}.")
    if self.backoff_factor > 1:
      raise ValueError(f"DynamicLossScale: backoff_factor must be <= 1, got "
                       f"{self.backoff_factor}.")
    if not isinstance(self.growth_interval, (int, np.integer)) or self.growth_interval < 1:
      raise ValueError(f"DynamicLossScale: growth_interval must be an int >= 1, got "
                       f"{self.growth_interval!r}.")
    if not self.min_scale <= self.init_scale <= self.max_scale:
      raise ValueError(f"DynamicLossScale: need min_scale <= init_scale <= max_scale, "
                       f"got {self.min_scale}, {self.init_scale}, {self.max_scale}.")


class LossScaleState(NamedTuple):
  """Dynamic loss scale state.

  Attributes:
    scale: the current scale (float32 scalar; 1 when loss scaling is off).
    good_steps: finite steps since the scale last changed (int32 scalar).
  """

  scale: jax.Array
  good_steps: jax.Array


def resolve_loss_scale(loss_scale: DynamicLossScale | str | float | None
                       ) -> DynamicLossScale | None:
  """Normalises the ``loss_scale`` option of the training step.

  Args:
    loss_scale: ``None`` (off), ``"dynamic"`` (default settings), a
      :class:`DynamicLossScale`, or a positive number: a *static* scale (never
      changes; steps with non-finite gradients are still skipped).

  Returns:
    A :class:`DynamicLossScale` or None.
  """
  if loss_scale is None or isinstance(loss_scale, DynamicLossScale):
    return loss_scale
  if isinstance(loss_scale, str):
    if loss_scale != "dynamic":
      raise ValueError(f"loss_scale must be None, 'dynamic', a DynamicLossScale or a "
                       f"number, got {loss_scale!r}.")
    return DynamicLossScale()
  if isinstance(loss_scale, (int, float, np.number)) and not isinstance(loss_scale, bool):
    s = float(loss_scale)
    return DynamicLossScale(init_scale=s, growth_factor=1.0, backoff_factor=1.0,
                            growth_interval=2**30, max_scale=s, min_scale=min(s, 2.0**-14))
  raise TypeError(f"loss_scale must be None, 'dynamic', a DynamicLossScale or a "
                  f"number, got {type(loss_scale).__name__}.")


def init_loss_scale(config: DynamicLossScale | None) -> LossScaleState:
  """The initial :class:`LossScaleState` (scale 1 when ``config`` is None)."""
  scale = 1.0 if config is None else config.init_scale
  return LossScaleState(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32))


def update_loss_scale(config: DynamicLossScale | None, state: LossScaleState,
                      finite: jax.Array) -> LossScaleState:
  """The scale after a step whose gradient was (``finite``) or was not finite."""
  if config is None:
    return state
  good = jnp.where(finite, state.good_steps + 1, 0)
  grow = finite & (good >= config.growth_interval)
  grown = jnp.minimum(state.scale * config.growth_factor, config.max_scale)
  scale = jnp.where(finite, jnp.where(grow, grown, state.scale),
                    state.scale * config.backoff_factor)
  return LossScaleState(scale.astype(jnp.float32),
                        jnp.where(grow, 0, good).astype(jnp.int32))


# ---------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding of ``x`` to ``dtype``.

  ``x`` lies between two neighbouring values ``lo <= x <= hi`` of ``dtype``; the result
  is ``hi`` with probability ``(x - lo) / (hi - lo)``, else ``lo``, so that
  ``E[result] = x``. Values exactly representable are returned unchanged; inf and NaN
  are cast as they are. For bfloat16 this adds 16 random bits to the float32 bit
  pattern and truncates (one uint32 temporary of ``x``'s size); other dtypes pick
  between the nearest value and its neighbour towards ``x``.

  Args:
    x: values, cast to float32 first.
    dtype: the target floating dtype (bfloat16, float16, float32).
    key: a PRNG key.

  Returns:
    An array of ``dtype``.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x)
  if x.dtype == dtype or dtype == jnp.float32:
    return x.astype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
    return jnp.where(jnp.isfinite(x), out, x.astype(jnp.bfloat16))
  nearest = x.astype(dtype)
  near32 = nearest.astype(jnp.float32)
  toward = jnp.where(x > near32, jnp.inf, -jnp.inf).astype(dtype)
  other = jnp.nextafter(nearest, toward)
  gap = other.astype(jnp.float32) - near32
  p = jnp.where(gap != 0, (x - near32) / jnp.where(gap != 0, gap, 1.0), 0.0)
  u = jax.random.uniform(key, x.shape, jnp.float32)
  out = jnp.where(u < p, other, nearest)
  return jnp.where(jnp.isfinite(x) & jnp.isfinite(other), out, nearest)


def round_to(x: jax.Array, dtype: Any, rounding: str, key: jax.Array | None = None
             ) -> jax.Array:
  """Casts ``x`` to ``dtype`` by ``"nearest"`` (a plain cast) or ``"stochastic"``."""
  if rounding == "nearest" or jnp.dtype(dtype) == jnp.float32:
    return x.astype(dtype)
  if rounding == "stochastic":
    return stochastic_round(x, dtype, key)
  raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")


# ---------------------------------------------------------------------------------
# The state the training step carries
# ---------------------------------------------------------------------------------


class PrecisionState(NamedTuple):
  """What the training step carries besides parameters and optimizer state.

  Attributes:
    count: steps taken, skipped ones included (int32); with ``rng`` it keys the
      stochastic rounding of step ``count``.
    rng: PRNG key data (uint32) of the stochastic rounding.
    loss_scale: the :class:`LossScaleState`.
    consecutive_skips: non-finite steps in a row, reset by a finite step (int32).
    skipped_total: non-finite steps since the start (int32).
    master: the float32 master copy, one tuple of arrays per group of equally shaped
      blocks (the active block's leaves, in block order); ``()`` when off.
    master_block: per group, the block whose values ``master`` holds (-1: none).
  """

  count: jax.Array
  rng: jax.Array
  loss_scale: LossScaleState
  consecutive_skips: jax.Array
  skipped_total: jax.Array
  master: tuple
  master_block: jax.Array


def init_precision_state(spec: partition_lib.BlockSpec | None, leaves, *,
                         loss_scale: DynamicLossScale | None = None,
                         master_copy: bool = False, seed: int = 0) -> PrecisionState:
  """The initial :class:`PrecisionState` for parameters with ``leaves``.

  Args:
    spec: the block partition (needed for the master copy).
    leaves: the flattened parameter leaves (arrays or shape/dtype structs).
    loss_scale: the loss-scale configuration, or None.
    master_copy: allocate a float32 copy of one block per group.
    seed: seed of the stochastic rounding.
  """
  master, master_block = (), jnp.zeros((0,), jnp.int32)
  if master_copy:
    if spec is None:
      raise ValueError("master_copy needs the block partition.")
    _, first = partition_lib.block_groups(spec, leaves)
    shaped = [partition_lib.ShapeOnly(np.shape(l), l.dtype) for l in leaves]
    master = tuple(
        tuple(jnp.zeros(x.shape, jnp.float32)
              for x in partition_lib.gather_block(spec, shaped, b))
        for b in first)
    master_block = jnp.full((len(first),), -1, jnp.int32)
  return PrecisionState(
      count=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(seed)),
      loss_scale=init_loss_scale(loss_scale),
      consecutive_skips=jnp.zeros((), jnp.int32),
      skipped_total=jnp.zeros((), jnp.int32),
      master=master,
      master_block=master_block,
  )


# ---------------------------------------------------------------------------------
# The arithmetic of a training step (inside its compiled program)
# ---------------------------------------------------------------------------------


def scaled_loss(f, prec: PrecisionState, config: DynamicLossScale | None):
  """``f`` returning ``(loss * scale, loss)``, for ``value_and_grad(has_aux=True)``."""
  if config is None:
    return lambda *a: (lambda l: (l, l))(f(*a))
  scale = prec.loss_scale.scale
  return lambda *a: (lambda l: (l.astype(jnp.float32) * scale, l))(f(*a))


def unscale(grads, prec: PrecisionState, config: DynamicLossScale | None) -> list:
  """The gradients in float32, divided by the loss scale (when there is one)."""
  grads = [g.astype(jnp.float32) for g in grads]
  if config is not None:
    grads = [g / prec.loss_scale.scale for g in grads]
  return grads


def advance(prec: PrecisionState, finite: jax.Array, config: DynamicLossScale | None,
            **changes) -> PrecisionState:
  """The state after a step that was (``finite``) or was not applied.

  Counts the step, moves the loss scale and the skip counters; ``changes`` replace
  further fields (the master copy).
  """
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  return prec._replace(
      count=prec.count + 1,
      loss_scale=update_loss_scale(config, prec.loss_scale, finite),
      consecutive_skips=jnp.where(finite, 0, prec.consecutive_skips + 1
                                  ).astype(jnp.int32),
      skipped_total=prec.skipped_total + skipped,
      **changes)


def apply_block_update(flat: list, members, updates: list, finite: jax.Array,
                       prec: PrecisionState, *, rounding: str,
                       master_group: int | None, block_id) -> tuple[list, tuple, jax.Array]:
  """``p + u`` in float32 for the leaves of one block, from the master copy if any,
  rounded once to each parameter's dtype.

  Args:
    flat: the flattened parameter leaves.
    members: the block's ``(leaf index, stacked slice or None)`` pairs.
    updates: the optimizer's updates, indexed like ``flat`` (None off the block).
    finite: whether the step applies (else every leaf stays as it was).
    prec: the step's :class:`PrecisionState`.
    rounding: ``"nearest"`` or ``"stochastic"``.
    master_group: the block's group in the master copy, or None when there is none.
    block_id: the block's index (may be traced).

  Returns:
    ``(new leaves, master, master_block)``: the master copy as it is after the step.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(prec.rng), prec.count)
  master, master_block = prec.master, prec.master_block
  if master_group is not None:
    slot = list(master[master_group])
    fresh = master_block[master_group] != block_id  # a block switch: start from the weights
  new_flat = list(flat)
  for k, (i, s) in enumerate(members):
    p = flat[i]
    old = p if s is None else jax.lax.dynamic_index_in_dim(p, s, 0, keepdims=False)
    base = old.astype(jnp.float32)
    if master_group is not None:
      base = jnp.where(fresh, base, slot[k])
    new32 = base + updates[i].astype(jnp.float32)
    new = round_to(new32, p.dtype, rounding, jax.random.fold_in(key, k))
    new = jnp.where(finite, new, old)
    if master_group is not None:
      slot[k] = jnp.where(finite, new32, slot[k])
    new_flat[i] = new if s is None else jax.lax.dynamic_update_index_in_dim(
        p, new, s, 0)
  if master_group is not None:
    master = tuple(tuple(slot) if g == master_group else m for g, m in enumerate(master))
    master_block = master_block.at[master_group].set(
        jnp.where(finite, block_id, master_block[master_group]).astype(jnp.int32))
  return new_flat, master, master_block


def check_progress(prec: PrecisionState, *, max_consecutive_skips: int | None,
                   loss_scale: DynamicLossScale | None) -> None:
  """Raises ``FloatingPointError`` if training cannot make progress any more.

  That is: ``max_consecutive_skips`` steps in a row had a non-finite gradient or
  loss, or the dynamic loss scale fell below its ``min_scale``. Reads one or two
  scalars from the device.
  """
  limit = max_consecutive_skips
  if limit is not None:
    skips = int(prec.consecutive_skips)
    if skips >= limit:
      raise FloatingPointError(
          f"{skips} training steps in a row had a non-finite (inf/NaN) "
          f"gradient or loss (limit max_consecutive_skips={limit}); parameters have "
          f"not changed since. Loss scale {float(prec.loss_scale.scale):g}. Check "
          "the data and the learning rate, or train in bf16/fp32 instead of fp16.")
  if loss_scale is not None:
    scale = float(prec.loss_scale.scale)
    if scale < loss_scale.min_scale:
      raise FloatingPointError(
          f"the loss scale underflowed to {scale:g} (< min_scale "
          f"{loss_scale.min_scale:g}): gradients overflow float16 even "
          "unscaled. Check the loss for inf/NaN, or train in bf16/fp32.")


def check_skip_limit(max_consecutive_skips) -> int | None:
  """``max_consecutive_skips`` validated: an int >= 1, or None (no limit)."""
  if max_consecutive_skips is not None and (
      isinstance(max_consecutive_skips, bool)
      or not isinstance(max_consecutive_skips, (int, np.integer))
      or max_consecutive_skips < 1):
    raise ValueError(f"max_consecutive_skips must be an int >= 1 or None, got "
                     f"{max_consecutive_skips!r}.")
  return max_consecutive_skips


# ---------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
  """A named precision setting (see the module docstring's table).

  Attributes:
    name: one of :data:`POLICIES`.
    param_dtype: the dtype the weights are stored in.
    rounding: ``"nearest"`` or ``"stochastic"``.
    master_copy: keep a float32 copy of the active block.
    loss_scale: the dynamic loss scale, or None.
  """

  name: str
  param_dtype: Any
  rounding: str = "nearest"
  master_copy: bool = False
  loss_scale: DynamicLossScale | None = None

  def step_options(self) -> dict[str, Any]:
    """Keyword arguments of :class:`absign_jax.BlockTrainStep` for this policy."""
    return {"rounding": self.rounding, "master_copy": self.master_copy,
            "loss_scale": self.loss_scale}

  def cast_params(self, params: PyTree) -> PyTree:
    """``params`` with every floating leaf in :attr:`param_dtype`."""
    return cast_floating(params, self.param_dtype)


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """Casts the floating-point leaves of ``tree`` to ``dtype`` (others untouched)."""
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(x).astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def policy(name: str, *, loss_scale: DynamicLossScale | None = None) -> Policy:
  """The :class:`Policy` called ``name`` (the ``--precision`` flag).

  Args:
    name: ``"fp32"``, ``"bf16"``, ``"bf16-sr"``, ``"bf16-master"`` or ``"fp16"``.
    loss_scale: overrides the fp16 loss-scale configuration.

  Examples:
    >>> from absign_jax.train import precision
    >>> p = precision.policy("bf16-sr")
    >>> p.param_dtype, p.step_options()["rounding"]
    (dtype(bfloat16), 'stochastic')
  """
  if name not in POLICIES:
    raise ValueError(f"unknown precision {name!r}; choose one of {POLICIES}.")
  if loss_scale is not None and name != "fp16":
    raise ValueError(f"loss_scale applies to precision 'fp16' only, not {name!r}.")
  bf16 = jnp.dtype(jnp.bfloat16)
  if name == "fp32":
    return Policy(name, jnp.dtype(jnp.float32))
  if name == "bf16":
    return Policy(name, bf16)
  if name == "bf16-sr":
    return Policy(name, bf16, rounding="stochastic")
  if name == "bf16-master":
    return Policy(name, bf16, master_copy=True)
  return Policy(name, jnp.dtype(jnp.float16), loss_scale=loss_scale or DynamicLossScale())
