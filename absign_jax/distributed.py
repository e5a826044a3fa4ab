"""ABSignSGD-MV: data-parallel block sign descent with a majority vote (SPEC §6).

``n`` data-parallel workers (the devices along one mesh axis, in one process or in
many joined by ``jax.distributed``) each compute the active block's gradient on their
own shard of the batch, with the partial backpropagation of
:class:`~absign_jax.BlockTrainStep`. Only that block is communicated:

* ``"majority"``: every worker's ``sign(g)`` as int8 (int16 beyond 127 workers),
  summed with one all-reduce (``psum``); the vote is the sign of the sum, so a tie is 0.
* ``"majority_1bit"``: the same vote with 1 bit per coordinate on the wire. Each worker
  packs ``g > 0`` into bytes (8 coordinates per uint8) and appends one byte saying
  whether its block gradient holds an exact zero; one all-gather delivers every
  worker's bits, which are unpacked and counted locally.
* ``"mean"``: the mean gradient, summed with one all-reduce in the gradient dtype. It
  is handed to the optimizer as is, so ABSignSGD takes ``sign(mean)`` and a
  BAdam-style block Adam gets ordinary data-parallel gradients.

How an exact zero votes (both majority schemes): ``sign(0) = 0``, so a worker whose
gradient coordinate is exactly zero casts **no vote** for that coordinate; the vote is
``sign(#positive - #negative)`` over the workers that voted, and 0 on a tie (including
no votes at all). One bit cannot hold three states, so ``"majority_1bit"`` sends the
sign bits (1 = positive) always, and only when some worker flagged an exact zero in
this step's block does it run a second all-gather of "non-zero" bits (also 1 bit per
coordinate) inside a ``lax.cond``; every device takes the same branch because the
flags travel with the first all-gather. Exact zeros in a float gradient are rare
(coordinates no token reaches, underflow), so the second exchange usually never runs,
and ``"majority_1bit"`` gives the same vote as ``"majority"`` bit for bit in all
cases. Its cost: 1 bit per coordinate per worker, 2 bits in a step that has a zero.

The aggregated vote (in {-1, 0, 1}, in each leaf's dtype) is then fed to the
block-coordinate optimizer as the block gradient (the sign of a sign is itself), so
the learning rate, weight decay, schedules and block selection are exactly those of
the single-device step. Parameters and optimizer state are replicated; every device
computes the same update from the same vote, so they stay identical.

A step where any worker's block gradient or loss is not finite changes nothing on any
device (the block keeps its turn), as in the single-device step.

Communication per step is read from the compiled program by
:func:`collective_bytes`; ``benchmarks/comm_bytes.py`` prints it for each aggregation
and for a plain data-parallel AdamW step.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from absign_jax.step import BlockTrainStep, LossFn

PyTree = Any

AGGREGATIONS = ("majority", "majority_1bit", "mean")

__all__ = [
    "AGGREGATIONS",
    "DataParallelBlockStep",
    "DataParallelFullStep",
    "aggregate_block",
    "collective_bytes",
    "data_mesh",
    "replicate",
    "shard_batch",
]


# -- meshes and placement -------------------------------------------------------------


def data_mesh(axis: str = "data", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices, with ``Auto`` axis type.

  Args:
    axis: the axis name.
    devices: the devices (default ``jax.devices()``: every process's devices).

  Returns:
    A ``jax.sharding.Mesh``.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis,))


def _global(x, sharding: NamedSharding):
  """``x`` (identical in every process) as a global array with ``sharding``."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every array leaf of ``tree`` replicated on all devices of ``mesh``.

  Works with several processes: each process passes the same values (e.g. parameters
  initialised from the same seed, ``tx.init`` of them) and gets one global array.
  """
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: _global(x, sharding), tree)


def shard_batch(local_batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Global batch arrays split along ``axis`` from each process's own rows.

  Every process passes its local rows (leading dimension = its share of the global
  batch); the result's leading dimension is the global batch. In one process this is
  ``jax.device_put`` with the leading dimension split over ``axis``.
  """
  sharding = NamedSharding(mesh, P(axis))
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


# -- aggregation (inside shard_map) ---------------------------------------------------


def _count_dtype(n: int):
  """Smallest signed integer dtype that holds a sum of ``n`` values in {-1, 0, 1}."""
  if n <= np.iinfo(np.int8).max:
    return jnp.int8
  if n <= np.iinfo(np.int16).max:
    return jnp.int16
  return jnp.int32


def _split_like(flat: jax.Array, grads: Sequence[jax.Array]) -> list[jax.Array]:
  """Cuts a flat vector back into arrays shaped (and typed) like ``grads``."""
  out, start = [], 0
  for g in grads:
    out.append(flat[start:start + g.size].reshape(g.shape).astype(g.dtype))
    start += g.size
  return out


def _vote_majority(grads, axis_name, n):
  signs = jnp.concatenate([jnp.sign(g).astype(_count_dtype(n)).ravel() for g in grads])
  return jnp.sign(jax.lax.psum(signs, axis_name))


def _count_bits(packed: jax.Array, m: int) -> jax.Array:
  """Per coordinate, how many rows of ``packed`` (uint8[n, k], little-endian bits,
  as from ``jnp.packbits``) have its bit set: int32[m].

  The sum over rows comes before the reshape, so XLA fuses the unpacking into the
  reduction and never materialises the n x 8k unpacked bits.
  """
  shifts = jnp.arange(8, dtype=jnp.uint8)
  bits = (packed[:, :, None] >> shifts) & jnp.uint8(1)  # [n, k, 8]
  return jnp.sum(bits, axis=0, dtype=jnp.int32).reshape(-1)[:m]


def _vote_majority_1bit(grads, axis_name, n):
  positive = jnp.concatenate([(g > 0).ravel() for g in grads])
  nonzero = jnp.concatenate([(g != 0).ravel() for g in grads])
  m = positive.size
  has_zero = jnp.logical_not(jnp.all(nonzero)).astype(jnp.uint8)
  message = jnp.concatenate(
      [jnp.packbits(positive, bitorder="little"), has_zero[None]])
  # uint8[n, ceil(m / 8) + 1], the same on every device ("invarying": replicated).
  gathered = jax.lax.all_gather(message, axis_name, to="invarying")

  # Each branch returns the int8 vote, so that only m bytes cross the cond boundary
  # (the counts stay inside one fusion). votes = positives - negatives
  # = n_positive - (n_voters - n_positive).
  def everyone_votes(gathered, nonzero_bits):
    return jnp.sign(2 * _count_bits(gathered[:, :-1], m) - n).astype(jnp.int8)

  def some_did_not_vote(gathered, nonzero_bits):
    voted = jax.lax.all_gather(nonzero_bits, axis_name, to="invarying")
    return jnp.sign(2 * _count_bits(gathered[:, :-1], m) - _count_bits(voted, m)
                    ).astype(jnp.int8)

  return jax.lax.cond(jnp.any(gathered[:, -1] != 0), some_did_not_vote,
                      everyone_votes, gathered, jnp.packbits(nonzero, bitorder="little"))


def aggregate_block(grads: Sequence[jax.Array], axis_name: str, method: str,
                    axis_size: int) -> list[jax.Array]:
  """The workers' aggregated block gradient; call it inside ``shard_map``.

  Args:
    grads: this worker's gradient of the active block (a list of arrays); finite.
    axis_name: the mesh axis over which workers vote.
    method: ``"majority"``, ``"majority_1bit"`` or ``"mean"`` (see the module doc).
    axis_size: the number of workers along ``axis_name``.

  Returns:
    Arrays shaped like ``grads`` (and of their dtypes), identical on every worker:
    the vote in {-1, 0, 1} for the majority schemes, the mean gradient for ``"mean"``.
  """
  grads = list(grads)
  if method == "mean":
    return [(s / axis_size).astype(g.dtype)
            for s, g in zip(jax.lax.psum(grads, axis_name), grads)]
  if method == "majority":
    vote = _vote_majority(grads, axis_name, axis_size)
  elif method == "majority_1bit":
    vote = _vote_majority_1bit(grads, axis_name, axis_size)
  else:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}.")
  return _split_like(vote, grads)


# -- training steps -------------------------------------------------------------------


class _ShardedProgram:
  """One of :class:`~absign_jax.BlockTrainStep`'s programs, run per device.

  Wraps ``program(*replicated, batch)`` (or ``program(b, *replicated, batch)`` with a
  static block ``b``) in ``shard_map`` + ``jit``: every argument but the last is
  replicated, the last (the batch) is split along ``axis``, every output replicated.
  Like the ``jax.jit`` object it stands in for, it is called or ``.lower``-ed.

  ``check_vma=False`` matters: with it on, ``jax.grad`` inside ``shard_map`` with
  respect to a replicated (invariant) input transposes the implicit broadcast into a
  ``psum``, i.e. an all-reduce of the full float gradient -- exactly the traffic the
  vote avoids. With it off, each device's gradient stays local and the only
  collectives are the ones written here (checked by ``collective_bytes`` in tests).
  """

  def __init__(self, program: Callable, mesh: Mesh, axis: str, *, donate: bool,
               static_block: bool):
    self._program = program
    self._mesh, self._axis = mesh, axis
    self._donate, self._static_block = donate, static_block
    self._jitted: dict[int, Callable] = {}

  def _get(self, nargs: int):
    if nargs not in self._jitted:
      first = 1 if self._static_block else 0
      specs = (P(),) * (nargs - first - 1) + (P(self._axis),)

      def run(*args):
        fn = self._program
        if self._static_block:
          fn, args = functools.partial(fn, args[0]), args[1:]
        return jax.shard_map(fn, mesh=self._mesh, in_specs=specs, out_specs=P(),
                             check_vma=False)(*args)

      donate = tuple(range(first, nargs - 1)) if self._donate else ()
      self._jitted[nargs] = jax.jit(
          run, static_argnums=(0,) if self._static_block else (),
          donate_argnums=donate)
    return self._jitted[nargs]

  def __call__(self, *args):
    return self._get(len(args))(*args)

  def lower(self, *args):
    return self._get(len(args)).lower(*args)


class DataParallelBlockStep(BlockTrainStep):
  """:class:`~absign_jax.BlockTrainStep` with the batch split over a mesh axis.

  Each device backpropagates to the active block on its shard of the batch; the
  block gradients are aggregated (``aggregation``, see the module doc) and the
  aggregate goes through the block-coordinate optimizer ``tx``, identically on every
  device. Dispatch (per-block programs, ``lax.switch``, the dynamic program for
  stacked layers) and the calling forms are those of
  :class:`~absign_jax.BlockTrainStep`.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a (local) batch.
    tx: a block-coordinate optimizer (``absignsgd``, ``block_adam``, ...). The
      majority votes are meant for sign descent; ``"mean"`` suits any of them.
    mesh: the device mesh; parameters are replicated over all of its axes.
    axis: the data-parallel axis: every batch leaf's leading dimension is split over
      it, and workers along it vote.
    aggregation: ``"majority"``, ``"majority_1bit"`` or ``"mean"``.
    **kwargs: the other options of :class:`~absign_jax.BlockTrainStep` (``layered``,
      ``dispatch``, ``donate``, ...).

  Call it as ``params, opt_state, metrics = step(params, opt_state, batch)`` (or in
  the state form of the base class) with replicated parameters and optimizer state
  (:func:`replicate`) and a batch whose leading dimension is split over ``axis``
  (:func:`shard_batch`). In one process, inputs are placed automatically. ``metrics``:
  ``loss`` (mean over workers), ``block``, ``grad_norm`` (root mean square over
  workers of the local block-gradient norm) and ``skipped``.

  Example:
    >>> import jax, jax.numpy as jnp, absign_jax
    >>> from absign_jax import distributed
    >>> mesh = distributed.data_mesh()
    >>> params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
    >>> loss = lambda p, x: sum(jnp.sum(l["w"] * x.mean(0)) for l in p["layers"])
    >>> tx = absign_jax.absignsgd(0.5)
    >>> step = distributed.DataParallelBlockStep(loss, tx, mesh)
    >>> batch = jnp.ones((mesh.size, 2))
    >>> params, state, metrics = step(params, tx.init(params), batch)
    >>> params["layers"][2]["w"].tolist()
    [0.5, 0.5]
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, *,
               axis: str = "data", aggregation: str = "majority", **kwargs):
    if aggregation not in AGGREGATIONS:
      raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got "
                       f"{aggregation!r}.")
    if axis not in mesh.axis_names:
      raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}.")
    super().__init__(loss_fn, tx, **kwargs)
    self.mesh = mesh
    self.axis = axis
    self.aggregation = aggregation
    self.num_workers = int(mesh.shape[axis])
    donate = kwargs.get("donate", True)
    # The base class's programs, each run per device under shard_map.
    self._per_block = _ShardedProgram(self._static_block_step, mesh, axis,
                                      donate=donate, static_block=True)
    self._switch = _ShardedProgram(self._switch_step, mesh, axis, donate=donate,
                                   static_block=False)
    self._stacked = _ShardedProgram(self._stacked_step, mesh, axis, donate=donate,
                                    static_block=False)

  def place(self, *args):
    """The call's arguments as global arrays: state replicated, batch split.

    In one process, host or single-device values are placed (a no-op for arrays
    placed already). With several processes the arguments must already be global
    (:func:`replicate`, :func:`shard_batch`) and are returned unchanged.
    """
    if jax.process_count() > 1:
      return args
    *state, batch = args
    return (*replicate(tuple(state), self.mesh), shard_batch(batch, self.mesh, self.axis))

  def __call__(self, *args):
    return super().__call__(*self.place(*args))

  def _finish(self, spec, flat, treedef, b, grads, loss, *args, **kwargs):
    """Aggregates the workers' block gradients, then the base class's update."""
    axis, n = self.axis, self.num_workers
    finite = jnp.isfinite(loss)
    for g in grads:
      finite &= jnp.all(jnp.isfinite(g))
    sq_norm = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads)
    stats = jax.lax.psum(
        jnp.stack([loss.astype(jnp.float32), 1.0 - finite.astype(jnp.float32),
                   sq_norm]), axis)
    all_finite = stats[1] == 0
    # A non-finite gradient on one worker must not poison the others' vote; the step
    # is skipped everywhere anyway (the loss handed to the base class is NaN).
    clean = [jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)) for g in grads]
    agg = aggregate_block(clean, axis, self.aggregation, n)
    mean_loss = stats[0] / n
    *out, metrics = super()._finish(
        spec, flat, treedef, b, agg, jnp.where(all_finite, mean_loss, jnp.nan),
        *args, **kwargs)
    metrics = dict(metrics, loss=mean_loss, grad_norm=jnp.sqrt(stats[2] / n))
    return (*out, metrics)


class DataParallelFullStep:
  """The plain data-parallel baseline: full backprop, mean gradient, any optax ``tx``.

  The gradient of every parameter is averaged with an all-reduce (``pmean``) before
  ``tx.update``; this is the communication ABSignSGD-MV is compared with.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: any optax transformation (e.g. ``optax.adamw``).
    mesh: the device mesh (parameters replicated).
    axis: the data-parallel axis.
    donate: donate the parameter and optimizer-state buffers.
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, *,
               axis: str = "data", donate: bool = True):
    self.mesh, self.axis = mesh, axis

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      loss, grads = jax.lax.pmean((loss, grads), axis)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    self._step = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(axis)),
                      out_specs=(P(), P(), P()), check_vma=False),
        donate_argnums=(0, 1) if donate else ())

  def __call__(self, params, opt_state, batch):
    if jax.process_count() == 1:
      params, opt_state = replicate(params, self.mesh), replicate(opt_state, self.mesh)
      batch = shard_batch(batch, self.mesh, self.axis)
    return self._step(params, opt_state, batch)

  def lower(self, params, opt_state, batch, block=None):
    """The lowered program (``.compile()`` it for :func:`collective_bytes`)."""
    return self._step.lower(params, opt_state, batch)


# -- communication, read from the compiled program ------------------------------------

_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
    "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f8e4m3fn": 8,
    "f8e5m2": 8, "f8e4m3": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e4m3b11fnuz": 8,
    "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4, "bf16": 16, "f16": 16, "f32": 32,
    "f64": 64, "c64": 64, "c128": 128,
}
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "collective-permute", "collective-broadcast", "ragged-all-to-all")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
    r"=%?([\w.\-]+)|\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def _type_bytes(type_str: str) -> float:
  """Bytes of an HLO type (a shape or a tuple of shapes); ``token``s count 0."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_str):
    if dtype not in _DTYPE_BITS:
      continue
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    total += size * _DTYPE_BITS[dtype] / 8
  return total


def _balanced(s: str, start: int) -> int:
  """Index just past the bracket group opening at ``s[start]``."""
  depth = 0
  for i in range(start, len(s)):
    if s[i] in "([{":
      depth += 1
    elif s[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(s)


def _split_top(s: str) -> list[str]:
  """Splits ``s`` at commas outside brackets."""
  parts, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def _parse_instruction(rhs: str):
  """``(type, opcode, operands, attributes)`` of an HLO instruction's right side."""
  rhs = rhs.strip()
  end = _balanced(rhs, 0) if rhs.startswith("(") else rhs.find(" ")
  type_str, rest = rhs[:end], rhs[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return type_str, rest, [], ""
  opcode = rest[:paren].strip()
  close = _balanced(rest, paren)
  return type_str, opcode, _split_top(rest[paren + 1:close - 1]), rest[close:]


def _group_size(attrs: str, default: int) -> int:
  m = _GROUPS_LIST.search(attrs)
  if m:
    return max(1, len([x for x in m.group(1).split(",") if x]))
  m = _GROUPS_IOTA.search(attrs)
  if m:
    return int(m.group(2))
  return default


def collective_bytes(compiled: Any, num_devices: int | None = None) -> dict[str, Any]:
  """Bytes moved by the collectives of a compiled program, read from its HLO.

  Every all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  (and their async ``-start`` forms) of the optimized HLO is found and the sizes of
  its operands are summed (the bytes each device contributes). Collectives inside a
  ``conditional`` branch run only when that branch is taken; they are summed apart.
  Each op is counted once (one in a loop body would run once per iteration).

  Args:
    compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``) or its
      ``as_text()``.
    num_devices: the group size to assume where the HLO names no replica groups.

  Returns:
    A dict with, for the collectives outside conditionals, the bytes per op kind
    (``"all-reduce"``, ``"all-gather"``, ...), ``"total"`` and ``"ops"`` (how many);
    ``"conditional"``, the operand bytes of collectives inside conditional branches;
    and ``"wire"``, an estimate of the bytes each device sends with ring algorithms
    (all-reduce ``2 (g-1)/g S``, all-gather ``(g-1) S``, reduce-scatter and
    all-to-all ``(g-1)/g S``, permute ``S``, for operand size ``S`` and group ``g``).
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  default_group = num_devices or 1
  comps: dict[str, list[tuple[str, str, str, list[str], str]]] = {}
  types: dict[str, str] = {}
  current = None
  for line in text.splitlines():
    line = _COMMENT.sub("", line)  # e.g. /*index=5*/ inside long operand lists
    header = _HEADER.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(1)
      comps[current] = []
      continue
    d = _DEF.match(line)
    if d is None or current is None:
      continue
    name = d.group(1)
    type_str, opcode, operands, attrs = _parse_instruction(d.group(2))
    types[name] = type_str
    comps[current].append((name, type_str, opcode, operands, attrs))

  def called(attrs: str) -> list[str]:
    out = []
    for single, many in _CALLED.findall(attrs):
      if single:
        out.append(single)
      if many:
        out += [c.strip().lstrip("%") for c in many.split(",") if c.strip()]
    return out

  # Computations reachable from a conditional's branches.
  conditional, todo = set(), []
  for instrs in comps.values():
    for _, _, opcode, _, attrs in instrs:
      if opcode == "conditional":
        todo += called(attrs)
  while todo:
    c = todo.pop()
    if c in conditional or c not in comps:
      continue
    conditional.add(c)
    for _, _, _, _, attrs in comps[c]:
      todo += called(attrs)

  def operand_bytes(op: str) -> float:
    tokens = op.split()
    name = tokens[-1].lstrip("%")
    if len(tokens) > 1:  # an inline operand type: "f32[4]{0} %x"
      return _type_bytes(" ".join(tokens[:-1]))
    return _type_bytes(types.get(name, ""))

  result: dict[str, Any] = {k: 0 for k in COLLECTIVE_OPS}
  result.update(total=0, ops=0, conditional=0, wire=0.0)
  for comp, instrs in comps.items():
    for _, _, opcode, operands, attrs in instrs:
      kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
      if kind not in COLLECTIVE_OPS:
        continue
      size = sum(operand_bytes(op) for op in operands)
      if comp in conditional:
        result["conditional"] += int(size)
        continue
      g = _group_size(attrs, default_group)
      result[kind] += int(size)
      result["total"] += int(size)
      result["ops"] += 1
      factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": g - 1,
                "reduce-scatter": (g - 1) / g, "all-to-all": (g - 1) / g,
                "ragged-all-to-all": (g - 1) / g}.get(kind, 1.0)
      result["wire"] += size * factor
  result["wire"] = int(round(result["wire"]))
  return result
