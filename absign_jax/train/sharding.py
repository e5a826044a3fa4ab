"""Parameters sharded over a mesh (FSDP) under the block step, votes over ``data``.

A mesh has two axes: ``data`` (workers that each see their own rows of the batch and
vote) and ``fsdp`` (devices that hold a slice of every parameter and split a
worker's rows among them). ``make_mesh("data=2,fsdp=4")`` builds one; the default
puts every device on ``data`` (parameters replicated, as
:class:`~absign_jax.train.data_parallel.DataParallel`).

What runs where (one ``jax.jit`` with input and output shardings, i.e. XLA's SPMD
partitioner):

* every parameter leaf is sharded along ``fsdp`` on its largest dimension that
  ``fsdp`` divides (MaxText's rule; a leaf with no such dimension is replicated),
  unless a rule keyed on the parameter's path says otherwise
  (``rules=[(r"embed", P(None, "fsdp"))]``, first matching regex wins);
* optimizer-state leaves shaped like a parameter, at the parameter's path, take the
  parameter's sharding; other floating-point state (a block optimizer's moments,
  the float32 master copy: shaped like the active block's leaves) takes the
  inferred sharding of its shape; every other leaf (counters, keys, the selection
  state) is replicated;
* the batch is split over ``(data, fsdp)``;
* the program runs under ``shard_map`` over ``data`` only (``fsdp`` stays automatic):
  each worker computes its block gradient on its own rows, the partitioner gathers
  the active block's shards where the layer needs them and reduces the worker's
  gradient over its ``fsdp`` devices, and the vote (majority, 1-bit majority, mean)
  is the only collective over ``data``. Each device votes on its ``fsdp`` slice of
  the block, so a vote moves ``1 / fsdp`` of the block per device; the 1-bit vote
  packs bits per slice inside a nested ``shard_map`` over ``fsdp``.

The update of the active block is computed on each device's slice (the vote, the
optimizer and the precision arithmetic are elementwise), so parameters, optimizer
state and master copy never exist unsharded.

:func:`sharded_block_step` and :func:`sharded_full_step` build the steps;
:class:`Sharded` is the placement they compose into
:class:`~absign_jax.BlockTrainStep` / :class:`~absign_jax.FullTrainStep`, and
:func:`sharded_aggregator` the vote. What each device holds and what each mesh axis
moves are measured by :func:`absign_jax.profiling.per_device_bytes` and
:func:`absign_jax.profiling.collective_bytes_by_axis`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from absign_jax.train.collectives import (
    Aggregate,
    aggregate_block,
    check_aggregation,
    count_dtype,
    global_array,
    mean_aggregator,
    vote_aggregator,
)
from absign_jax.train.model import LossFn
from absign_jax.train.step import (BlockTrainStep, FullTrainStep, TrainState,
                                   check_batch_rows)

PyTree = Any
Rules = Sequence[tuple[str, P]]

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

__all__ = [
    "MESH_AXES",
    "Sharded",
    "infer_spec",
    "make_mesh",
    "param_specs",
    "parse_mesh",
    "path_name",
    "sharded_aggregator",
    "sharded_block_step",
    "sharded_full_step",
    "state_specs",
]


# -- the mesh -------------------------------------------------------------------------


def parse_mesh(text: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """``"data=2,fsdp=4"`` as ``{"data": 2, "fsdp": 4}``, checked against the devices.

  An axis left out has size 1, except that ``None``/``""`` puts every device on
  ``data``. At most one axis may be ``-1`` (all devices the others leave).

  Raises:
    ValueError: an unknown axis name, a malformed entry, a size below 1, or sizes
      whose product is not ``num_devices``; the message says what to write instead.
  """
  if not text:
    return {DATA: num_devices, FSDP: 1}
  if isinstance(text, str):
    sizes = {}
    for entry in text.split(","):
      name, eq, value = entry.strip().partition("=")
      name = name.strip()
      if not eq or not re.fullmatch(r"-?\d+", value.strip()):
        raise ValueError(f"--mesh entry {entry.strip()!r} is not AXIS=SIZE: write e.g. "
                         f"'data=2,fsdp=4' (axes {', '.join(MESH_AXES)}).")
      if name in sizes:
        raise ValueError(f"--mesh names axis {name!r} twice.")
      sizes[name] = int(value)
  else:
    sizes = {str(k): int(v) for k, v in dict(text).items()}
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {', '.join(map(repr, unknown))}: the axes are "
                     f"{', '.join(map(repr, MESH_AXES))} (e.g. 'data=2,fsdp=4').")
  if sum(v == -1 for v in sizes.values()) > 1:
    raise ValueError("at most one mesh axis may be -1 (the devices the others leave).")
  bad = {k: v for k, v in sizes.items() if v < 1 and v != -1}
  if bad:
    raise ValueError(f"mesh axis sizes must be at least 1, got {bad}.")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  for k, v in sizes.items():
    if v == -1:
      if num_devices % known:
        raise ValueError(f"the mesh {sizes} leaves no whole number of devices for "
                         f"{k!r}: {num_devices} devices over {known}.")
      sizes[k] = num_devices // known
  out = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
  total = int(np.prod(list(out.values())))
  if total != num_devices:
    raise ValueError(
        f"the mesh {', '.join(f'{k}={v}' for k, v in out.items())} has {total} devices "
        f"but there are {num_devices}: the axis sizes must multiply to the device count "
        f"(e.g. data={num_devices // out[FSDP] if num_devices % out[FSDP] == 0 else 1},"
        f"fsdp={out[FSDP] if num_devices % out[FSDP] == 0 else num_devices}, or fsdp=-1).")
  return out


def make_mesh(shape: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: every process's devices).

  ``fsdp`` is the inner (fastest-varying) axis, so with several hosts the devices
  that gather each other's parameter slices are those of one host where the sizes
  allow, and only the vote crosses hosts.

  Args:
    shape: ``"data=2,fsdp=4"``, a mapping, or None (every device on ``data``).
    devices: the devices, in order.

  Returns:
    A ``jax.sharding.Mesh`` with axes ``("data", "fsdp")``.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = parse_mesh(shape, len(devices))
  grid = np.asarray(devices, dtype=object).reshape(sizes[DATA], sizes[FSDP])
  return Mesh(grid, MESH_AXES)


# -- shardings of the state -----------------------------------------------------------


def path_name(path) -> str:
  """A key path as ``"layers/0/attn/q/kernel"`` (what rules are matched against)."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def infer_spec(shape: Sequence[int], size: int, axis: str = FSDP) -> P:
  """``axis`` on the largest dimension of ``shape`` that ``size`` divides.

  The first of equally large dimensions wins; no such dimension (or ``size`` 1):
  replicated, ``P()``.
  """
  if size <= 1:
    return P()
  best = None
  for d, n in enumerate(shape):
    if n % size == 0 and n >= size and (best is None or n > shape[best]):
      best = d
  if best is None:
    return P()
  return P(*([None] * best + [axis]))


def _check_spec(name: str, shape, spec: P, mesh: Mesh, fsdp_axis: str) -> P:
  if len(spec) > len(shape):
    raise ValueError(f"the sharding rule for {name!r} gives {spec}, which has more "
                     f"entries than the leaf has dimensions {tuple(shape)}.")
  for d, entry in enumerate(spec):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    for a in names:
      if a not in mesh.axis_names:
        raise ValueError(f"the sharding rule for {name!r} names axis {a!r}, which is "
                         f"not a mesh axis {mesh.axis_names}.")
      if a != fsdp_axis:
        raise ValueError(f"the sharding rule for {name!r} names axis {a!r}: parameters "
                         f"are sharded over {fsdp_axis!r} only (workers along the other "
                         f"axes each hold the whole slice and vote).")
    k = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if shape[d] % k:
      raise ValueError(f"the sharding rule for {name!r} splits dimension {d} of "
                       f"{tuple(shape)} over {k} devices, which does not divide it: "
                       f"pick another dimension or replicate the leaf (P()).")
  return spec


def param_specs(params: PyTree, mesh: Mesh, rules: Rules = (),
                fsdp_axis: str = FSDP) -> PyTree:
  """The ``PartitionSpec`` of every parameter leaf (a tree shaped like ``params``).

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the mesh.
    rules: ``(regex, PartitionSpec)`` pairs; the first regex found (``re.search``) in
      a leaf's path name (:func:`path_name`) gives its spec. Leaves no rule matches
      get :func:`infer_spec`.
    fsdp_axis: the axis parameters are sharded along.

  Raises:
    ValueError: a rule whose spec names another axis, has too many entries or
      splits a dimension unevenly (checked before anything is placed).
  """
  size = int(mesh.shape[fsdp_axis]) if fsdp_axis in mesh.axis_names else 1
  compiled = [(re.compile(r), spec) for r, spec in rules]

  def spec_of(path, x):
    name, shape = path_name(path), tuple(np.shape(x))
    for regex, spec in compiled:
      if regex.search(name):
        return _check_spec(name, shape, spec, mesh, fsdp_axis)
    return infer_spec(shape, size, fsdp_axis)

  return jax.tree_util.tree_map_with_path(spec_of, params)


def state_specs(state: TrainState, params_spec: PyTree, mesh: Mesh,
                fsdp_axis: str = FSDP) -> TrainState:
  """The ``PartitionSpec`` of every leaf of a :class:`TrainState`.

  Optimizer-state leaves whose key path ends with a parameter's path and whose shape
  is that parameter's (optax's moments) get the parameter's spec; other
  floating-point leaves of the optimizer and precision state (a block optimizer's
  moments and the master copy, shaped like the active block's leaves) get
  :func:`infer_spec` of their shape, as their parameters do unless a rule says
  otherwise; every other leaf (counters, keys, the selection state) is replicated.
  """
  size = int(mesh.shape[fsdp_axis]) if fsdp_axis in mesh.axis_names else 1
  by_path = {}
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                             jax.tree.leaves(params_spec, is_leaf=_is_spec)):
    by_path[tuple(path)] = (tuple(np.shape(x)), spec)
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def spec_of(path, x):
    path, shape = tuple(path), tuple(np.shape(x))
    for n in lengths:
      hit = by_path.get(path[-n:]) if n <= len(path) else None
      if hit is not None and hit[0] == shape:
        return hit[1]
    if jnp.issubdtype(x.dtype, jnp.floating):
      return infer_spec(shape, size, fsdp_axis)
    return P()

  return TrainState(params_spec,
                    jax.tree_util.tree_map_with_path(spec_of, state.opt_state),
                    jax.tree_util.tree_map_with_path(spec_of, state.precision))


def _is_spec(x) -> bool:
  return isinstance(x, P)


# -- the vote over data on fsdp slices ------------------------------------------------


def sharded_aggregator(method: str, mesh: Mesh, data_axis: str = DATA,
                       fsdp_axis: str = FSDP) -> Aggregate:
  """The ``aggregate`` of a sharded block step: a vote over ``data_axis`` only.

  Called inside ``shard_map`` over ``data_axis`` with ``fsdp_axis`` automatic: the
  finiteness, loss and norm statistics are those of each worker's whole block
  gradient (the partitioner reduces them over ``fsdp``), and every device votes on
  its own ``fsdp`` slice of each leaf. ``"majority"`` and ``"mean"`` are one
  all-reduce of the slices (int8 signs / the gradient dtype); ``"majority_1bit"``
  packs each device's slice into bits inside a ``shard_map`` over ``fsdp`` and runs
  :func:`~absign_jax.train.collectives.aggregate_block` there.

  The vote is wrapped by :func:`~absign_jax.train.collectives.vote_aggregator`, as in
  :func:`~absign_jax.train.data_parallel.aggregator`: a step applies only where every
  worker's loss and gradient are finite; the loss is the mean over workers, the norm
  the root mean square of the workers' block norms.
  """
  check_aggregation(method)
  n = int(mesh.shape[data_axis])
  size = int(mesh.shape[fsdp_axis])

  def vote(grads):
    if n == 1:  # one worker: nothing crosses ``data`` (XLA drops a size-1 manual axis)
      return list(grads) if method == "mean" else [jnp.sign(g) for g in grads]
    # Leaf by leaf, not concatenated as aggregate_block does: concatenating leaves
    # sharded along different dimensions would gather them.
    if method == "mean":
      return [(s / n).astype(g.dtype) for s, g in zip(jax.lax.psum(grads, data_axis), grads)]
    if method == "majority":
      count = count_dtype(n)
      sums = jax.lax.psum([jnp.sign(g).astype(count) for g in grads], data_axis)
      return [jnp.sign(s).astype(g.dtype) for s, g in zip(sums, grads)]
    if size == 1:
      return aggregate_block(grads, data_axis, method, n)
    specs = [infer_spec(g.shape, size, fsdp_axis) for g in grads]
    local = jax.shard_map(lambda gs: aggregate_block(gs, data_axis, method, n),
                          mesh=jax.sharding.get_abstract_mesh(), in_specs=(specs,),
                          out_specs=specs,
                          axis_names={fsdp_axis}, check_vma=False)
    return local(list(grads))

  return vote_aggregator(vote, data_axis, n)


# -- the placement --------------------------------------------------------------------


class _Compiled:
  """A step program under ``shard_map`` over ``data``, jitted with the state's
  shardings as input and output shardings (built for the first state it sees)."""

  def __init__(self, placement: "Sharded", program, donate: bool):
    self._placement, self._program, self._donate = placement, program, donate
    self._jitted: dict[Any, Any] = {}

  def _get(self, params, opt_state, prec, batch):
    state = TrainState(params, opt_state, prec)
    key = (jax.tree.structure(state), jax.tree.structure(batch))
    if key not in self._jitted:
      pl = self._placement
      shardings = pl.state_shardings(state)
      body = jax.shard_map(self._program, mesh=pl.mesh,
                           in_specs=(P(), P(), P(), P(pl.data_axis)), out_specs=P(),
                           axis_names={pl.data_axis}, check_vma=False)
      batch_sh = jax.tree.map(lambda _: pl.batch_sharding, batch)
      replicated = NamedSharding(pl.mesh, P())
      self._jitted[key] = jax.jit(
          body, in_shardings=(*shardings, batch_sh),
          out_shardings=(*shardings, replicated),
          donate_argnums=(0, 1, 2) if self._donate else ())
    return self._jitted[key]

  def __call__(self, *args):
    return self._get(*args)(*args)

  def lower(self, *args):
    return self._get(*args).lower(*args)


class Sharded:
  """The :class:`~absign_jax.train.step.Placement` of a step on a ``(data, fsdp)`` mesh.

  Parameters, optimizer state and master copy sharded along ``fsdp`` (see the module
  doc and :func:`state_specs`); the batch split over ``(data, fsdp)``; each program
  under ``shard_map`` over ``data`` only, in one ``jax.jit`` with these shardings in
  and out. ``check_vma=False`` for the reason given in
  :class:`~absign_jax.train.data_parallel.DataParallel`: each worker's gradient stays
  its own until the vote.

  Args:
    mesh: a mesh with ``data_axis`` and ``fsdp_axis`` (:func:`make_mesh`).
    rules: ``(regex, PartitionSpec)`` overrides of the inferred parameter shardings
      (:func:`param_specs`).
    data_axis: the axis workers vote along.
    fsdp_axis: the axis parameters are sharded along.
  """

  def __init__(self, mesh: Mesh, rules: Rules = (), data_axis: str = DATA,
               fsdp_axis: str = FSDP):
    for a in (data_axis, fsdp_axis):
      if a not in mesh.axis_names:
        raise ValueError(f"axis {a!r} is not an axis of the mesh {mesh.axis_names}: "
                         f"build the mesh with make_mesh('data=..,fsdp=..').")
    self.mesh, self.rules = mesh, tuple(rules)
    self.data_axis, self.fsdp_axis = data_axis, fsdp_axis
    self.num_workers = int(mesh.shape[data_axis])
    self.fsdp_size = int(mesh.shape[fsdp_axis])
    self.batch_sharding = NamedSharding(mesh, P((data_axis, fsdp_axis)))
    self._specs: dict[Any, TrainState] = {}

  def specs(self, state: TrainState) -> TrainState:
    """The :class:`TrainState` of ``PartitionSpec``s this placement uses for ``state``."""
    key = jax.tree.structure(state), tuple(np.shape(x) for x in jax.tree.leaves(state))
    if key not in self._specs:
      pspec = param_specs(state.params, self.mesh, self.rules, self.fsdp_axis)
      self._specs[key] = state_specs(state, pspec, self.mesh, self.fsdp_axis)
    return self._specs[key]

  def state_shardings(self, state: TrainState) -> TrainState:
    """The ``NamedSharding`` of every leaf of ``state``."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs(state),
                        is_leaf=_is_spec)

  def param_shardings(self, params: PyTree) -> PyTree:
    """The ``NamedSharding`` of every parameter leaf (for loading straight onto it)."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s),
                        param_specs(params, self.mesh, self.rules, self.fsdp_axis),
                        is_leaf=_is_spec)

  def loader_sharding(self, abstract_params: PyTree) -> Callable[[tuple], Any]:
    """``path -> NamedSharding`` for reading a checkpoint straight onto the mesh.

    For the ``sharding=`` option of :func:`absign_jax.llm.hf.load_hf` and
    :func:`absign_jax.llm.gguf.load_gguf`: each tensor is read from the file (a
    memory map) and each device receives only its slice, so no device ever holds
    a whole parameter it does not need. ``abstract_params`` (shapes, e.g. from
    ``nnx.eval_shape``) gives the shapes the inferred shardings depend on; a path
    it does not hold gets None (the default device; :meth:`place_state` moves it).
    """
    specs = param_specs(abstract_params, self.mesh, self.rules, self.fsdp_axis)
    by_name = {path_name(path): NamedSharding(self.mesh, spec) for path, spec in
               jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0]}
    return lambda path: by_name.get("/".join(str(k) for k in path))

  def compile(self, program, donate: bool):
    return _Compiled(self, program, donate)

  def place_state(self, state: TrainState) -> TrainState:
    """``state`` on its shardings (a no-op once placed).

    Host values are cut per device (each device receives only its slice); with
    several processes every process passes the same values and each places only
    its own devices' slices.
    """
    return jax.tree.map(global_array, state, self.state_shardings(state))

  def place_batch(self, batch):
    """The batch split over ``(data, fsdp)`` (global arrays are checked and kept).

    Host values hold the *global* batch; with several processes every process
    passes the same global batch and places only its own devices' rows.

    Raises:
      ValueError: when a leaf's leading dimension does not divide over the
        ``data x fsdp`` devices.
    """
    check_batch_rows(
        batch, self.num_workers * self.fsdp_size,
        f"{self.num_workers} x {self.fsdp_size} devices of mesh axes "
        f"({self.data_axis!r}, {self.fsdp_axis!r})")
    return jax.tree.map(lambda x: global_array(x, self.batch_sharding), batch)


def sharded_block_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                       *, rules: Rules = (), aggregation: str = "majority",
                       data_axis: str = DATA, fsdp_axis: str = FSDP,
                       **kwargs) -> BlockTrainStep:
  """:class:`~absign_jax.BlockTrainStep` with parameters sharded along ``fsdp``.

  It is ``BlockTrainStep(..., aggregate=sharded_aggregator(aggregation, mesh),
  placement=Sharded(mesh, rules))``: the workers along ``data`` vote on the active
  block's gradient (each on its own rows of the batch), the ``fsdp`` devices of a
  worker share its rows and hold a slice of every parameter.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
    tx: a block-coordinate optimizer.
    mesh: a ``(data, fsdp)`` mesh (:func:`make_mesh`).
    rules: ``(regex, PartitionSpec)`` overrides of the inferred parameter shardings.
    aggregation: ``"majority"``, ``"majority_1bit"`` or ``"mean"``.
    data_axis: the voting axis.
    fsdp_axis: the parameter-sharding axis.
    **kwargs: the other options of :class:`~absign_jax.BlockTrainStep`.

  Returns:
    A :class:`~absign_jax.BlockTrainStep`; ``step.init(params)`` places the state on
    its shardings, ``step(state, batch)`` takes a global batch (split over
    ``(data, fsdp)``, :meth:`Sharded.place_batch`).
  """
  placement = Sharded(mesh, rules, data_axis, fsdp_axis)
  return BlockTrainStep(
      loss_fn, tx, aggregate=sharded_aggregator(aggregation, mesh, data_axis, fsdp_axis),
      placement=placement, **kwargs)


def sharded_full_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                      *, rules: Rules = (), data_axis: str = DATA, fsdp_axis: str = FSDP,
                      **kwargs) -> FullTrainStep:
  """The baseline on the same shardings: full backprop, mean gradient, any optax ``tx``.

  Each leaf's gradient is averaged over ``data`` on its ``fsdp`` slice (plain FSDP
  data parallelism); AdamW's moments are sharded like their parameters.
  """
  placement = Sharded(mesh, rules, data_axis, fsdp_axis)
  return FullTrainStep(loss_fn, tx,
                       aggregate=mean_aggregator(data_axis, placement.num_workers),
                       placement=placement, **kwargs)
