"""The block-coordinate wrapper: one block per step, for any optax transformation.

``block_coordinate(inner)`` applies ``inner`` to the active block only and leaves
every other leaf untouched; after ``steps_per_block`` updates it asks a
:class:`~absign_jax.blocks.selection.BlockSelection` for the next block. ABSignSGD is
``block_coordinate(sign descent, depth-biased selection)``; a BAdam-style baseline is
``block_coordinate(adam, cyclic, steps_per_block=K, reset_on_switch=True)``.

The inner state exists once per *group* of blocks with equal shapes (all
transformer layers form one group), not once per block: a stateful inner
transformation costs the memory of one layer, as in BAdam.

Inactive entries of the returned updates are ``+0.0``. Put the learning rate *after*
the wrapper (``optax.scale_by_learning_rate``): it turns them into ``-0.0``, and
``x + (-0.0) == x`` bit for bit for every float ``x`` (``-0.0 + 0.0`` would be
``+0.0``), so untouched blocks stay bit-identical after ``optax.apply_updates``.

Two calling modes:

* ``update(grads, state, params)`` with full gradients (any optax loop, including
  ``nnx.Optimizer``). The active block is read from the state inside the compiled
  program (``lax.switch``), so there is no retrace from step to step.
* ``update(block_grads, state, params, block=b)`` from the partial-backprop step:
  ``block_grads`` has the gradient at the leaves of block ``b`` (the slice, for a
  stacked leaf) and ``None`` elsewhere; ``params`` is the full tree. The updates come
  back in the same sparse form. ``b`` is a Python int, or a traced index for blocks
  that are slices of stacked leaves.

In both modes ``update`` checks, when it is traced (static paths and shapes, no cost
in the compiled program), that the gradients and the parameters have the paths and
shapes of the parameters the state was initialised with; in the sparse form a stacked
leaf's gradient is the active layer's slice. A mismatch is a ``ValueError`` naming the
first differing path.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absign_jax._checks import check_bool, check_int, check_number, check_real
from absign_jax.blocks import partition as partition_lib
from absign_jax.blocks import selection as selection_lib

PyTree = Any


@jax.tree_util.register_static
class PartitionOptions:
  """How a block-coordinate optimizer partitions parameters (static, no arrays).

  It rides in the optimizer state so that a training step can find the same blocks
  as the optimizer without being told twice.
  """

  def __init__(self, include_embedding: bool = False, include_head: bool = False,
               partition=None):
    if partition is not None and not callable(partition):
      # A labels tree becomes a hashable tuple of (path, label) pairs.
      paths, labels = partition_lib.leaf_paths(partition)
      partition = tuple((".".join(k), int(v)) for k, v in zip(paths, labels))
    self.include_embedding = bool(include_embedding)
    self.include_head = bool(include_head)
    self.partition = partition

  def _key(self):
    return (self.include_embedding, self.include_head, self.partition)

  def __eq__(self, other):
    return isinstance(other, PartitionOptions) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  def spec(self, params) -> partition_lib.BlockSpec:
    """The :class:`~absign_jax.blocks.partition.BlockSpec` of ``params``."""
    partition = self.partition
    if isinstance(partition, tuple):
      labels = dict(partition)
      partition = lambda path, leaf: labels.get(path, -1)
    return partition_lib.block_spec(
        params, include_embedding=self.include_embedding,
        include_head=self.include_head, partition=partition)


class BlockOptions(NamedTuple):
  """Which blocks a block optimizer sees and how it picks the active one.

  Every block optimizer (:func:`block_coordinate` and the optimizers built on it)
  takes these as keyword arguments, declared once here through
  :func:`takes_block_options`, and receives them gathered as ``blocks``.

  Attributes:
    selection: a scheme name (``"depth_biased"``, ``"uniform"``, ``"cyclic"``,
      ``"cyclic_descending"``, ``"random_reshuffle"``) or a
      :class:`~absign_jax.blocks.selection.BlockSelection`.
    depth_bias: ``c`` of the depth-biased scheme, ``tau_i = N + c (N - i)``; 0 gives
      equal visit rates.
    seed: seed of the random schemes, an int in ``[0, 2**32 - 1]``.
    include_embedding: also train the embedding, as block 0.
    include_head: also train the final norm / LM head, as the last block.
    partition: an explicit partition (see :func:`absign_jax.block_spec`). With
      ``optax.inject_hyperparams``, name it in ``static_args``.
  """

  selection: str | selection_lib.BlockSelection = "depth_biased"
  depth_bias: float = 10.0
  seed: int = 0
  include_embedding: bool = False
  include_head: bool = False
  partition: partition_lib.PartitionFn | PyTree | None = None

  def partition_options(self) -> "PartitionOptions":
    return PartitionOptions(self.include_embedding, self.include_head, self.partition)


def check_block_options(owner: str, blocks: BlockOptions) -> None:
  """Type and range checks of the block options, named after ``owner``.

  Values traced by ``optax.inject_hyperparams`` pass (they were checked when the
  optimizer was built with concrete values).

  Raises:
    TypeError: an option of the wrong type.
    ValueError: an option out of range, or an unknown scheme name.
  """
  sel = blocks.selection
  if isinstance(sel, str):
    if sel not in selection_lib.SCHEMES + ("descending",):
      raise ValueError(f"{owner}: unknown selection scheme {sel!r}; choose one of "
                       f"{selection_lib.SCHEMES}, or pass absign_jax.blocks.selection."
                       "costs(tau) / fixed_order(order).")
  elif not isinstance(sel, selection_lib.BlockSelection):
    raise TypeError(f"{owner}: selection must be a scheme name (one of "
                    f"{selection_lib.SCHEMES}) or a BlockSelection, got {sel!r} "
                    f"({type(sel).__name__}).")
  check_real(owner, "depth_bias", blocks.depth_bias, "a finite number >= 0")
  check_int(owner, "seed", blocks.seed, lo=0, hi=selection_lib._SEED_MAX)  # pylint: disable=protected-access
  check_bool(owner, "include_embedding", blocks.include_embedding)
  check_bool(owner, "include_head", blocks.include_head)
  part = blocks.partition
  if isinstance(part, (str, bytes, bool, int, float, np.number)):
    raise TypeError(f"{owner}: partition must be None, a callable (path, leaf) -> block "
                    f"id, or a labels tree of ints with the parameters' paths, got "
                    f"{part!r} ({type(part).__name__}).")


def _option_docs() -> str:
  """The ``Attributes:`` entries of :class:`BlockOptions`, as ``Args:`` entries."""
  doc = inspect.cleandoc(BlockOptions.__doc__)
  return doc.split("Attributes:\n", 1)[1]


def takes_block_options(**defaults: Any) -> Callable[[Callable], Callable]:
  """Gives an optimizer factory the :class:`BlockOptions` as keyword arguments.

  The factory declares one keyword ``blocks``; the decorated function instead takes
  every field of :class:`BlockOptions` as a keyword-only argument (with ``defaults``
  overriding the class's), gathers them into ``blocks`` and calls the factory. Its
  signature shows the fields, so ``optax.inject_hyperparams`` and ``help()`` see
  them, and its docstring lists them after the factory's own arguments.

  Args:
    **defaults: per-optimizer defaults, e.g. ``selection="random_reshuffle"``.

  Returns:
    The decorator.
  """
  unknown = set(defaults) - set(BlockOptions._fields)
  if unknown:
    raise TypeError(f"takes_block_options: unknown block options {sorted(unknown)}; "
                    f"the options are {list(BlockOptions._fields)}.")
  base = BlockOptions()._replace(**defaults)
  # NamedTuple keeps string annotations as ForwardRefs; show the plain strings.
  hints = {name: getattr(hint, "__forward_arg__", hint)
           for name, hint in BlockOptions.__annotations__.items()}

  def decorate(factory: Callable) -> Callable:
    signature = inspect.signature(factory)
    own = [p for p in signature.parameters.values() if p.name != "blocks"]
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                 default=getattr(base, name), annotation=hints[name])
               for name in BlockOptions._fields]

    @functools.wraps(factory)
    def with_options(*args, **kwargs):
      blocks = base._replace(**{name: kwargs.pop(name) for name in BlockOptions._fields
                                if name in kwargs})
      check_block_options(factory.__name__, blocks)
      return factory(*args, blocks=blocks, **kwargs)

    with_options.__signature__ = signature.replace(parameters=own + options)
    doc = factory.__doc__ or ""
    marker = "\n\n  Returns:"  # the options go at the end of the factory's Args
    if marker in doc:
      entries = "\n".join(f"  {line}" if line else "" for line in _option_docs().splitlines())
      doc = doc.replace(marker, "\n" + entries.rstrip() + marker, 1)
    with_options.__doc__ = doc
    return with_options

  return decorate


@jax.tree_util.register_static
class SelectionConfig:
  """What fixes the sequence of selected blocks besides the block count (static).

  The scheme's name, its options (:attr:`BlockSelection.config`: depth bias, seed,
  costs or order) and the steps per block, as ``(option, value)`` pairs; None for a
  value that was traced when the state was initialised. It rides in the state, so a
  checkpoint can record the configuration that wrote it and a restore can compare.
  """

  def __init__(self, items: tuple[tuple[str, Any], ...]):
    self.items = tuple(items)
    self._hash = hash(self.items)

  def __eq__(self, other):
    return self is other or (isinstance(other, SelectionConfig) and
                             self.items == other.items)

  def __hash__(self):
    return self._hash

  def __repr__(self):
    return f"SelectionConfig({dict(self.items)})"

  def record(self) -> dict:
    """The items as a JSON-serialisable dict (sequences as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items}


@jax.tree_util.register_static
class TreeSignature:
  """Dotted paths and shapes of the parameter leaves a state was initialised for."""

  def __init__(self, paths: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]):
    self.paths = tuple(paths)
    self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    self._hash = hash((self.paths, self.shapes))

  def __eq__(self, other):
    return self is other or (isinstance(other, TreeSignature) and
                             (self.paths, self.shapes) == (other.paths, other.shapes))

  def __hash__(self):
    return self._hash

  def __repr__(self):
    return f"TreeSignature({len(self.paths)} leaves)"


class InnerStates(tuple):
  """The inner states, one per group of equally shaped blocks (a tuple), carrying
  the :class:`TreeSignature` of the parameters they were initialised for.

  The signature is static (pytree metadata, no arrays) and the children are keyed
  like a tuple's, so leaf paths in checkpoints are those of a plain tuple.
  """

  def __new__(cls, states, signature: TreeSignature | None = None):
    obj = super().__new__(cls, states)
    obj.signature = signature
    return obj

  def __getnewargs__(self):
    return tuple(self), self.signature


jax.tree_util.register_pytree_with_keys(
    InnerStates,
    lambda s: ([(jax.tree_util.SequenceKey(i), x) for i, x in enumerate(s)],
               s.signature),
    lambda signature, children: InnerStates(children, signature),
    lambda s: (tuple(s), s.signature))


class BlockCoordinateState(NamedTuple):
  """State of :func:`block_coordinate`.

  Attributes:
    active: the block the next update applies to (int32 scalar).
    steps_in_block: updates already applied to the active block.
    selection: the selection scheme's state (counters, clock, key).
    inner: the inner transformation's state, one per group of equally shaped blocks
      (an :class:`InnerStates` tuple, which also knows the parameter paths and
      shapes the state was initialised for).
    partition: the static partition options (no arrays).
    config: the static :class:`SelectionConfig` (no arrays).
  """

  active: jax.Array
  steps_in_block: jax.Array
  selection: selection_lib.SelectionState
  inner: tuple
  partition: PartitionOptions
  config: SelectionConfig | None = None


def _is_none(x):
  return x is None


class _NoInnerState:
  """Stands for the inner states in a state initialised from a tree without leaves."""

  def __repr__(self):
    return "<no inner state: initialised without parameters>"


def _path_text(path: str) -> str:
  return repr(path) if path else "the root (a single array)"


def _check_tree(signature: TreeSignature | None, paths: tuple[str, ...],
                shapes: list[tuple[int, ...] | None], what: str,
                expected: Callable[[int], tuple[int, ...]] | None = None) -> None:
  """The paths and shapes of a tree passed to ``update`` must be the parameters'.

  Static shapes only (runs when ``update`` is traced). ``shapes[i]`` is None for a
  leaf that is absent (a sparse tree's None); ``expected(i)`` is the shape leaf ``i``
  must have (default: the parameter's).
  """
  if signature is None:
    return
  fix = ("Pass gradients of these parameters (the same keys and shapes)"
         if what == "gradient" else
         "Pass the parameters the state was initialised with, or initialise it with "
         "tx.init(params) on these")
  want = signature.paths
  if paths != want:
    i = next((i for i, (a, b) in enumerate(zip(paths, want)) if a != b),
             min(len(paths), len(want)))
    if i < len(paths) and i < len(want):
      where = (f"leaf {i} is {_path_text(paths[i])} where the parameters have "
               f"{_path_text(want[i])}")
    elif i < len(want):
      where = f"it lacks {_path_text(want[i])} ({len(paths)} leaves, not {len(want)})"
    else:
      where = (f"it has an extra leaf {_path_text(paths[i])} ({len(paths)} leaves, "
               f"not {len(want)})")
    raise ValueError(f"block_coordinate: the {what} tree differs from the parameters "
                     f"the optimizer state was initialised with: {where}. {fix}.")
  for i, shape in enumerate(shapes):
    if shape is None:
      continue
    need = signature.shapes[i] if expected is None else expected(i)
    if tuple(shape) != tuple(need):
      layer = ("" if tuple(need) == signature.shapes[i] else
               f" (one layer of a stacked {signature.shapes[i]} leaf)")
      raise ValueError(
          f"block_coordinate: the {what} at {_path_text(paths[i])} has shape "
          f"{tuple(shape)}, but the parameters the optimizer state was initialised "
          f"with have {tuple(need)} there{layer}. {fix}.")


def _check_block_count(state: BlockCoordinateState, spec) -> None:
  """The state must have been initialised for parameters with these blocks."""
  shape = tuple(getattr(state.selection.visits, "shape", ()))
  n = shape[0] if shape else 0
  if n != spec.num_blocks or isinstance(state.inner, _NoInnerState):
    shown = ", ".join(spec.names[:4]) + (", ..." if spec.num_blocks > 4 else "")
    raise ValueError(
        f"block_coordinate: the optimizer state was initialised for {n} blocks, but "
        f"the parameters passed to update have {spec.num_blocks} ({shown}). "
        "Initialise the state with tx.init(params) on these parameters (or restore "
        "a checkpoint of this model).")


BlockScale = Callable[[jax.Array, int], Any]


def depth_scale(shallowest: float, deepest: float = 1.0) -> BlockScale:
  """A step multiplier linear in depth, for ``block_scale``.

  Block ``i`` of ``N`` gets ``shallowest + (deepest - shallowest) * i / (N - 1)``:
  ``depth_scale(0.5)`` halves the first block's step and keeps the last one's.

  Args:
    shallowest: the multiplier of block 0 (the embedding when it is a block, else the
      first layer), a finite number >= 0.
    deepest: the multiplier of the last block, a finite number >= 0.

  Returns:
    A function ``(block, num_blocks) -> multiplier``.

  Examples:
    >>> import jax.numpy as jnp
    >>> scale = depth_scale(0.5)
    >>> [float(scale(jnp.int32(i), 5)) for i in range(5)]
    [0.5, 0.625, 0.75, 0.875, 1.0]
  """
  check_number("depth_scale", "shallowest", shallowest, lo=0.0)
  check_number("depth_scale", "deepest", deepest, lo=0.0)
  first, last = float(shallowest), float(deepest)

  def scale(block: jax.Array, num_blocks: int) -> jax.Array:
    fraction = jnp.asarray(block, jnp.float32) / max(num_blocks - 1, 1)
    return jnp.float32(first) + jnp.float32(last - first) * fraction

  return scale


def _block_scales(block_scale: BlockScale, num_blocks: int) -> np.ndarray:
  """Every block's multiplier, checked finite and >= 0 (before any step is spent)."""
  try:
    scales = np.asarray([block_scale(jnp.int32(b), num_blocks)
                         for b in range(num_blocks)], np.float64)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"block_coordinate: block_scale(block, num_blocks) failed for "
                     f"{num_blocks} blocks: {e}") from e
  if scales.shape != (num_blocks,) or not np.all(np.isfinite(scales) & (scales >= 0)):
    raise ValueError(f"block_coordinate: block_scale must give one finite number >= 0 "
                     f"per block; for {num_blocks} blocks it gave {scales.tolist()}.")
  return scales


@takes_block_options()
def block_coordinate(
    inner: optax.GradientTransformation,
    *,
    steps_per_block: int = 1,
    reset_on_switch: bool = False,
    block_scale: BlockScale | None = None,
    blocks: BlockOptions = BlockOptions(),
) -> optax.GradientTransformationExtraArgs:
  """Turns ``inner`` into a transformation that updates one block per step.

  Args:
    inner: the transformation applied to the active block's leaves (given as a list
      of arrays, slices for stacked leaves).
    steps_per_block: updates per block before switching (BAdam's K).
    reset_on_switch: re-initialise the inner state whenever a new block becomes
      active (BAdam's Adam state reset). Otherwise the group's state carries over.
    block_scale: a multiplier of the active block's update, as a function
      ``(block, num_blocks) -> number`` of the block's index (an int32 array, traced
      inside a compiled step) and the block count, e.g. :func:`depth_scale`; None:
      1 for every block. It is evaluated for every block at ``init``, and must give
      finite numbers >= 0. With ``optax.inject_hyperparams``, name it in
      ``static_args`` (a function there would be taken for a schedule).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  # optax.inject_hyperparams hands numeric arguments over as (possibly traced)
  # arrays; the count only enters a comparison, so any integer array works.
  check_int("block_coordinate", "steps_per_block", steps_per_block, lo=1)
  check_bool("block_coordinate", "reset_on_switch", reset_on_switch)
  if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
    raise TypeError(f"block_coordinate: inner must be an optax GradientTransformation "
                    f"(with init and update), got {type(inner).__name__}.")
  if block_scale is not None and not callable(block_scale):
    raise TypeError(f"block_coordinate: block_scale must be a function (block, "
                    f"num_blocks) -> number, e.g. absign_jax.depth_scale(0.5), or None; "
                    f"got {block_scale!r} ({type(block_scale).__name__}).")
  scheme = selection_lib.resolve(blocks.selection, depth_bias=blocks.depth_bias,
                                 seed=blocks.seed)
  inner = optax.with_extra_args_support(inner)

  options = blocks.partition_options()
  spec_of = options.spec
  config = SelectionConfig((
      ("selection", scheme.name), *scheme.config,
      ("steps_per_block", None if isinstance(steps_per_block, jax.core.Tracer)
       else int(steps_per_block))))

  def init(params):
    if not jax.tree.leaves(params):
      # A tree without leaves (optax.tree_utils.tree_map_params initialises with an
      # empty placeholder to find the parameter-shaped parts of a state): a state of
      # the same structure, except ``inner``, whose per-group states cannot be known
      # without parameters and stand as one leaf. Nothing in it is parameter-shaped.
      zero = jnp.zeros((), jnp.int32)
      return BlockCoordinateState(
          active=zero, steps_in_block=zero,
          selection=selection_lib.SelectionState(*([zero] * 6)),
          inner=_NoInnerState(), partition=options, config=config)
    spec = spec_of(params)
    if block_scale is not None:
      _block_scales(block_scale, spec.num_blocks)
    paths, leaves = partition_lib.leaf_paths(params)
    leaves = [jnp.asarray(getattr(l, "value", l)) for l in leaves]
    signature = TreeSignature(tuple(".".join(k) for k in paths),
                              tuple(np.shape(l) for l in leaves))
    group_of, first_block = partition_lib.block_groups(spec, leaves)
    inner_states = InnerStates(
        [inner.init(partition_lib.gather_block(spec, leaves, b)) for b in first_block],
        signature)
    sel = scheme.init(spec.num_blocks)
    active, sel = scheme.select(sel)
    return BlockCoordinateState(
        active=active, steps_in_block=jnp.zeros((), jnp.int32), selection=sel,
        inner=inner_states, partition=options, config=config)

  def run_inner(gid, grads, block_params, state, extra):
    inner_state = state.inner[gid]
    if reset_on_switch:
      fresh = inner.init(block_params)
      inner_state = jax.tree.map(
          lambda f, o: jnp.where(state.steps_in_block == 0, f, o), fresh, inner_state)
    upd, inner_state = inner.update(grads, inner_state, block_params, **extra)
    states = list(state.inner)
    states[gid] = inner_state
    return upd, InnerStates(states, getattr(state.inner, "signature", None))

  def scaled(u, block, num_blocks):
    if block_scale is None:
      return u
    factor = jnp.asarray(block_scale(jnp.asarray(block, jnp.int32), num_blocks),
                         jnp.float32)
    return [(v * factor).astype(v.dtype) for v in u]

  def update(updates, state, params=None, *, block=None, **extra):
    if params is None:
      raise ValueError("block_coordinate: update() needs params (the block partition "
                       "is read from them): call tx.update(grads, state, params).")
    spec = spec_of(params)
    _check_block_count(state, spec)
    signature = getattr(state.inner, "signature", None)
    p_paths, p_leaves = partition_lib.leaf_paths(params)
    _check_tree(signature, tuple(".".join(k) for k in p_paths),
                [np.shape(x) for x in p_leaves], "parameter")
    group_of, _ = partition_lib.block_groups(spec, p_leaves)
    stacked = spec.stacked_range()
    if block is None:
      g_paths = tuple(".".join(k) for k in partition_lib.leaf_paths(updates)[0])
      g_leaves, treedef = jax.tree.flatten(updates)
      _check_tree(signature, g_paths, [np.shape(x) for x in g_leaves], "gradient")
      out_leaves, inner_states = _full_update(
          spec, group_of, stacked, g_leaves, p_leaves, state, extra)
    else:
      g_paths = tuple(".".join(k) for k in
                      partition_lib.leaf_paths(updates, is_leaf=_is_none)[0])
      g_leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
      # A stacked leaf's gradient is the active layer's slice (its leading axis
      # dropped); absent leaves (None, inactive blocks) have no shape to check.
      _check_tree(signature, g_paths,
                  [None if g is None else np.shape(g) for g in g_leaves], "gradient",
                  expected=lambda i: signature.shapes[i][
                      1 if spec.leaf_blocks[i].stacked else 0:])
      out_leaves, inner_states = _block_update(
          spec, group_of, stacked, block, g_leaves, p_leaves, state, extra)
    new_updates = jax.tree.unflatten(treedef, out_leaves)
    return new_updates, _advance(state, inner_states)

  def _full_update(spec, group_of, stacked, g_leaves, p_leaves, state, extra):
    if len(g_leaves) != len(p_leaves):
      raise ValueError("block_coordinate: updates and params have different trees.")

    def zeros():
      return [jnp.zeros_like(g) for g in g_leaves]

    def static_branch(b):
      def branch(state):
        g = partition_lib.gather_block(spec, g_leaves, b)
        p = partition_lib.gather_block(spec, p_leaves, b)
        u, inner_states = run_inner(int(group_of[b]), g, p, state, extra)
        u = [v.astype(x.dtype) for v, x in zip(scaled(u, b, spec.num_blocks), g)]
        return partition_lib.scatter_block(spec, zeros(), b, u), inner_states
      return branch

    def stacked_branch(state):
      lo, _ = stacked
      j = state.active - lo
      idx = [i for i, _ in spec.members[lo]]
      take = lambda leaves: [jax.lax.dynamic_index_in_dim(leaves[i], j, 0, False)
                             for i in idx]
      u, inner_states = run_inner(int(group_of[lo]), take(g_leaves), take(p_leaves),
                                  state, extra)
      u = scaled(u, state.active, spec.num_blocks)
      out = zeros()
      for i, v in zip(idx, u):
        out[i] = jax.lax.dynamic_update_index_in_dim(out[i], v.astype(out[i].dtype), j, 0)
      return out, inner_states

    branches, table = [], []
    for b in range(spec.num_blocks):
      if stacked and stacked[0] <= b < stacked[1]:
        if b == stacked[0]:
          branches.append(stacked_branch)
        table.append(len(branches) - 1)
      else:
        branches.append(static_branch(b))
        table.append(len(branches) - 1)
    if len(branches) == 1:
      return branches[0](state)
    index = jnp.asarray(np.asarray(table, np.int32))[state.active]
    return jax.lax.switch(index, branches, state)

  def _block_update(spec, group_of, stacked, block, g_leaves, p_leaves, state, extra):
    present = tuple(i for i, g in enumerate(g_leaves) if g is not None)
    if isinstance(block, (int, np.integer)):
      b = int(block)
      if not 0 <= b < spec.num_blocks:
        raise ValueError(f"block_coordinate: block={b} is outside 0..{spec.num_blocks-1}.")
      if present != tuple(sorted(spec.block_leaf_indices(b))):
        raise ValueError(f"block_coordinate: the sparse gradient tree does not hold "
                         f"exactly the leaves of block {b} ({spec.names[b]}).")
      p = partition_lib.gather_block(spec, p_leaves, b)
      g = [g_leaves[i] for i, _ in spec.members[b]]
      gid = int(group_of[b])
    else:  # a traced block index: only valid inside a stacked range
      if stacked is None or present != tuple(i for i, _ in spec.members[stacked[0]]):
        raise ValueError("block_coordinate: a traced block index needs a sparse "
                         "gradient tree holding exactly the stacked layer leaves.")
      j = block - stacked[0]
      p = [jax.lax.dynamic_index_in_dim(p_leaves[i], j, 0, False) for i in present]
      g = [g_leaves[i] for i in present]
      gid = int(group_of[stacked[0]])
      b = None
    u, inner_states = run_inner(gid, g, p, state, extra)
    u = scaled(u, block, spec.num_blocks)
    out = [None] * len(g_leaves)
    order = [i for i, _ in spec.members[b]] if b is not None else list(present)
    for i, v in zip(order, u):
      out[i] = v
    return out, inner_states

  def _advance(state, inner_states):
    steps = state.steps_in_block + 1
    switch = steps >= steps_per_block
    nxt, sel = scheme.select(state.selection)
    sel = jax.tree.map(lambda new, old: jnp.where(switch, new, old), sel, state.selection)
    return BlockCoordinateState(
        active=jnp.where(switch, nxt, state.active),
        steps_in_block=jnp.where(switch, 0, steps).astype(jnp.int32),
        selection=sel,
        inner=inner_states,
        partition=state.partition,
        config=state.config)

  return optax.GradientTransformationExtraArgs(init, update)


def selection_config(opt_state: PyTree) -> dict | None:
  """The configuration that fixes a block optimizer's sequence of selected blocks.

  Args:
    opt_state: an optimizer state (or any pytree holding one, e.g. a ``TrainState``).

  Returns:
    A JSON-serialisable dict: ``selection`` (the scheme's name), the scheme's options
    (``depth_bias``, ``seed``, ``costs`` or ``order``), ``steps_per_block`` and
    ``num_blocks``; None for a state without a block-coordinate state (or one built
    without a recorded configuration).
  """
  try:
    state = find_state(opt_state)
  except ValueError:
    return None
  if state.config is None:
    return None
  shape = tuple(getattr(state.selection.visits, "shape", ()))
  return {**state.config.record(), "num_blocks": int(shape[0]) if shape else 0}


def find_state(opt_state: PyTree) -> BlockCoordinateState:
  """The (first) :class:`BlockCoordinateState` inside an optimizer state."""
  found = [
      s for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, BlockCoordinateState))
      if isinstance(s, BlockCoordinateState)
  ]
  if not found:
    raise ValueError("no block-coordinate state found: the optimizer was not built "
                     "with absign_jax.block_coordinate (absignsgd, block_adam, ...).")
  return found[0]


def active_block(opt_state: PyTree) -> jax.Array:
  """The block the next update will apply to (an int32 scalar array).

  Accepts a raw optax state (also nested in ``optax.chain`` or
  ``optax.inject_hyperparams``) or an ``nnx.Optimizer``'s ``opt_state``.
  """
  opt_state = getattr(opt_state, "opt_state", opt_state)
  active = find_state(opt_state).active
  if hasattr(active, "get_value"):  # an nnx.Variable (nnx.Optimizer's opt_state)
    active = active.get_value()  # (`.value` is deprecated in flax.nnx)
  return jnp.asarray(active)


def set_depth_bias(opt_state: PyTree, depth_bias: float) -> PyTree:
  """``opt_state`` with its depth-biased selection continued at another depth bias.

  Between steps, e.g. to change the bias with training progress: each block keeps
  the phase of its next visit and costs ``tau_i = N + c (N - i)`` of the new ``c``
  from then on (see :func:`absign_jax.blocks.selection.with_depth_bias`). The arrays
  keep their shapes and dtypes, so a compiled step is not traced again.

  Args:
    opt_state: an optimizer state (or any pytree holding one) of a block optimizer
      with ``selection="depth_biased"``, concrete (between steps, not inside ``jit``).
    depth_bias: the new ``c >= 0``. A bias on a coarse grid (e.g. multiples of 0.25)
      keeps the integer cost table small.

  Returns:
    The same pytree with the block-coordinate state's selection replaced.

  Raises:
    ValueError: no block-coordinate state in ``opt_state``, or its scheme is not the
      depth-biased one.

  Examples:
    >>> import jax.numpy as jnp
    >>> import absign_jax
    >>> params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
    >>> tx = absign_jax.absignsgd(1e-3, depth_bias=10.0)
    >>> state = absign_jax.set_depth_bias(tx.init(params), 0.0)
    >>> absign_jax.find_state(state).selection.costs.tolist()
    [3, 3, 3]
  """
  block_state = find_state(opt_state)  # raises when there is none
  scheme = dict(block_state.config.items).get("selection") if block_state.config else None
  if scheme != "depth_biased":
    raise ValueError(f"set_depth_bias: the optimizer selects blocks with {scheme!r}; a "
                     "depth bias applies to selection='depth_biased' only.")

  def replace(node):
    if isinstance(node, BlockCoordinateState):
      return node._replace(
          selection=selection_lib.with_depth_bias(node.selection, depth_bias))
    return node

  return jax.tree.map(replace, opt_state,
                      is_leaf=lambda x: isinstance(x, BlockCoordinateState))
