"""The partial-backprop training step (SPEC §4).

A block-coordinate optimizer changes one block per step, so the step differentiates
with respect to that block's parameters only. Everything else is a constant to
``jax.value_and_grad``: layers below the active block run forward only (JAX's partial
evaluation keeps no residuals for them), layers above it get activation gradients but
no weight-gradient products, and frozen embeddings/head get no gradient at all.

Dispatch — how the active block, which lives in the optimizer state on the device,
selects the program that runs:

* ``"per_block"``: one executable per block, compiled lazily the first time the block
  is active (JAX's persistent compilation cache applies). The host reads the active
  block (one int32 scalar) before each step: that read is what dispatch needs.
* ``"switch"``: one executable holding every block's program in a ``lax.switch`` on the
  active block: no host read, all compilation up front.
* Stacked layers (one leaf with a leading layer axis, applied with a scan) have one
  program for all layers with a *dynamic* block index: layers below run in a
  ``fori_loop`` (forward only), the active layer is differentiated, layers above run
  in a ``scan`` whose body skips the layers at or below the active one, with a custom
  backward that saves only each layer's input and recomputes the layers above (no
  copy of the stacked weights, no backward work below the active layer). This needs
  the model's pieces (:class:`LayeredLoss`); with a plain loss function, stacked
  blocks fall back to differentiating through the whole scan (correct, not faster).

``"auto"`` picks ``"per_block"`` when no block is stacked and the dynamic program for
stacked blocks (measured choices: see BENCHMARKS.md).

A step whose block gradient or loss is not finite changes nothing: parameters and
optimizer state are returned as they were (the block keeps its turn) and
``metrics["skipped"]`` is 1.

Two calling forms:

* ``params, opt_state, metrics = step(params, opt_state, batch)``: the plain step
  (the update is computed in the gradient's dtype and cast to the parameter dtype).
* ``state, metrics = step(state, batch)`` with ``state = step.init(params, opt_state)``,
  a :class:`TrainState`: the step also carries a
  :class:`~absign_jax.precision.PrecisionState` (SPEC §5): a dynamic loss scale
  (``loss_scale=``), stochastic rounding of low-precision weights
  (``rounding="stochastic"``), a float32 master copy of the active block
  (``master_copy=True``) and the skip counters (``consecutive_skips``,
  ``skipped_total``, also in the metrics). The block gradient is unscaled and the
  update computed in float32, then rounded once to the parameter dtype. Too many
  non-finite steps in a row (``max_consecutive_skips``) or a loss scale below its
  minimum raise ``FloatingPointError`` at the next call, before anything is donated.
  The options that need the state (loss scale, stochastic rounding, master copy)
  are refused by the plain form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absign_jax import partition as partition_lib
from absign_jax import precision as precision_lib
from absign_jax.block_coordinate import active_block, find_state

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]


class LayeredLoss(NamedTuple):
  """A model cut at its stacked layers, as pure functions of the parameter tree.

  Attributes:
    embed: ``(params, batch) -> h``, everything before the first layer.
    layer: ``(layer_params, h) -> h``, one layer given its slice of the stacked tree.
    head_loss: ``(params, h, batch) -> loss``, everything after the last layer.
    stack_path: keys from the root of ``params`` to the stacked layer subtree.
  """

  embed: Callable[[PyTree, Batch], jax.Array]
  layer: Callable[[PyTree, jax.Array], jax.Array]
  head_loss: Callable[[PyTree, jax.Array, Batch], jax.Array]
  stack_path: tuple

  def loss(self, params: PyTree, batch: Batch) -> jax.Array:
    """The full loss (all layers), as a plain loss function."""
    h = self.embed(params, batch)
    h, _ = jax.lax.scan(lambda h, w: (self.layer(w, h), None), h,
                        _subtree(params, self.stack_path))
    return self.head_loss(params, h, batch)


class TrainState(NamedTuple):
  """Everything a :class:`BlockTrainStep` in state form reads and writes.

  A plain pytree (checkpoint it whole, see :mod:`absign_jax.checkpoint`).

  Attributes:
    params: the parameter tree.
    opt_state: the optimizer state (block selection included).
    precision: the :class:`~absign_jax.precision.PrecisionState`.
  """

  params: PyTree
  opt_state: PyTree
  precision: precision_lib.PrecisionState


def _subtree(params, path):
  for key in path:
    params = params[key]
  return params


def _block_norm(grads) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads))


def _all_finite(loss, grads) -> jax.Array:
  ok = jnp.isfinite(loss)
  for g in grads:
    ok &= jnp.all(jnp.isfinite(g))
  return ok


def _take(stack, i):
  """Layer ``i`` of a stacked layer tree (``i`` may be traced)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), stack)


def _layers_above(layer, stack, j, h):
  """Layers ``j+1 .. n-1`` of ``stack`` applied to ``h``; differentiable in ``h`` only.

  The stacked program's memory and speed hinge on this: autodiff of a plain scan
  over the stack would save every layer's weights as residuals (a second copy of
  the stack) and run the backward of the skipped layers too. Here the forward saves
  only each layer's input, and the backward recomputes layer ``i``'s vector-Jacobian
  product from ``stack[i]`` for ``i > j`` (a ``cond`` skips the others), so the
  layers above the active one cost one extra forward each and no weight copy.
  """
  n = jax.tree.leaves(stack)[0].shape[0]

  def apply(h, stack, j):
    def body(h, i):
      return jax.lax.cond(i > j, lambda h: layer(_take(stack, i), h), lambda h: h, h), h
    return jax.lax.scan(body, h, jnp.arange(n))

  @jax.custom_vjp
  def run(h, stack, j):
    return apply(h, stack, j)[0]

  def fwd(h, stack, j):
    out, inputs = apply(h, stack, j)
    return out, (inputs, stack, j)

  def bwd(res, ct):
    inputs, stack, j = res

    def body(ct, xs):
      h_i, i = xs

      def back(ct):
        _, vjp = jax.vjp(lambda x: layer(_take(stack, i), x), h_i)
        return vjp(ct)[0]

      return jax.lax.cond(i > j, back, lambda ct: ct, ct), None

    ct, _ = jax.lax.scan(body, ct, (inputs, jnp.arange(n)), reverse=True)
    return ct, None, None  # stack and j: constants of the step, no cotangent

  run.defvjp(fwd, bwd)
  return run(h, stack, j)


class BlockTrainStep:
  """A jit-compiled training step that backpropagates to the active block only.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: an optimizer built on :func:`absign_jax.block_coordinate` (``absignsgd``,
      ``block_adam``, ...), possibly inside ``optax.chain`` or
      ``optax.inject_hyperparams``. Transformations chained outside the block wrapper
      must be stateless per leaf (scaling, clipping): they see only the block.
    layered: the model's pieces, needed for fast stacked-layer blocks.
    dispatch: ``"auto"``, ``"per_block"`` or ``"switch"``.
    donate: donate parameter and optimizer-state buffers (updated in place).
    loss_scale: state form only: ``None`` (off), ``"dynamic"`` or a
      :class:`~absign_jax.precision.DynamicLossScale`, or a number (a static scale).
    rounding: how updated weights are cast to their dtype, ``"nearest"`` or
      ``"stochastic"`` (state form; keyed by ``seed`` and the step count).
    master_copy: state form: keep a float32 copy of the active block (see
      :mod:`absign_jax.precision` for its memory cost).
    seed: seed of the stochastic rounding (stored in the state by :meth:`init`).
    max_consecutive_skips: state form: raise ``FloatingPointError`` once this many
      steps in a row had a non-finite gradient or loss (None: never).

  Call it as ``params, opt_state, metrics = step(params, opt_state, batch)`` or, in
  state form, ``state, metrics = step(state, batch)``. ``metrics`` holds ``loss``,
  ``block``, ``grad_norm`` (of the block) and ``skipped``; the state form adds
  ``loss_scale``, ``consecutive_skips`` and ``skipped_total``.

  Example:
    >>> import jax.numpy as jnp, absign_jax
    >>> params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
    >>> loss = lambda p, x: sum(jnp.sum(l["w"] * x) for l in p["layers"])
    >>> tx = absign_jax.absignsgd(0.5)
    >>> step = absign_jax.BlockTrainStep(loss, tx)
    >>> params, state, metrics = step(params, tx.init(params), jnp.ones(2))
    >>> int(metrics["block"]), params["layers"][2]["w"].tolist()
    (2, [0.5, 0.5])
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *,
               layered: LayeredLoss | None = None, dispatch: str = "auto",
               donate: bool = True,
               loss_scale: precision_lib.DynamicLossScale | str | float | None = None,
               rounding: str = "nearest", master_copy: bool = False, seed: int = 0,
               max_consecutive_skips: int | None = 20):
    if dispatch not in ("auto", "per_block", "switch"):
      raise ValueError(f"dispatch must be 'auto', 'per_block' or 'switch', got "
                       f"{dispatch!r}.")
    if rounding not in precision_lib.ROUNDINGS:
      raise ValueError(f"rounding must be one of {precision_lib.ROUNDINGS}, got "
                       f"{rounding!r}.")
    if max_consecutive_skips is not None and (
        not isinstance(max_consecutive_skips, (int, np.integer))
        or max_consecutive_skips < 1):
      raise ValueError(f"max_consecutive_skips must be an int >= 1 or None, got "
                       f"{max_consecutive_skips!r}.")
    self.loss_fn = loss_fn
    self.tx = tx
    self.layered = layered
    self.dispatch = dispatch
    self.loss_scale = precision_lib.resolve_loss_scale(loss_scale)
    self.rounding = rounding
    self.master_copy = bool(master_copy)
    self.seed = int(seed)
    self.max_consecutive_skips = max_consecutive_skips
    donate_argnums = (0, 1, 2) if donate else ()
    self._per_block = jax.jit(self._static_block_step, static_argnums=0,
                              donate_argnums=tuple(d + 1 for d in donate_argnums))
    self._switch = jax.jit(self._switch_step, donate_argnums=donate_argnums)
    self._stacked = jax.jit(self._stacked_step, donate_argnums=donate_argnums)

  # -- public -----------------------------------------------------------------------

  @property
  def needs_state(self) -> bool:
    """Whether the options need the state form (:meth:`init`)."""
    return (self.loss_scale is not None or self.rounding != "nearest"
            or self.master_copy)

  def init(self, params: PyTree, opt_state: PyTree | None = None) -> TrainState:
    """The :class:`TrainState` to start from (``opt_state`` defaults to ``tx.init``)."""
    if opt_state is None:
      opt_state = self.tx.init(params)
    # The step returns strongly typed state (jnp.where); a weakly typed input leaf
    # (optax.inject_hyperparams keeps Python ints weak) would retrace the second step.
    opt_state = jax.tree.map(
        lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x,
        opt_state)
    # Donation needs distinct buffers: an optimizer state may hold one array twice
    # (e.g. two counters initialised from the same zeros).
    seen: set[int] = set()

    def distinct(x):
      if isinstance(x, jax.Array) and id(x) in seen:
        return jnp.copy(x)
      seen.add(id(x))
      return x

    params, opt_state = jax.tree.map(distinct, (params, opt_state))
    spec = find_state(opt_state).partition.spec(params) if self.master_copy else None
    prec = precision_lib.init_precision_state(
        spec, jax.tree.leaves(params), loss_scale=self.loss_scale,
        master_copy=self.master_copy, seed=self.seed)
    return TrainState(params, opt_state, prec)

  def check(self, state: TrainState) -> None:
    """Raises ``FloatingPointError`` if training cannot make progress any more.

    That is: ``max_consecutive_skips`` steps in a row had a non-finite gradient or
    loss, or the dynamic loss scale fell below its ``min_scale``. Called by every
    state-form step on its input (one scalar read).
    """
    prec = state.precision
    limit = self.max_consecutive_skips
    if limit is not None:
      skips = int(prec.consecutive_skips)
      if skips >= limit:
        raise FloatingPointError(
            f"{skips} training steps in a row had a non-finite (inf/NaN) block "
            f"gradient or loss (limit max_consecutive_skips={limit}); parameters have "
            f"not changed since. Loss scale {float(prec.loss_scale.scale):g}. Check "
            "the data and the learning rate, or train in bf16/fp32 instead of fp16.")
    if self.loss_scale is not None:
      scale = float(prec.loss_scale.scale)
      if scale < self.loss_scale.min_scale:
        raise FloatingPointError(
            f"the loss scale underflowed to {scale:g} (< min_scale "
            f"{self.loss_scale.min_scale:g}): gradients overflow float16 even "
            "unscaled. Check the loss for inf/NaN, or train in bf16/fp32.")

  def __call__(self, *args):
    """``step(params, opt_state, batch)`` or ``step(state, batch)`` (see the class)."""
    if len(args) == 2 and isinstance(args[0], TrainState):
      state, batch = args
      self.check(state)
      fn = self._select(state.params, state.opt_state)
      params, opt_state, prec, metrics = fn(state.params, state.opt_state,
                                            state.precision, batch)
      return TrainState(params, opt_state, prec), metrics
    if len(args) != 3 or isinstance(args[0], TrainState):
      raise TypeError("call the step as step(params, opt_state, batch) or "
                      "step(state, batch) with state = step.init(params, opt_state).")
    if self.needs_state:
      raise ValueError(
          "this step has loss scaling, stochastic rounding or a master copy, which "
          "keep state: call it as state, metrics = step(state, batch) with "
          "state = step.init(params, opt_state).")
    params, opt_state, batch = args
    params, opt_state, _, metrics = self._select(params, opt_state)(
        params, opt_state, None, batch)
    return params, opt_state, metrics

  def lower(self, *args, block: int | None = None):
    """The lowered program that would run (``.compile().memory_analysis()`` sizes it).

    Takes the arguments of a call: ``(params, opt_state, batch)`` or
    ``(state, batch)``. With per-block dispatch, ``block`` picks the variant
    (default: the active one); it may also be given positionally after the batch.
    """
    if isinstance(args[0], TrainState):
      (state, batch), rest = args[:2], args[2:]
      params, opt_state, prec = state
    else:
      (params, opt_state, batch), rest = args[:3], args[3:]
      prec = None
    if rest:
      block, = rest
    mode, spec = self._mode(params, opt_state)
    if mode == "switch":
      return self._switch.lower(params, opt_state, prec, batch)
    b = int(active_block(opt_state)) if block is None else block
    if self._is_stacked(spec, b):
      return self._stacked.lower(params, opt_state, prec, batch)
    return self._per_block.lower(b, params, opt_state, prec, batch)

  # -- dispatch ---------------------------------------------------------------------

  def _mode(self, params, opt_state):
    spec = find_state(opt_state).partition.spec(params)
    mode = self.dispatch
    if mode == "auto":
      mode = "per_block"
    return mode, spec

  def _is_stacked(self, spec, b):
    rng = spec.stacked_range()
    return self.layered is not None and rng is not None and rng[0] <= b < rng[1]

  def _select(self, params, opt_state):
    mode, spec = self._mode(params, opt_state)
    if mode == "switch":
      return self._switch
    rng = spec.stacked_range()
    if self.layered is not None and rng is not None and rng == (0, spec.num_blocks):
      return self._stacked  # every block is a stacked layer: one program, no host read
    b = int(active_block(opt_state))  # the one host read dispatch needs
    if self._is_stacked(spec, b):
      return self._stacked
    return lambda p, s, q, x: self._per_block(b, p, s, q, x)

  # -- programs ---------------------------------------------------------------------

  def _scaled(self, f, prec):
    """``f`` returning ``(loss * scale, loss)`` for ``value_and_grad(has_aux=True)``."""
    if prec is None or self.loss_scale is None:
      return lambda *a: (lambda l: (l, l))(f(*a))
    scale = prec.loss_scale.scale
    return lambda *a: (lambda l: (l.astype(jnp.float32) * scale, l))(f(*a))

  def _finish(self, spec, flat, treedef, b, grads, loss, params, opt_state, prec,
              j=None):
    """Optimizer update for block ``b`` (or the stacked slice ``j``) and the apply."""
    if j is None:
      members = spec.members[b]
      block_id = b
    else:
      lo = spec.stacked_range()[0]
      members = [(i, j) for i, _ in spec.members[lo]]
      block_id = j + lo
    finite = _all_finite(loss, grads)
    if prec is not None:  # unscale, and compute the update in float32
      grads = [g.astype(jnp.float32) for g in grads]
      if self.loss_scale is not None:
        grads = [g / prec.loss_scale.scale for g in grads]
    sparse = [None] * len(flat)
    for (i, _), g in zip(members, grads):
      sparse[i] = g
    sparse_tree = jax.tree.unflatten(treedef, sparse)
    updates, new_state = self.tx.update(sparse_tree, opt_state, params, block=block_id)
    upd = jax.tree.flatten(updates, is_leaf=lambda x: x is None)[0]
    new_flat = list(flat)
    if prec is None:
      for i, s in members:
        p = flat[i]
        if s is None:
          new_flat[i] = jnp.where(finite, (p + upd[i]).astype(p.dtype), p)
        else:
          old = jax.lax.dynamic_index_in_dim(p, s, 0, keepdims=False)
          new = jnp.where(finite, (old + upd[i]).astype(p.dtype), old)
          new_flat[i] = jax.lax.dynamic_update_index_in_dim(p, new, s, 0)
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                               opt_state)
      new_prec = None
    else:
      new_flat, new_prec = self._apply_precise(
          spec, flat, members, upd, finite, prec, block_id, b if j is None else lo)
      # Float32 gradients must not change the dtype of a low-precision optimizer state.
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                               new_state, opt_state)
    metrics = {
        "loss": loss,
        "block": find_state(opt_state).active,
        "grad_norm": _block_norm(grads),
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
    }
    if new_prec is not None:
      metrics.update(loss_scale=prec.loss_scale.scale,
                     consecutive_skips=new_prec.consecutive_skips,
                     skipped_total=new_prec.skipped_total)
    return jax.tree.unflatten(treedef, new_flat), new_state, new_prec, metrics

  def _apply_precise(self, spec, flat, members, upd, finite, prec, block_id,
                     group_block):
    """``p + u`` in float32, from the master copy if any, rounded once."""
    key = jax.random.fold_in(jax.random.wrap_key_data(prec.rng), prec.count)
    master, master_block = prec.master, prec.master_block
    if self.master_copy:
      leaves = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in flat]
      gid = int(partition_lib.block_groups(spec, leaves)[0][group_block])
      slot = list(master[gid])
      fresh = master_block[gid] != block_id  # a block switch: start from the weights
    new_flat = list(flat)
    for k, (i, s) in enumerate(members):
      p = flat[i]
      old = p if s is None else jax.lax.dynamic_index_in_dim(p, s, 0, keepdims=False)
      base = old.astype(jnp.float32)
      if self.master_copy:
        base = jnp.where(fresh, base, slot[k])
      new32 = base + upd[i].astype(jnp.float32)
      new = precision_lib.round_to(new32, p.dtype, self.rounding,
                                   jax.random.fold_in(key, k))
      new = jnp.where(finite, new, old)
      if self.master_copy:
        slot[k] = jnp.where(finite, new32, slot[k])
      new_flat[i] = new if s is None else jax.lax.dynamic_update_index_in_dim(
          p, new, s, 0)
    if self.master_copy:
      master = tuple(tuple(slot) if g == gid else m for g, m in enumerate(master))
      master_block = master_block.at[gid].set(
          jnp.where(finite, block_id, master_block[gid]).astype(jnp.int32))
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_prec = precision_lib.PrecisionState(
        count=prec.count + 1,
        rng=prec.rng,
        loss_scale=precision_lib.update_loss_scale(self.loss_scale, prec.loss_scale,
                                                   finite),
        consecutive_skips=jnp.where(finite, 0, prec.consecutive_skips + 1
                                    ).astype(jnp.int32),
        skipped_total=prec.skipped_total + skipped,
        master=master,
        master_block=master_block,
    )
    return new_flat, new_prec

  def _static_block_step(self, b, params, opt_state, prec, batch):
    spec = find_state(opt_state).partition.spec(params)
    flat, treedef = jax.tree.flatten(params)
    members = spec.members[b]

    def block_loss(block_leaves):
      leaves = list(flat)
      for (i, s), v in zip(members, block_leaves):
        leaves[i] = v if s is None else leaves[i].at[s].set(v)
      return self.loss_fn(jax.tree.unflatten(treedef, leaves), batch)

    (_, loss), grads = jax.value_and_grad(self._scaled(block_loss, prec), has_aux=True)(
        partition_lib.gather_block(spec, flat, b))
    return self._finish(spec, flat, treedef, b, grads, loss, params, opt_state, prec)

  def _stacked_step(self, params, opt_state, prec, batch):
    lay = self.layered
    spec = find_state(opt_state).partition.spec(params)
    lo, _ = spec.stacked_range()
    flat, treedef = jax.tree.flatten(params)
    j = find_state(opt_state).active - lo
    stack = _subtree(params, lay.stack_path)

    h = lay.embed(params, batch)
    h = jax.lax.fori_loop(0, j, lambda i, h: lay.layer(_take(stack, i), h), h)

    def loss_from_active(w):
      out = _layers_above(lay.layer, stack, j, lay.layer(w, h))
      return lay.head_loss(params, out, batch)

    (_, loss), g_tree = jax.value_and_grad(
        self._scaled(loss_from_active, prec), has_aux=True)(_take(stack, j))
    grads = jax.tree.leaves(g_tree)
    if len(grads) != len(spec.members[lo]):
      raise ValueError("LayeredLoss.stack_path does not point at the stacked layers "
                       "the block partition found.")
    return self._finish(spec, flat, treedef, None, grads, loss, params, opt_state, prec,
                        j=j)

  def _switch_step(self, params, opt_state, prec, batch):
    spec = find_state(opt_state).partition.spec(params)
    rng = spec.stacked_range()
    branches, table = [], []
    for b in range(spec.num_blocks):
      if self._is_stacked(spec, b):
        if b == rng[0]:
          branches.append(self._stacked_step)
        table.append(len(branches) - 1)
      else:
        branches.append(lambda p, s, q, x, b=b: self._static_block_step(b, p, s, q, x))
        table.append(len(branches) - 1)
    index = jnp.asarray(np.asarray(table, np.int32))[find_state(opt_state).active]
    return jax.lax.switch(index, branches, params, opt_state, prec, batch)


class FullTrainStep:
  """The ordinary step: full backprop, any optax optimizer (the baseline).

  Call it as ``params, opt_state, metrics = step(params, opt_state, batch)``.
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *,
               donate: bool = True):
    self.loss_fn = loss_fn
    self.tx = tx

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    self._step = jax.jit(step, donate_argnums=(0, 1) if donate else ())

  def __call__(self, params, opt_state, batch):
    return self._step(params, opt_state, batch)

  def lower(self, params, opt_state, batch, block=None):
    return self._step.lower(params, opt_state, batch)


class NnxParts(NamedTuple):
  """A Flax NNX model taken apart for the functional training steps.

  Attributes:
    graphdef: the model's graph definition.
    params: its ``nnx.Param`` state (what the optimizer updates).
    rest: all other state (kept constant by the step).
    loss_fn: ``(params, batch) -> model.loss(batch)``.
    layered: the :class:`LayeredLoss` of a stacked-layer model, else None.
  """

  graphdef: Any
  params: Any
  rest: Any
  loss_fn: LossFn
  layered: LayeredLoss | None

  def merge(self, params) -> Any:
    """The model with ``params`` put back (e.g. after training)."""
    from flax import nnx
    return nnx.merge(self.graphdef, params, self.rest)


def split_nnx(model) -> NnxParts:
  """Splits an NNX model that follows the layered protocol into pure functions.

  The model provides ``loss(batch)``; for stacked layers (``model.stacked``) also
  ``embed(inputs)``, ``layers_graphdef`` and ``head_loss(h, targets, mask)`` with its
  stacked layers at ``model.layers`` (see :mod:`absign_jax.llm.model`). A layer's
  ``forward(h)``, when it has one, is its call without remat: the stacked program
  recomputes the layers above the active one itself, so per-layer remat would only
  add a third forward.
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  merge = lambda p: nnx.merge(graphdef, p, rest)
  loss_fn = lambda p, batch: merge(p).loss(batch)
  layered = None
  if getattr(model, "stacked", False):
    layer_graphdef = model.layers_graphdef
    layered = LayeredLoss(
        embed=lambda p, batch: merge(p).embed(batch["inputs"]),
        layer=lambda w, h: _forward(nnx.merge(layer_graphdef, w))(h),
        head_loss=lambda p, h, batch: merge(p).head_loss(
            h, batch["targets"], batch.get("mask")),
        stack_path=("layers",),
    )
  return NnxParts(graphdef, params, rest, loss_fn, layered)


def _forward(layer):
  return getattr(layer, "forward", layer)


def tree_bytes(tree: PyTree) -> int:
  """Bytes held by the arrays of ``tree`` (e.g. an optimizer state)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def program_memory(compiled) -> dict[str, int | None]:
  """Sizes from XLA's ``memory_analysis()`` of a compiled step.

  ``total`` = argument + output + temp - alias bytes (donated buffers count once).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {"total": None}
  out = {k: int(getattr(m, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out
