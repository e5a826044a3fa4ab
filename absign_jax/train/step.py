"""The training steps: partial backprop to the active block, and full backprop.

Every step has one calling form::

    state = step.init(params)            # a TrainState(params, opt_state, precision)
    state, metrics = step(state, batch)

:class:`BlockTrainStep` changes one block per step, so it differentiates with respect
to that block's parameters only. Everything else is a constant to
``jax.value_and_grad``: layers below the active block run forward only (JAX's partial
evaluation keeps no residuals for them), layers above it get activation gradients but
no weight-gradient products, and frozen embeddings/head get no gradient at all.
:class:`FullTrainStep` is the ordinary step (full backprop, any optax optimizer), the
baseline.

Dispatch -- how the active block, which lives in the optimizer state on the device,
selects the program that runs (decided in one place, :meth:`BlockTrainStep.program_for`):

* ``"per_block"``: one executable per block, compiled lazily the first time the block
  is active (JAX's persistent compilation cache applies). The host reads the active
  block (one int32 scalar) before each step: that read is what dispatch needs.
* ``"switch"``: one executable holding every block's program in a ``lax.switch`` on the
  active block: no host read, all compilation up front.
* Stacked layers (one leaf with a leading layer axis, applied with a scan) have one
  program for all layers with a *dynamic* block index: layers below run in a
  ``fori_loop`` (forward only), the active layer is differentiated, and the layers
  above follow the residual policy (``residuals=``): the top ``k`` keep their
  activations (ordinary autodiff, matmul outputs saved), the others run in a
  ``scan`` whose body skips the layers at or below the active one, with a custom
  backward that saves only each layer's input and recomputes the layer (no copy of
  the stacked weights, no backward work below the active layer). This needs the
  model's pieces (:class:`~absign_jax.LayeredLoss`, from :func:`~absign_jax.cut_nnx`,
  :func:`~absign_jax.cut_linen` or :func:`~absign_jax.cut`, which also present list
  and dict layers stacked); with a plain loss function, stacked blocks fall back to
  differentiating through the whole scan (correct, not faster).

``"auto"`` picks ``"per_block"`` when no block is stacked and the dynamic program for
stacked blocks (measured choices: see BENCHMARKS.md).

The state carries a :class:`~absign_jax.train.precision.PrecisionState`: a
dynamic loss scale (``loss_scale=``), stochastic rounding of low-precision weights
(``rounding="stochastic"``), a float32 master copy of the active block
(``master_copy=True``) and the skip counters. The block gradient is unscaled and the
update computed in float32, then rounded once to the parameter dtype (the arithmetic
lives in :mod:`absign_jax.train.precision`).

A step whose gradient or loss is not finite changes nothing: parameters and optimizer
state are returned as they were (a block keeps its turn), ``metrics["skipped"]`` is 1
and the skip counters move. Too many non-finite steps in a row
(``max_consecutive_skips``) or a loss scale below its minimum raise
``FloatingPointError`` at the next call, before anything is donated.

Distribution is composition: what differs between one device and a data-parallel
mesh is passed in. ``aggregate`` turns this device's loss and gradient into the ones
the optimizer sees (the default keeps them; :func:`absign_jax.train.data_parallel.aggregator`
votes or averages over a mesh axis), and ``placement`` compiles the programs and
places the arrays (the default: ``jax.jit`` on the default device;
:class:`absign_jax.train.data_parallel.DataParallel` runs each program per device
under ``shard_map``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absign_jax.blocks import partition as partition_lib
from absign_jax.optim.block_coordinate import active_block, find_state
from absign_jax.train import precision as precision_lib
from absign_jax.train.model import LayeredLoss, LossFn, subtree

PyTree = Any
Batch = Any
# A program: (params, opt_state, precision, batch) -> (params, opt_state, precision, metrics).
Program = Callable[[PyTree, PyTree, precision_lib.PrecisionState, Batch], tuple]

__all__ = [
    "Aggregated",
    "BlockTrainStep",
    "DEFAULT_RESIDUALS",
    "KeepLayers",
    "LayerCost",
    "ResidualBudget",
    "ResidualPolicy",
    "FullTrainStep",
    "Placement",
    "SingleDevice",
    "TrainState",
    "accumulate",
    "local",
]


class TrainState(NamedTuple):
  """Everything a training step reads and writes.

  A plain pytree (checkpoint it whole, see :mod:`absign_jax.train.checkpoint`).

  Attributes:
    params: the parameter tree.
    opt_state: the optimizer state (block selection included).
    precision: the :class:`~absign_jax.train.precision.PrecisionState`.
  """

  params: PyTree
  opt_state: PyTree
  precision: precision_lib.PrecisionState


# ---------------------------------------------------------------------------------
# What distribution changes: the aggregate and the placement
# ---------------------------------------------------------------------------------


class Aggregated(NamedTuple):
  """What an ``aggregate`` function returns (see :func:`local`).

  Attributes:
    loss: the loss to report.
    grads: the gradient leaves handed to the optimizer (shapes and dtypes of the
      input gradient).
    finite: whether the step applies (a bool scalar, the same on every device).
    grad_norm: the gradient norm to report, or None for the norm of ``grads`` as the
      optimizer gets them.
  """

  loss: jax.Array
  grads: list
  finite: jax.Array
  grad_norm: jax.Array | None = None


def all_finite(loss: jax.Array, grads: Sequence[jax.Array]) -> jax.Array:
  """Whether ``loss`` and every entry of ``grads`` are finite."""
  ok = jnp.isfinite(loss)
  for g in grads:
    ok &= jnp.all(jnp.isfinite(g))
  return ok


def local(loss: jax.Array, grads: Sequence[jax.Array]) -> Aggregated:
  """The default ``aggregate``: one device's loss and gradient, as they are."""
  grads = list(grads)
  return Aggregated(loss, grads, all_finite(loss, grads))


class Placement(Protocol):
  """How a step's programs are compiled and where its arrays live.

  ``compile(program, donate)`` returns a jitted callable (with ``.lower``) of
  ``program(params, opt_state, precision, batch)``; ``place_state`` and
  ``place_batch`` put a :class:`TrainState` and a batch where the compiled program
  expects them (and check that they fit, before anything is compiled).
  """

  def compile(self, program: Program, donate: bool) -> Any:
    ...

  def place_state(self, state: TrainState) -> TrainState:
    ...

  def place_batch(self, batch: Batch) -> Batch:
    ...


class SingleDevice:
  """The default :class:`Placement`: ``jax.jit`` on JAX's default device."""

  def compile(self, program: Program, donate: bool) -> Any:
    return jax.jit(program, donate_argnums=(0, 1, 2) if donate else ())

  def place_state(self, state: TrainState) -> TrainState:
    return state

  def place_batch(self, batch: Batch) -> Batch:
    return batch


# ---------------------------------------------------------------------------------
# Shared by both steps
# ---------------------------------------------------------------------------------


def _init_state(params, opt_state, prec, *, donate: bool,
                callers: PyTree = ()) -> TrainState:
  """The first :class:`TrainState`, owning its buffers when the step donates them.

  ``callers`` are the arrays the caller handed in (``params``, and ``opt_state``
  when given): a donating step would delete them after its first call, leaving the
  caller's model unreadable, so the state gets its own copies of them (a one-time
  copy; drop the model to free the originals).
  """
  # The step returns strongly typed state (jnp.where); a weakly typed input leaf
  # (optax.inject_hyperparams keeps Python ints weak) would retrace the second step.
  opt_state = jax.tree.map(
      lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x,
      opt_state)
  if not donate:
    return TrainState(params, opt_state, prec)
  # Donation needs distinct buffers the state owns: never the caller's arrays, and
  # never one array twice (an optimizer state may hold e.g. two counters
  # initialised from the same zeros, or a reference to a parameter).
  seen: set[int] = {id(x) for x in jax.tree.leaves(callers)
                    if isinstance(x, jax.Array)}
  owned: set[int] = set()

  def distinct(x):
    if isinstance(x, jax.Array) and (id(x) in seen or id(x) in owned):
      x = jnp.copy(x)
    owned.add(id(x))
    return x

  params, opt_state = jax.tree.map(distinct, (params, opt_state))
  return TrainState(params, opt_state, prec)


def _starting_state(tx, params, opt_state, copy_inputs: bool) -> tuple[PyTree, PyTree]:
  """The optimizer state a step's ``init`` starts from (``tx.init`` unless given),
  and the caller's arrays the state must not take over (none if ``copy_inputs`` is
  False)."""
  _check_live(TrainState(params, opt_state, None))
  callers = (params, opt_state) if copy_inputs else ()
  return (tx.init(params) if opt_state is None else opt_state), callers


def _check_live(state: TrainState) -> None:
  """Raises ``ValueError`` if a step already consumed (donated) ``state``."""
  for x in jax.tree.leaves(state):
    # Only concrete arrays can have been donated (init may run under jit/eval_shape).
    if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
        and x.is_deleted()):
      raise ValueError(
          "this TrainState was consumed by an earlier step, which donated its "
          "buffers: pass the state that step returned (state, metrics = step(state, "
          "batch)), or build the step with donate=False to keep every state readable.")


def _call_error() -> TypeError:
  return TypeError("call the step as state, metrics = step(state, batch) with "
                   "state = step.init(params) or step.init(params, opt_state); there "
                   "is no step(params, opt_state, batch) form.")


def _block_norm(grads) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))


def _check_count(name: str, value, note: str = "") -> int:
  """``value`` as an int >= 1, else a ``ValueError`` naming ``name``."""
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
      or value < 1):
    raise ValueError(f"{name} must be an int >= 1{note}, got {value!r}.")
  return int(value)


def check_batch_rows(batch: PyTree, n: int, parts: str, advice: str = "") -> None:
  """Raises ``ValueError`` unless every leaf's leading dimension divides by ``n``.

  Args:
    batch: the global batch.
    n: the number of parts its rows are split into (devices, micro-batches).
    parts: what those parts are, for the message.
    advice: a further fix appended to the message.
  """
  for x in jax.tree.leaves(batch):
    rows = np.shape(x)[0] if np.ndim(x) else None
    if rows is None or rows % n:
      raise ValueError(
          f"the global batch has {rows if rows is not None else 'no'} rows (a leaf "
          f"of shape {tuple(np.shape(x))}), which does not divide over the {parts}: "
          f"use a global batch size that is a multiple of {n} (e.g. "
          f"{max(n, -(-(rows or 0) // n) * n)}){advice}.")


def accumulate(grad_fn: Callable[[Batch], tuple], batch: Batch, micro_batches: int):
  """``grad_fn(batch) -> (loss, grads)`` over ``micro_batches`` equal slices of the
  batch's rows, averaged: the gradient of the whole batch (for a loss that is a mean
  over rows) at the activation memory of one slice. Sums in float32.

  Raises:
    ValueError: a batch leaf whose leading (row) axis does not divide into
      ``micro_batches`` equal slices.
  """
  if micro_batches == 1:
    return grad_fn(batch)
  check_batch_rows(batch, micro_batches, f"{micro_batches} slices of micro_batches",
                   ", or lower micro_batches")
  slices = jax.tree.map(
      lambda x: jnp.reshape(x, (micro_batches, -1, *np.shape(x)[1:])), batch)
  shapes = jax.eval_shape(grad_fn, jax.tree.map(lambda x: x[0], slices))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

  def add(total, one):
    out = grad_fn(one)
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, out), None

  total, _ = jax.lax.scan(add, zeros, slices)
  return jax.tree.map(lambda t, s: (t / micro_batches).astype(s.dtype), total, shapes)


def _take(stack, i):
  """Layer ``i`` of a stacked layer tree (``i`` may be traced)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), stack)


def _saved_layer(layer, stack, i, h, ctx=None):
  """Layer ``i`` of ``stack`` on ``h`` and what its backward keeps.

  ``layer`` is ``(layer_params, h, ctx) -> h``. Returns ``(out, saved, rebuild)``:
  ``saved`` is the list of arrays the layer's vector-Jacobian product needs (its
  input and matmul outputs, under ``dots_saveable``), without the weights and the
  batch context: those are read again by ``rebuild(saved, stack, ctx) -> vjp``, so a
  kept layer never holds a copy of its weights or of the context.
  """
  f = jax.checkpoint(lambda x: layer(_take(stack, i), x, ctx),
                     policy=jax.checkpoint_policies.dots_saveable)
  out, vjp = jax.vjp(f, h)
  leaves, treedef = jax.tree.flatten(vjp)
  # The stack and the context are the remat's closed-over inputs, so they appear
  # among the leaves as themselves; everything else is this layer's own. (Were the
  # weights ever kept in another form, they would count among the layer's own
  # arrays: in LayerCost.layer_residual_bytes too, so a budget would keep fewer
  # layers.)
  shared = jax.tree.leaves((stack, ctx))
  position = {id(x): p for p, x in enumerate(shared)}
  where = [position.get(id(x)) for x in leaves]

  def rebuild(saved, stack, ctx):
    shared, own = jax.tree.leaves((stack, ctx)), iter(saved)
    return jax.tree.unflatten(
        treedef, [next(own) if p is None else shared[p] for p in where])

  return out, [x for x, p in zip(leaves, where) if p is None], rebuild


def _layers_above(layer, stack, j, h, keep=0, ctx=None, every=1):
  """Layers ``j+1 .. n-1`` of ``stack`` applied to ``h``; differentiable in ``h`` only.

  ``layer`` is ``(layer_params, h, ctx) -> h``; ``ctx`` (the batch context, or None)
  is a constant like the stack.

  The stacked program's memory and speed hinge on this: autodiff of a plain scan
  over the stack would save every layer's weights as residuals (a second copy of
  the stack) and run the backward of the skipped layers too. Here a custom backward
  never differentiates the weights and never copies them:

  * the top ``keep`` layers (``n-keep .. n-1``) save their activations (the matmul
    outputs, ``dots_saveable``): their backward is a vector-Jacobian product only;
  * the layers below those save only their input and are recomputed in the
    backward (one extra forward each); with ``every > 1`` only every ``every``-th
    layer's input is saved, and the backward replays each segment's forward from it
    to recover the others (one more forward each, ``1 - 1/every`` of the inputs'
    memory saved).

  Both run as scans whose body is a ``cond`` that skips the layers at or below
  ``j``, so the program's size does not grow with ``keep``. (The ``cond`` also keeps
  XLA from hoisting per-layer work out of the loop: on XLA:CPU a loop body that
  slices a bfloat16 buffer directly gets the whole buffer converted to float32
  before the loop.)
  """
  n = jax.tree.leaves(stack)[0].shape[0]
  lo = n - keep
  built = {}  # how a kept layer's saved arrays become its vjp (set while tracing)

  segments = _segments(lo, every)

  def runs(i, j, upto=None):  # layer i is above the active one (and below upto)
    return (i > j) if upto is None else (i > j) & (i < upto)

  def one(h, i, stack, j, ctx, upto=None):
    return jax.lax.cond(runs(i, j, upto), lambda h: layer(_take(stack, i), h, ctx),
                        lambda h: h, h)

  def apply(h, stack, j, ctx, save):
    def recomputed(h, i):  # saves the layer's input only
      return one(h, i, stack, j, ctx), h

    def segment(h, idx):  # saves the segment's input only
      out, _ = jax.lax.scan(lambda h, i: (one(h, i, stack, j, ctx, lo), None), h, idx)
      return out, h

    if every == 1:
      h, inputs = jax.lax.scan(recomputed, h, jnp.arange(lo))
    else:
      h, inputs = jax.lax.scan(segment, h, segments)
    if not save or not keep:
      h, _ = jax.lax.scan(recomputed, h, jnp.arange(lo, n))
      return h, (inputs, [])
    shapes = jax.eval_shape(lambda h, s, i, c: _saved_layer(layer, s, i, h, c)[1], h,
                            stack, jnp.int32(lo), ctx)

    def kept(h, i):  # saves the layer's activations
      def run(h):
        out, saved, built["rebuild"] = _saved_layer(layer, stack, i, h, ctx)
        return out, saved

      skip = lambda h: (h, [jnp.zeros(s.shape, s.dtype) for s in shapes])
      return jax.lax.cond(i > j, run, skip, h)

    h, saved = jax.lax.scan(kept, h, jnp.arange(lo, n))
    return h, (inputs, saved)

  @jax.custom_vjp
  def run(h, stack, j, ctx):
    return apply(h, stack, j, ctx, save=False)[0]

  def fwd(h, stack, j, ctx):
    out, (inputs, saved) = apply(h, stack, j, ctx, save=True)
    return out, (inputs, saved, stack, j, ctx)

  def bwd(res, ct):
    inputs, saved, stack, j, ctx = res

    def kept(ct, i):
      def back(ct):  # reads layer i's buffers only when it runs
        now = [jax.lax.dynamic_index_in_dim(b, i - lo, 0, False) for b in saved]
        return built["rebuild"](now, stack, ctx)(ct)[0]

      return jax.lax.cond(i > j, back, lambda ct: ct, ct), None

    def recomputed(ct, xs):
      h_i, i = xs

      def back(ct):
        _, vjp = jax.vjp(lambda x: layer(_take(stack, i), x, ctx), h_i)
        return vjp(ct)[0]

      return jax.lax.cond(runs(i, j, None if every == 1 else lo), back,
                          lambda ct: ct, ct), None

    def segment(ct, xs):
      h0, idx = xs

      def back(ct):  # replay the segment's forward for its layers' inputs
        _, layer_inputs = jax.lax.scan(lambda h, i: (one(h, i, stack, j, ctx, lo), h),
                                       h0, idx)
        ct, _ = jax.lax.scan(recomputed, ct, (layer_inputs, idx), reverse=True)
        return ct

      return jax.lax.cond(idx[-1] > j, back, lambda ct: ct, ct), None

    if keep:
      ct, _ = jax.lax.scan(kept, ct, jnp.arange(lo, n), reverse=True)
    if every == 1:
      ct, _ = jax.lax.scan(recomputed, ct, (inputs, jnp.arange(lo)), reverse=True)
    else:
      ct, _ = jax.lax.scan(segment, ct, (inputs, segments), reverse=True)
    # The stack, j and the batch context are constants of the step: no cotangent.
    return ct, None, None, None

  run.defvjp(fwd, bwd)
  return run(h, stack, j, ctx)


def _segments(count: int, every: int) -> np.ndarray:
  """Layer indices ``0 .. count-1`` in rows of ``every`` (the last row runs past
  ``count``; those indices are skipped)."""
  rows = max(-(-count // every), 1)
  return np.arange(rows * every, dtype=np.int32).reshape(rows, every)


# ---------------------------------------------------------------------------------
# What to keep of the layers above the active one
# ---------------------------------------------------------------------------------


class LayerCost(NamedTuple):
  """What a residual policy is told about the model (all static, in bytes).

  Attributes:
    num_layers: layers in the stack.
    layer_residual_bytes: what one kept layer holds for its backward at this batch
      shape: its input and matmul outputs (from the traced layer; no weights).
    layer_param_bytes: one layer's parameters.
    stack_bytes: all layers' parameters.
  """

  num_layers: int
  layer_residual_bytes: int
  layer_param_bytes: int
  stack_bytes: int


class ResidualPolicy(Protocol):
  """How many layers above the active one keep their activations.

  Called once per compiled program with the model's :class:`LayerCost`; returns
  ``k``: the top ``k`` layers (``n-k .. n-1``, those of them above the active one)
  keep their activations (their backward needs no extra forward); the other layers
  above the active one save only their input and are recomputed in the backward (one
  extra forward each). Which ``k`` layers are kept does not change the count
  recomputed, ``max(0, n-1-j-k)`` for active layer ``j``; the top ones are a static
  window. A kept layer holds ``layer_residual_bytes``, never a copy of its weights
  (its backward reads them from the stack).
  """

  def __call__(self, cost: LayerCost) -> int:
    ...


class KeepLayers(NamedTuple):
  """Keep the activations of ``k`` layers above the active one (the top ``k``)."""

  k: int

  def __call__(self, cost: LayerCost) -> int:
    return self.k


class ResidualBudget(NamedTuple):
  """Keep as many layers' activations as fit in a byte budget.

  A kept layer costs its activations (``layer_residual_bytes`` of
  :class:`LayerCost`), never a copy of its weights. Measured costs per kept layer are
  in BENCHMARKS.md (the residual study).

  Attributes:
    max_bytes: the budget in bytes; or None for ``fraction`` of the stacked
      parameters' bytes.
    fraction: the budget relative to the layers' parameter bytes.
  """

  max_bytes: int | None = None
  fraction: float = 0.0

  def __call__(self, cost: LayerCost) -> int:
    budget = (self.max_bytes if self.max_bytes is not None
              else self.fraction * cost.stack_bytes)
    return int(budget // max(cost.layer_residual_bytes, 1))


def _check_policy(residuals) -> ResidualPolicy:
  if isinstance(residuals, (int, np.integer)) and not isinstance(residuals, bool):
    if residuals < 0:
      raise ValueError(f"residuals={residuals}: the number of layers whose "
                       f"activations are kept must be >= 0.")
    return KeepLayers(int(residuals))
  if callable(residuals):
    return residuals
  raise TypeError(f"residuals must be an int (layers kept), or a policy such as "
                  f"absign_jax.ResidualBudget(...) or absign_jax.KeepLayers(k); "
                  f"got {type(residuals).__name__}.")


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _layer_cost(layer, stack, h, ctx=None) -> LayerCost:
  """The :class:`LayerCost` of ``layer`` (``(w, h, ctx) -> h``) on ``h`` (traced
  abstractly, no compute)."""
  n = jax.tree.leaves(stack)[0].shape[0]
  abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                   x.dtype), t)
  stack, x, ctx = abstract(stack), abstract(h), abstract(ctx)
  saved = jax.eval_shape(lambda s, x, i, c: _saved_layer(layer, s, i, x, c)[1], stack,
                         x, jnp.int32(0), ctx)
  stack_bytes = _tree_bytes(stack)
  return LayerCost(int(n), _tree_bytes(saved), stack_bytes // n, stack_bytes)


DEFAULT_RESIDUALS: ResidualPolicy = ResidualBudget(fraction=0.25)
"""The residual policy of :class:`BlockTrainStep` unless one is given: keep the
activations that fit in a quarter of the layers' parameter bytes.

It was chosen from the compiled sizes and step times of the residual study in
BENCHMARKS.md: on SmolLM2-135M it keeps 8 of 30 layers, most of the step time that
keeping layers saves, at a small part of the memory that keeping every layer costs. A
model whose activations are large next to its weights (a long batch) keeps fewer
layers under the same quarter.
"""


class _Programs:
  """The jitted programs of a step, built lazily, with how often each was traced.

  A program is traced once per compilation (JAX caches the trace of ``lower`` and
  of the call alike), so the trace count is the number of compiled programs.
  """

  def __init__(self, placement: Placement, donate: bool):
    self._placement, self.donate = placement, bool(donate)
    self._jitted: dict[Any, Any] = {}
    self.traces: dict[Any, int] = {}

  def get(self, key, program: Program):
    if key not in self._jitted:
      def counted(*args):
        self.traces[key] = self.traces.get(key, 0) + 1
        return program(*args)
      self._jitted[key] = self._placement.compile(counted, self.donate)
    return self._jitted[key]


# ---------------------------------------------------------------------------------
# The partial-backprop step
# ---------------------------------------------------------------------------------


class BlockTrainStep:
  """A jit-compiled training step that backpropagates to the active block only.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: an optimizer built on :func:`absign_jax.optim.block_coordinate` (``absignsgd``,
      ``block_adam``, ...), possibly inside ``optax.chain`` or
      ``optax.inject_hyperparams``. Transformations chained outside the block wrapper
      must be stateless per leaf (scaling, clipping): they see only the block.
    layered: the model's pieces, needed for fast stacked-layer blocks (see
      :func:`absign_jax.cut_nnx`, :func:`absign_jax.cut_linen`, :func:`absign_jax.cut`).
    residuals: what the stacked program keeps of the layers above the active one: a
      :class:`ResidualPolicy` (:class:`ResidualBudget`, :class:`KeepLayers`) or an
      int ``k`` (keep ``k`` layers' activations, recompute the rest).
      The default is :data:`DEFAULT_RESIDUALS` (chosen from compiled sizes, see
      there). Every choice gives the same result; only speed and memory differ.
    dispatch: ``"auto"``, ``"per_block"`` or ``"switch"``.
    donate: donate the state's buffers (updated in place).
    loss_scale: ``None`` (off), ``"dynamic"`` or a
      :class:`~absign_jax.DynamicLossScale`, or a number (a static scale).
    rounding: how updated weights are cast to their dtype, ``"nearest"`` or
      ``"stochastic"`` (keyed by ``seed`` and the step count).
    master_copy: keep a float32 copy of the active block (see
      :mod:`absign_jax.train.precision` for its memory cost).
    seed: seed of the stochastic rounding (stored in the state by :meth:`init`).
    max_consecutive_skips: raise ``FloatingPointError`` once this many steps in a row
      had a non-finite gradient or loss (None: never).
    aggregate: ``(loss, block_grads) -> Aggregated``: how this device's loss and
      block gradient become what the optimizer gets (default :func:`local`).
    placement: how programs are compiled and arrays placed (default
      :class:`SingleDevice`; see :class:`Placement`).
    micro_batches: split each batch's rows into this many equal slices and average
      their block gradients before the update (see :func:`accumulate`): more tokens
      behind each sign at the activation memory of one slice.
    save_inputs_every: the stacked program's recomputed layers above the active one
      save every ``k``-th layer's input only, and the backward replays the segments
      between from it: ``1 - 1/k`` of those inputs' memory saved for one more
      forward of each recomputed layer. 1 (the default) saves every input. Every
      choice gives the same result.

  ``metrics`` holds ``loss``, ``block``, ``grad_norm`` (of the block), ``skipped``,
  ``loss_scale``, ``consecutive_skips`` and ``skipped_total``.

  Examples:
    >>> import jax.numpy as jnp, absign_jax
    >>> params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
    >>> loss = lambda p, x: sum(jnp.sum(l["w"] * x) for l in p["layers"])
    >>> step = absign_jax.BlockTrainStep(loss, absign_jax.absignsgd(0.5))
    >>> state, metrics = step(step.init(params), jnp.ones(2))
    >>> int(metrics["block"]), state.params["layers"][2]["w"].tolist()
    (2, [0.5, 0.5])
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *,
               layered: LayeredLoss | None = None, dispatch: str = "auto",
               residuals: ResidualPolicy | int | None = None,
               donate: bool = True,
               loss_scale: precision_lib.DynamicLossScale | str | float | None = None,
               rounding: str = "nearest", master_copy: bool = False, seed: int = 0,
               max_consecutive_skips: int | None = 20,
               aggregate: Callable[[jax.Array, list], Aggregated] = local,
               placement: Placement | None = None, micro_batches: int = 1,
               save_inputs_every: int = 1):
    if dispatch not in ("auto", "per_block", "switch"):
      raise ValueError(f"dispatch must be 'auto', 'per_block' or 'switch', got "
                       f"{dispatch!r}.")
    if rounding not in precision_lib.ROUNDINGS:
      raise ValueError(f"rounding must be one of {precision_lib.ROUNDINGS}, got "
                       f"{rounding!r}.")
    self.loss_fn = loss_fn
    self.tx = tx
    self.layered = layered
    self.residuals = _check_policy(DEFAULT_RESIDUALS if residuals is None else residuals)
    self.dispatch = dispatch
    self.loss_scale = precision_lib.resolve_loss_scale(loss_scale)
    self.rounding = rounding
    self.master_copy = bool(master_copy)
    self.seed = int(seed)
    self.max_consecutive_skips = precision_lib.check_skip_limit(max_consecutive_skips)
    self.aggregate = aggregate
    self.placement = SingleDevice() if placement is None else placement
    self.micro_batches = _check_count("micro_batches", micro_batches)
    self.save_inputs_every = _check_count(
        "save_inputs_every", save_inputs_every,
        " (1 saves every recomputed layer's input)")
    self._programs = _Programs(self.placement, donate)

  # -- public -----------------------------------------------------------------------

  def init(self, params: PyTree, opt_state: PyTree | None = None, *,
           copy_inputs: bool = True) -> TrainState:
    """The :class:`TrainState` to start from (``opt_state`` defaults to ``tx.init``).

    Args:
      params: the parameters to train.
      opt_state: the optimizer state to start from.
      copy_inputs: with donation on, the state gets its own copies of the arrays
        handed in, so the steps never delete the caller's (the model they came from
        stays readable). False hands them over instead: no second copy in memory,
        and the caller must not read them after the first step.
    """
    opt_state, callers = _starting_state(self.tx, params, opt_state, copy_inputs)
    spec = find_state(opt_state).partition.spec(params) if self.master_copy else None
    prec = precision_lib.init_precision_state(
        spec, jax.tree.leaves(params), loss_scale=self.loss_scale,
        master_copy=self.master_copy, seed=self.seed)
    return self.placement.place_state(_init_state(
        params, opt_state, prec, donate=self._programs.donate, callers=callers))

  def check(self, state: TrainState) -> None:
    """Raises ``FloatingPointError`` if training cannot make progress any more.

    That is: ``max_consecutive_skips`` steps in a row had a non-finite gradient or
    loss, or the dynamic loss scale fell below its ``min_scale``. Called by every
    step on its input (one scalar read).
    """
    precision_lib.check_progress(state.precision,
                                 max_consecutive_skips=self.max_consecutive_skips,
                                 loss_scale=self.loss_scale)

  def __call__(self, *args) -> tuple[TrainState, dict]:
    """``state, metrics = step(state, batch)``."""
    if len(args) != 2 or not isinstance(args[0], TrainState):
      raise _call_error()
    state, batch = args
    _check_live(state)
    self.check(state)
    state, batch = self.placement.place_state(state), self.placement.place_batch(batch)
    params, opt_state, prec, metrics = self.program_for(state)(*state, batch)
    return TrainState(params, opt_state, prec), metrics

  def lower(self, state: TrainState, batch: Batch, *, block: int | None = None):
    """The lowered program that would run (``.compile().memory_analysis()`` sizes it).

    ``state`` and ``batch`` may hold ``jax.ShapeDtypeStruct``s (e.g.
    ``jax.eval_shape(step.init, params)``). With per-block dispatch, ``block`` picks
    the variant (default: the active one).
    """
    if not isinstance(state, TrainState):
      raise _call_error()
    state, batch = self.placement.place_state(state), self.placement.place_batch(batch)
    return self.program_for(state, block).lower(*state, batch)

  def program_for(self, state: TrainState, block: int | None = None):
    """The compiled program that runs ``state``'s next step (or ``block``'s).

    The one place where dispatch is decided. Reads the active block from the device
    only for per-block dispatch of blocks that are not all stacked.
    """
    spec = find_state(state.opt_state).partition.spec(state.params)
    if self.dispatch == "switch":
      return self._programs.get("switch", self._switch_program)
    rng = spec.stacked_range() if self.layered is not None else None
    if block is None:
      if rng == (0, spec.num_blocks):
        # Every block is a stacked layer: one program, no host read.
        return self._programs.get("stacked", self._stacked_program)
      block = int(active_block(state.opt_state))  # the one host read dispatch needs
    if rng is not None and rng[0] <= block < rng[1]:
      return self._programs.get("stacked", self._stacked_program)
    return self._programs.get(block, lambda *a, b=block: self._block_program(b, *a))

  @property
  def compiled_programs(self) -> int:
    """How many programs this step has compiled (or lowered) so far.

    One per block for per-block dispatch, one in all for ``"switch"`` and for the
    stacked program; a program compiles again only for new input shapes or dtypes.
    """
    return sum(self._programs.traces.values())

  def kept_layers(self, stack: PyTree, h: jax.Array, ctx: Any = None) -> int:
    """How many layers above the active one keep their activations (the policy's
    answer for this stack, hidden-state shape and batch context, clipped to
    ``0 .. n-1``)."""
    n = jax.tree.leaves(stack)[0].shape[0]
    k = self.residuals(_layer_cost(self.layered.apply_layer, stack, h, ctx))
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
      raise TypeError(f"the residual policy returned {k!r}; it must return an int.")
    return int(min(max(k, 0), n - 1))

  # -- programs ---------------------------------------------------------------------

  def _update(self, spec, flat, treedef, members, block_id, group_block, grads, loss,
              params, opt_state, prec):
    """The optimizer update of one block from its gradient, and the apply."""
    red = self.aggregate(loss, grads)
    finite = red.finite
    grads = precision_lib.unscale(red.grads, prec, self.loss_scale)
    sparse = [None] * len(flat)
    for (i, _), g in zip(members, grads):
      sparse[i] = g
    updates, new_state = self.tx.update(jax.tree.unflatten(treedef, sparse), opt_state,
                                        params, block=block_id)
    upd = jax.tree.flatten(updates, is_leaf=lambda x: x is None)[0]
    master_group = None
    if self.master_copy:
      leaves = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in flat]
      master_group = int(partition_lib.block_groups(spec, leaves)[0][group_block])
    new_flat, master, master_block = precision_lib.apply_block_update(
        flat, members, upd, finite, prec, rounding=self.rounding,
        master_group=master_group, block_id=block_id)
    # Float32 gradients must not change the dtype of a low-precision optimizer state.
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                             new_state, opt_state)
    new_prec = precision_lib.advance(prec, finite, self.loss_scale, master=master,
                                     master_block=master_block)
    metrics = {
        "loss": red.loss,
        "block": find_state(opt_state).active,
        "grad_norm": _block_norm(grads) if red.grad_norm is None else red.grad_norm,
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
        "loss_scale": prec.loss_scale.scale,
        "consecutive_skips": new_prec.consecutive_skips,
        "skipped_total": new_prec.skipped_total,
    }
    return jax.tree.unflatten(treedef, new_flat), new_state, new_prec, metrics

  def _block_program(self, b, params, opt_state, prec, batch):
    spec = find_state(opt_state).partition.spec(params)
    flat, treedef = jax.tree.flatten(params)
    members = spec.members[b]

    def block_loss(block_leaves, batch):
      leaves = list(flat)
      for (i, s), v in zip(members, block_leaves):
        leaves[i] = v if s is None else leaves[i].at[s].set(v)
      return self.loss_fn(jax.tree.unflatten(treedef, leaves), batch)

    scaled = precision_lib.scaled_loss(block_loss, prec, self.loss_scale)
    active = partition_lib.gather_block(spec, flat, b)

    def grad_fn(batch):
      (_, loss), grads = jax.value_and_grad(scaled, has_aux=True)(active, batch)
      return loss, grads

    loss, grads = accumulate(grad_fn, batch, self.micro_batches)
    return self._update(spec, flat, treedef, members, b, b, grads, loss, params,
                        opt_state, prec)

  def _stacked_program(self, params, opt_state, prec, batch):
    lay = self.layered
    spec = find_state(opt_state).partition.spec(params)
    lo, _ = spec.stacked_range()
    flat, treedef = jax.tree.flatten(params)
    j = find_state(opt_state).active - lo
    stack = subtree(params, lay.stack_path)

    layer = lay.apply_layer

    def grad_fn(batch):
      h = lay.embed(params, batch)
      ctx = lay.batch_context(params, batch)  # once per step, outside the layers
      k = self.kept_layers(stack, h, ctx)
      h = jax.lax.fori_loop(0, j, lambda i, h: layer(_take(stack, i), h, ctx), h)

      def loss_from_active(w):
        out = layer(w, h, ctx)
        # Layers j+1 .. n-k-1 are recomputed in the backward, the top k kept (the
        # number recomputed, max(0, n-1-j-k), is the same whichever k are kept).
        out = _layers_above(layer, stack, j, out, keep=k, ctx=ctx,
                            every=self.save_inputs_every)
        return lay.head_loss(params, out, batch)

      scaled = precision_lib.scaled_loss(loss_from_active, prec, self.loss_scale)
      (_, loss), g_tree = jax.value_and_grad(scaled, has_aux=True)(_take(stack, j))
      return loss, jax.tree.leaves(g_tree)

    loss, grads = accumulate(grad_fn, batch, self.micro_batches)
    if len(grads) != len(spec.members[lo]):
      raise ValueError("LayeredLoss.stack_path does not point at the stacked layers "
                       "the block partition found.")
    members = [(i, j) for i, _ in spec.members[lo]]
    return self._update(spec, flat, treedef, members, j + lo, lo, grads, loss, params,
                        opt_state, prec)

  def _switch_program(self, params, opt_state, prec, batch):
    spec = find_state(opt_state).partition.spec(params)
    rng = spec.stacked_range() if self.layered is not None else None
    branches, table = [], []
    for b in range(spec.num_blocks):
      if rng is not None and rng[0] <= b < rng[1]:
        if b == rng[0]:
          branches.append(self._stacked_program)
      else:
        branches.append(lambda p, s, q, x, b=b: self._block_program(b, p, s, q, x))
      table.append(len(branches) - 1)
    index = jnp.asarray(np.asarray(table, np.int32))[find_state(opt_state).active]
    return jax.lax.switch(index, branches, params, opt_state, prec, batch)


# ---------------------------------------------------------------------------------
# The full-backprop step
# ---------------------------------------------------------------------------------


class FullTrainStep:
  """The ordinary step: full backprop, any optax optimizer (the baseline).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: any optax transformation.
    donate: donate the state's buffers (updated in place).
    seed: stored in the state's :class:`~absign_jax.train.precision.PrecisionState`.
    max_consecutive_skips: raise ``FloatingPointError`` once this many steps in a row
      had a non-finite gradient or loss (None: never).
    aggregate: ``(loss, grad_leaves) -> Aggregated`` (default :func:`local`).
    placement: how the program is compiled and arrays placed (default
      :class:`SingleDevice`).
    micro_batches: split each batch's rows into this many equal slices and average
      their gradients before the update (see :func:`accumulate`).

  Call it like :class:`BlockTrainStep`: ``state = step.init(params)``, ``state, metrics
  = step(state, batch)``. ``metrics`` holds ``loss``, ``grad_norm``, ``skipped``,
  ``consecutive_skips`` and ``skipped_total``. Loss scaling, stochastic rounding and
  the master copy are options of the block step only.
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *,
               donate: bool = True, seed: int = 0,
               max_consecutive_skips: int | None = 20,
               aggregate: Callable[[jax.Array, list], Aggregated] = local,
               placement: Placement | None = None, micro_batches: int = 1):
    self.loss_fn = loss_fn
    self.tx = tx
    self.seed = int(seed)
    self.micro_batches = _check_count("micro_batches", micro_batches)
    self.max_consecutive_skips = precision_lib.check_skip_limit(max_consecutive_skips)
    self.aggregate = aggregate
    self.placement = SingleDevice() if placement is None else placement
    self._programs = _Programs(self.placement, donate)

  def init(self, params: PyTree, opt_state: PyTree | None = None, *,
           copy_inputs: bool = True) -> TrainState:
    """The :class:`TrainState` to start from; the arguments are those of
    :meth:`BlockTrainStep.init`."""
    opt_state, callers = _starting_state(self.tx, params, opt_state, copy_inputs)
    prec = precision_lib.init_precision_state(None, [], seed=self.seed)
    return self.placement.place_state(_init_state(
        params, opt_state, prec, donate=self._programs.donate, callers=callers))

  def check(self, state: TrainState) -> None:
    """Raises ``FloatingPointError`` after ``max_consecutive_skips`` skipped steps."""
    precision_lib.check_progress(state.precision,
                                 max_consecutive_skips=self.max_consecutive_skips,
                                 loss_scale=None)

  def __call__(self, *args) -> tuple[TrainState, dict]:
    """``state, metrics = step(state, batch)``."""
    if len(args) != 2 or not isinstance(args[0], TrainState):
      raise _call_error()
    state, batch = args
    _check_live(state)
    self.check(state)
    state, batch = self.placement.place_state(state), self.placement.place_batch(batch)
    params, opt_state, prec, metrics = self._program()(*state, batch)
    return TrainState(params, opt_state, prec), metrics

  def lower(self, state: TrainState, batch: Batch, *, block: int | None = None):
    """The lowered program (``block`` is accepted for symmetry and ignored)."""
    del block  # one program for every step
    if not isinstance(state, TrainState):
      raise _call_error()
    state, batch = self.placement.place_state(state), self.placement.place_batch(batch)
    return self._program().lower(*state, batch)

  @property
  def compiled_programs(self) -> int:
    """How many programs this step has compiled (or lowered) so far."""
    return sum(self._programs.traces.values())

  def _program(self):
    return self._programs.get("full", self._full_program)

  def _full_program(self, params, opt_state, prec, batch):
    loss, grads = accumulate(lambda b: jax.value_and_grad(self.loss_fn)(params, b),
                             batch, self.micro_batches)
    leaves, treedef = jax.tree.flatten(grads)
    red = self.aggregate(loss, leaves)
    grads = jax.tree.unflatten(treedef, red.grads)
    updates, new_state = self.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = red.finite
    keep = lambda n, o: jnp.where(finite, n, o).astype(o.dtype)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_state, opt_state)
    prec = precision_lib.advance(prec, finite, None)
    metrics = {
        "loss": red.loss,
        "grad_norm": optax.tree.norm(grads) if red.grad_norm is None else red.grad_norm,
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
        "consecutive_skips": prec.consecutive_skips,
        "skipped_total": prec.skipped_total,
    }
    return params, opt_state, prec, metrics
