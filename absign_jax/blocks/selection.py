"""Block selection schemes: which block the next step updates.

Every scheme is a pair of pure, jit-able functions bundled in :class:`BlockSelection`:
``init(num_blocks) -> SelectionState`` and ``select(state) -> (block, state)``. All
schemes share one state type, so checkpoints and inspection do not depend on the scheme.

The depth-biased rule keeps, per block, an integer "next available time" ``T_i``
(start ``tau_i``), picks ``argmin T`` (ties to the shallower block), adds ``tau_s`` and
then subtracts ``min T`` from every entry. The subtraction does not change any later
choice and keeps ``T`` bounded by ``2 max(tau)``, so the schedule is exact for any
number of steps (float32 accumulation would drift after ~10^7 steps).

Examples:
  >>> from absign_jax.blocks import selection
  >>> selection.schedule(selection.depth_biased(10.0), num_blocks=36, steps=12).tolist()
  [35, 34, 33, 32, 31, 35, 30, 29, 34, 28, 27, 33]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from absign_jax._checks import check_bool, check_int, check_real

_INT32_MAX = 2**31 - 1


class SelectionState(NamedTuple):
  """State of a block-selection scheme.

  Attributes:
    count: number of selections made so far.
    visits: how often each block has been selected (the block-selection counters).
    clock: integer next-available times ``T`` (cost-based schemes), minimum at 0.
    costs: the integer per-block costs ``tau`` (cost-based schemes).
    order: the current permutation / fixed order (order-based schemes).
    key: PRNG key (random schemes).
  """

  count: jax.Array
  visits: jax.Array
  clock: jax.Array
  costs: jax.Array
  order: jax.Array
  key: jax.Array


class BlockSelection(NamedTuple):
  """A block-selection scheme: ``init(num_blocks)`` and ``select(state)``.

  Attributes:
    init: ``init(num_blocks) -> SelectionState``.
    select: ``select(state) -> (block, state)``.
    name: the scheme's name.
    config: ``(option, value)`` pairs that, with the name and the block count, fix
      the sequence of selected blocks (e.g. ``(("seed", 0),)``): Python ints,
      floats, strings or tuples of them (hashable and JSON-serialisable), None
      where a value is traced. A checkpoint records them, and restoring checks them
      against the scheme restoring it.
  """

  init: Callable[[int], SelectionState]
  select: Callable[[SelectionState], tuple[jax.Array, SelectionState]]
  name: str
  config: tuple[tuple[str, Any], ...] = ()


# The largest seed: ``jax.random.key`` truncates larger ones to 32 bits (without x64).
_SEED_MAX = 2**32 - 1


def _concrete(value: Any, convert: Callable[[Any], Any]) -> Any:
  """``convert(value)``, or None for a value traced by ``optax.inject_hyperparams``."""
  return None if isinstance(value, jax.core.Tracer) else convert(value)


def _base_state(num_blocks: int, *, costs=None, order=None, seed: int = 0):
  if (not isinstance(num_blocks, (int, np.integer)) or isinstance(num_blocks, bool)
      or num_blocks < 1):
    raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}.")
  costs = np.zeros(num_blocks, np.int32) if costs is None else costs
  order = np.arange(num_blocks, dtype=np.int32) if order is None else order
  return SelectionState(
      count=jnp.zeros((), jnp.int32),
      visits=jnp.zeros((num_blocks,), jnp.int32),
      clock=jnp.asarray(costs, jnp.int32),
      costs=jnp.asarray(costs, jnp.int32),
      order=jnp.asarray(order, jnp.int32),
      key=jax.random.key_data(jax.random.key(seed)),
  )


def _advance(state: SelectionState, block: jax.Array, **changes) -> tuple:
  block = jnp.asarray(block, jnp.int32)
  new = state._replace(
      count=state.count + 1, visits=state.visits.at[block].add(1), **changes
  )
  return block, new


def integer_costs(tau: Sequence[float]) -> np.ndarray:
  """Scales positive costs to integers with the same ratios (exact arithmetic).

  Each cost is read as a fraction with denominator <= 1000; all are multiplied by
  the least common denominator.
  """
  tau = [float(t) for t in tau]
  if not tau or any(not math.isfinite(t) or t <= 0 for t in tau):
    raise ValueError(f"block costs tau must be finite and > 0, got {tau}.")
  fracs = [Fraction(t).limit_denominator(1000) for t in tau]
  lcd = math.lcm(*(f.denominator for f in fracs))
  ints = [int(f * lcd) for f in fracs]
  if 2 * max(ints) > _INT32_MAX:
    raise ValueError(f"block costs {tau} need too fine a resolution for exact int32 "
                     "arithmetic; round them to fewer digits.")
  return np.asarray(ints, np.int64)


def depth_biased_costs(num_blocks: int, depth_bias: float) -> list[float]:
  """``tau_i = N + c (N - i)``: a forward pass plus ``c`` per layer backpropagated."""
  return [num_blocks + depth_bias * (num_blocks - i) for i in range(num_blocks)]


def _cost_scheme(costs_fn: Callable[[int], Sequence[float]], name: str,
                 config: tuple = ()) -> BlockSelection:
  def init(num_blocks: int) -> SelectionState:
    tau = list(costs_fn(num_blocks))
    if len(tau) != num_blocks:
      raise ValueError(f"{name}: got {len(tau)} costs for {num_blocks} blocks.")
    return _base_state(num_blocks, costs=integer_costs(tau))

  def select(state):
    block = jnp.argmin(state.clock)  # first minimum: ties go to the shallower block
    clock = state.clock.at[block].add(state.costs[block])
    return _advance(state, block, clock=clock - jnp.min(clock))

  return BlockSelection(init, select, name, config)


def _check_depth_bias(depth_bias) -> None:
  if isinstance(depth_bias, jax.core.Tracer):
    raise TypeError("depth_bias must be a concrete number when the selection state "
                    "is initialised (it fixes the integer cost table); with "
                    "optax.inject_hyperparams, call init outside jit or pass "
                    "static_args=('depth_bias',).")
  check_real("depth_biased", "depth_bias", depth_bias, "a finite number >= 0")
  if not (np.isfinite(depth_bias) and depth_bias >= 0):
    raise ValueError(f"depth_bias must be finite and >= 0, got {depth_bias}. Use 0 for "
                     "cost-balanced round-robin, 10 (default) to favour deep layers.")


def depth_biased(depth_bias: float = 10.0) -> BlockSelection:
  """Deterministic depth-biased selection (the ABSignSGD default).

  Block ``i`` costs ``tau_i = N + c (N - i)`` and is visited with long-run frequency
  proportional to ``1 / tau_i``. The first pick is the deepest block.

  Args:
    depth_bias: ``c >= 0``; 0 visits all blocks equally often (in round-robin order).

  Raises:
    TypeError: ``depth_bias`` is not a number.
    ValueError: ``depth_bias`` is negative or not finite.
  """
  if isinstance(depth_bias, jax.core.Tracer):
    # optax.inject_hyperparams rebuilds the optimizer inside jit with every numeric
    # argument traced. select() never reads depth_bias (the integer cost table lives
    # in the state), so only init() needs a concrete value.
    def traced_costs(num_blocks):
      _check_depth_bias(depth_bias)  # raises the TypeError that explains the fix
    return _cost_scheme(traced_costs, "depth_biased", (("depth_bias", None),))
  _check_depth_bias(depth_bias)
  depth_bias = float(depth_bias)
  return _cost_scheme(lambda n: depth_biased_costs(n, depth_bias), "depth_biased",
                      (("depth_bias", depth_bias),))


def with_depth_bias(state: SelectionState, depth_bias: float) -> SelectionState:
  """A depth-biased selection's state, continued with another depth bias.

  From the next selection on, block ``i`` costs ``tau_i = N + c (N - i)`` of the new
  ``c``. Each block keeps its phase: a block with a fraction ``f`` of its old cost
  still to wait waits ``f`` of its new cost (``T_i <- floor(T_i * new_i / old_i)``,
  in integers, then shifted so that the smallest is 0). A gradual change of the bias
  (e.g. with training progress) thus moves the visit rates gradually. Call it
  between steps, with a concrete state (not inside ``jit``).

  Args:
    state: the state of a :func:`depth_biased` selection (any bias).
    depth_bias: the new ``c >= 0``.

  Returns:
    The state with the new costs and times.

  Raises:
    ValueError: the state is not a depth-biased selection's (its costs are not
      ``N + c (N - i)`` in integer units), or the bias is negative or not finite.

  Examples:
    >>> from absign_jax.blocks import selection
    >>> sel = selection.depth_biased(10.0)
    >>> state = selection.with_depth_bias(sel.init(4), 0.0)
    >>> state.costs.tolist()
    [4, 4, 4, 4]
    >>> picks = []
    >>> for _ in range(6):
    ...   block, state = sel.select(state)
    ...   picks.append(int(block))
    >>> picks  # every block as often, in round-robin order
    [0, 1, 2, 3, 0, 1]
  """
  _check_depth_bias(depth_bias)
  old = np.asarray(jax.device_get(state.costs), np.int64)
  clock = np.asarray(jax.device_get(state.clock), np.int64)
  n = old.size
  # A depth-biased table is S * tau for an integer unit S: affine in i, with
  # old[N-1] = S (N + c) and a step of S c between neighbours.
  step = int(old[-2] - old[-1]) if n > 1 else 0
  unit = Fraction(int(2 * old[-1] - old[-2]), n) if n > 1 else Fraction(int(old[0]), 1)
  affine = all(int(old[i]) == int(old[-1]) + (n - 1 - i) * step for i in range(n))
  if not affine or step < 0 or unit <= 0 or unit.denominator != 1:
    raise ValueError("with_depth_bias needs the state of a depth-biased selection "
                     f"(costs S (N + c (N - i)) for an integer S), got costs {old.tolist()}.")
  new = integer_costs(depth_biased_costs(n, float(depth_bias)))
  clock = [int(t) * int(c_new) // int(c_old) for t, c_new, c_old in zip(clock, new, old)]
  clock = np.asarray(clock, np.int64) - min(clock)
  return state._replace(clock=jnp.asarray(clock, jnp.int32),
                        costs=jnp.asarray(new, jnp.int32))


def costs(tau: Sequence[float]) -> BlockSelection:
  """Cost-based selection with user costs ``tau`` (one per block, > 0).

  Raises:
    TypeError: ``tau`` is not a sequence of numbers.
    ValueError: a cost is not finite and > 0.
  """
  if isinstance(tau, (str, bytes)) or not isinstance(tau, (Sequence, np.ndarray)):
    raise TypeError(f"costs: tau must be a sequence of numbers > 0 (one per block), "
                    f"got {tau!r} ({type(tau).__name__}).")
  tau = list(tau)
  for i, t in enumerate(tau):
    check_real("costs", f"tau[{i}]", t, "a finite number > 0")
  integer_costs(tau)  # validate early
  tau = [float(t) for t in tau]
  return _cost_scheme(lambda n: tau, "costs", (("costs", tuple(tau)),))


def _check_seed(owner: str, seed: Any) -> None:
  check_int(owner, "seed", seed, lo=0, hi=_SEED_MAX)


def uniform(seed: int = 0) -> BlockSelection:
  """I.i.d. uniform selection from a PRNG key held in the state (reproducible).

  Args:
    seed: an int in ``[0, 2**32 - 1]``.
  """
  _check_seed("uniform", seed)

  def init(num_blocks):
    return _base_state(num_blocks, seed=seed)

  def select(state):
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    block = jax.random.randint(sub, (), 0, state.visits.shape[0])
    return _advance(state, block, key=jax.random.key_data(key))

  return BlockSelection(init, select, "uniform", (("seed", _concrete(seed, int)),))


def cyclic(descending: bool = False) -> BlockSelection:
  """Round-robin: 0, 1, ..., N-1 (or N-1, ..., 0 with ``descending=True``)."""
  check_bool("cyclic", "descending", descending)

  def init(num_blocks):
    return _base_state(num_blocks)

  def select(state):
    n = state.visits.shape[0]
    pos = state.count % n
    return _advance(state, n - 1 - pos if descending else pos)

  return BlockSelection(init, select, "cyclic_descending" if descending else "cyclic")


def random_reshuffle(seed: int = 0) -> BlockSelection:
  """A fresh random permutation of the blocks per pass (BAdam's "random" order).

  Args:
    seed: an int in ``[0, 2**32 - 1]``.
  """
  _check_seed("random_reshuffle", seed)

  def init(num_blocks):
    state = _base_state(num_blocks, seed=seed)
    key, sub = jax.random.split(jax.random.key(seed))
    order = jax.random.permutation(sub, num_blocks).astype(jnp.int32)
    return state._replace(order=order, key=jax.random.key_data(key))

  def select(state):
    n = state.visits.shape[0]
    pos = state.count % n
    key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
    fresh = jax.random.permutation(sub, n).astype(jnp.int32)
    new_pass = (pos == 0) & (state.count > 0)
    order = jnp.where(new_pass, fresh, state.order)
    key = jnp.where(new_pass, jax.random.key_data(key), state.key)
    return _advance(state, order[pos], order=order, key=key)

  return BlockSelection(init, select, "random_reshuffle",
                        (("seed", _concrete(seed, int)),))


def fixed_order(order: Sequence[int]) -> BlockSelection:
  """Repeats a user-given sequence of block ids.

  Raises:
    TypeError: ``order`` is not a sequence of ints.
    ValueError: ``order`` is empty (ids outside the block range: at ``init``).
  """
  if isinstance(order, (str, bytes)) or not isinstance(order, (Sequence, np.ndarray)):
    raise TypeError(f"fixed_order: order must be a sequence of block ids (ints), got "
                    f"{order!r} ({type(order).__name__}).")
  for i, o in enumerate(order):
    check_int("fixed_order", f"order[{i}]", o)
  order = [int(o) for o in order]
  if not order:
    raise ValueError("fixed_order: the order is empty; give at least one block id.")

  def init(num_blocks):
    bad = [o for o in order if not 0 <= o < num_blocks]
    if bad:
      raise ValueError(f"fixed_order: block ids {bad} are outside 0..{num_blocks - 1}.")
    return _base_state(num_blocks, order=np.asarray(order, np.int32))

  def select(state):
    return _advance(state, state.order[state.count % state.order.shape[0]])

  return BlockSelection(init, select, "fixed_order", (("order", tuple(order)),))


SCHEMES = ("depth_biased", "uniform", "cyclic", "cyclic_descending", "random_reshuffle")


def resolve(selection: str | BlockSelection, *, depth_bias: float = 10.0,
            seed: int = 0) -> BlockSelection:
  """Turns a scheme name (or a :class:`BlockSelection`) into a :class:`BlockSelection`.

  Raises:
    TypeError: ``selection`` is neither a name nor a :class:`BlockSelection`.
    ValueError: an unknown scheme name.
  """
  if isinstance(selection, BlockSelection):
    return selection
  if not isinstance(selection, str):
    raise TypeError(f"selection must be a scheme name (one of {SCHEMES}) or a "
                    f"BlockSelection, got {selection!r} ({type(selection).__name__}).")
  factories = {
      "depth_biased": lambda: depth_biased(depth_bias),
      "uniform": lambda: uniform(seed),
      "cyclic": lambda: cyclic(False),
      "cyclic_descending": lambda: cyclic(True),
      "descending": lambda: cyclic(True),
      "random_reshuffle": lambda: random_reshuffle(seed),
  }
  if selection not in factories:
    raise ValueError(f"unknown selection scheme {selection!r}; choose one of "
                     f"{SCHEMES}, or pass absign_jax.blocks.selection.costs(tau) / "
                     "fixed_order(order).")
  return factories[selection]()


def schedule(selection: BlockSelection | str, num_blocks: int, steps: int) -> np.ndarray:
  """The first ``steps`` blocks a scheme selects, as a NumPy array (for inspection).

  Examples:
    >>> schedule("cyclic_descending", num_blocks=3, steps=4).tolist()
    [2, 1, 0, 2]
  """
  selection = resolve(selection)
  state = selection.init(num_blocks)

  @jax.jit
  def run(state):
    return jax.lax.scan(lambda s, _: selection.select(s)[::-1], state, None,
                        length=steps)[1]

  return np.asarray(run(state))
