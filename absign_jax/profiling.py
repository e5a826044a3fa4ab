"""Measurement: bytes of trees and compiled programs, and collective bytes from HLO.

Nothing here runs during training; the program (``absign_jax.llm``), the benchmarks
and the tests read sizes through these functions:

* :func:`tree_bytes`: bytes held by the arrays of a pytree (parameters, an optimizer
  state).
* :func:`per_device_bytes`: bytes of a pytree's arrays held by each device, read from
  their shardings.
* :func:`master_bytes`: bytes of the float32 master copy in a
  :class:`~absign_jax.train.precision.PrecisionState`.
* :func:`program_memory`: argument, output, temporary and aliased bytes of a compiled
  program, from XLA's ``memory_analysis()``.
* :func:`collective_bytes`: bytes moved by the collectives of a compiled program, read
  from its optimized HLO text; :func:`collective_bytes_by_axis`, the same per mesh
  axis (each collective attributed to the axis its replica groups run along,
  :func:`replica_groups` and :func:`collective_axis`).
* :func:`compiled_flops`: the matmul FLOPs a compiled program executes, read from its
  optimized HLO with loop trip counts applied (``cost_analysis()`` counts a loop body
  once).
* :func:`matmul_peak`: this machine's measured matmul throughput through XLA, the
  reference for "fraction of peak" figures.
* :func:`cpu_usage`: this process's CPU time (user and kernel) and page faults so far;
  the difference of two readings is what the code between them cost the CPU.
* :func:`machine_info`: the machine and the versions a figure was measured with.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import resource
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["COLLECTIVE_OPS", "CpuUsage", "collective_axis", "collective_bytes",
           "collective_bytes_by_axis", "compiled_flops", "cpu_usage", "machine_info",
           "master_bytes", "matmul_peak", "per_device_bytes", "program_memory",
           "replica_groups", "tree_bytes"]


def tree_bytes(tree: PyTree) -> int:
  """Bytes held by the arrays of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def per_device_bytes(tree: PyTree) -> dict[int, int]:
  """Bytes of ``tree``'s arrays held by each device (``{device id: bytes}``), read from
  their shardings (leaves without one are skipped)."""
  out: dict[int, int] = {}
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      continue
    item = np.dtype(x.dtype).itemsize
    for device, index in sharding.devices_indices_map(tuple(x.shape)).items():
      n = 1
      for dim, sl in zip(x.shape, index):
        n *= len(range(*sl.indices(dim)))
      out[device.id] = out.get(device.id, 0) + n * item
  return out


def master_bytes(precision_state: Any) -> int:
  """Bytes held by the master copy of a :class:`~absign_jax.train.precision.PrecisionState`."""
  return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(precision_state.master))


def program_memory(compiled: Any) -> dict[str, int | None]:
  """Sizes from XLA's ``memory_analysis()`` of a compiled program.

  Args:
    compiled: a ``jax.stages.Compiled`` (``step.lower(state, batch).compile()``).

  Returns:
    ``argument``, ``output``, ``temp`` and ``alias`` bytes and ``total`` = argument +
    output + temp - alias (donated buffers count once); ``{"total": None}`` where the
    backend reports nothing.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {"total": None}
  out = {k: int(getattr(m, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


class CpuUsage(NamedTuple):
  """CPU time and page faults of this process (all its threads), from ``getrusage``.

  Subtract two readings (``after - before``) for what happened between them.

  Attributes:
    user_s: CPU seconds in user mode.
    sys_s: CPU seconds in the kernel (page faults, ``mmap``/``munmap``, thread
      wake-ups).
    minor_faults: page faults served without I/O (a first touch of fresh memory).
    major_faults: page faults that needed I/O.
    voluntary_switches: context switches the process asked for (a thread waiting).
    involuntary_switches: context switches forced on it (other processes' load).
  """

  user_s: float
  sys_s: float
  minor_faults: int
  major_faults: int
  voluntary_switches: int
  involuntary_switches: int

  def __sub__(self, other: "CpuUsage") -> "CpuUsage":  # type: ignore[override]
    return CpuUsage(*(a - b for a, b in zip(self, other)))


def cpu_usage() -> CpuUsage:
  """This process's :class:`CpuUsage` so far (``resource.getrusage(RUSAGE_SELF)``).

  Examples:
    >>> before = cpu_usage()
    >>> _ = sum(range(10**5))
    >>> (cpu_usage() - before).user_s >= 0
    True
  """
  r = resource.getrusage(resource.RUSAGE_SELF)
  return CpuUsage(r.ru_utime, r.ru_stime, r.ru_minflt, r.ru_majflt, r.ru_nvcsw,
                  r.ru_nivcsw)


# -- collectives, read from the optimized HLO -------------------------------------------

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
# The whole replica_groups attribute, in each of its forms (see replica_groups).
_GROUPS_ATTR = re.compile(
    r"replica_groups=(\{\{[0-9,{} ]*\}\}|\{\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?"
    r"|mesh\[[^\]]*\](?:<=\[[0-9,]+\](?:T\([0-9,]+\))?)?\s*\{[^}]*\})")
_SOURCE_TARGET = re.compile(r"source_target_pairs=\{([0-9,{} ]*)\}")
# A collective's opcode in a line of HLO (group 2: its async "-start" suffix).
_COLLECTIVE_CALL = re.compile(r"\b(" + "|".join(COLLECTIVE_OPS) + r")((?:-start)?)\(")


def machine_info() -> dict[str, Any]:
  """What a measurement ran on: backend and device, CPU model and count, load, versions.

  Every recorded figure carries this, so that figures from different machines are
  never compared as if they were one machine's.
  """
  def version(dist):
    try:
      return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      return None

  info: dict[str, Any] = {
      "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
      "platform": platform.platform(), "python": platform.python_version(),
      "jax": jax.__version__, "flax": version("flax"), "optax": version("optax")}
  try:
    info["load_avg"] = os.getloadavg()
  except OSError:
    pass
  fields = {}
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  if "model name" in fields:
    info["cpu"] = fields["model name"]
  # Virtual machines often mask the model name ("AMD EPYC"); the family, model and
  # stepping still tell two generations apart, whose steps can differ by 40%.
  ident = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
  if ident:
    info["cpu_id"] = ", ".join(ident)
  return info


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


def _computations(compiled: Any):
  """``({computation: [(name, type, opcode, operands, attributes)]}, {name: type})``
  of a compiled program's optimized HLO (a ``jax.stages.Compiled`` or its text)."""
  text = compiled if isinstance(compiled, str) else compiled.as_text()
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
  return comps, types


def _called(attrs: str) -> list[str]:
  """The computations an instruction's attributes name (``calls=``, ``body=``, ...)."""
  out = []
  for single, many in _CALLED.findall(attrs):
    if single:
      out.append(single)
    if many:
      out += [c.strip().lstrip("%") for c in many.split(",") if c.strip()]
  return out


def _operand_type(op: str, types: dict[str, str]) -> str:
  """An operand's HLO type: inline (``f32[4]{0} %x``) or that of the named value."""
  tokens = op.split()
  if len(tokens) > 1:
    return " ".join(tokens[:-1])
  return types.get(tokens[-1].lstrip("%"), "")


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
  default_group = num_devices or 1
  comps, types = _computations(compiled)
  called = _called

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
    return _type_bytes(_operand_type(op, types))

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


# -- collectives per mesh axis ------------------------------------------------------


def _iota(dims: list[int], src: str | None, perm: str | None) -> np.ndarray:
  """Device ids laid out as ``dims``: ``iota(src).transpose(perm)`` (HLO's ``<=``)."""
  if src is None:
    return np.arange(int(np.prod(dims))).reshape(dims)
  ids = np.arange(int(np.prod(dims))).reshape([int(v) for v in src.split(",")])
  if perm:
    ids = ids.transpose([int(v) for v in perm.split(",")])
  return ids.reshape(dims)


def replica_groups(attr: str, num_devices: int) -> list[frozenset[int]]:
  """The replica groups of a collective, from the HLO text of its attribute.

  Args:
    attr: the value of ``replica_groups=``: ``{{0,4},{1,5}}``, ``{}`` (every device),
      ``[4,2]<=[2,4]T(1,0)`` (an iota of device ids, reshaped and transposed, whose
      rows are the groups) or ``mesh['a'=2,'b'=4] {'a'}`` (groups vary along ``a``).
    num_devices: the device count (the one group of ``{}``).

  Returns:
    The groups, each a set of device ids.
  """
  if attr == "{}":
    return [frozenset(range(num_devices))]
  if attr.startswith("{"):
    return [frozenset(int(v) for v in g.split(",") if v.strip())
            for g in re.findall(r"\{([0-9, ]*)\}", attr[1:-1])]
  if attr.startswith("mesh"):
    m = re.fullmatch(r"mesh\[([^\]]*)\](?:<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?)?\s*"
                     r"\{([^}]*)\}", attr)
    axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
    names, dims = [a for a, _ in axes], [int(v) for _, v in axes]
    ids = _iota(dims, m.group(2), m.group(3))
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
    rest = [k for k in range(len(dims)) if k not in chosen]
    size = int(np.prod([dims[k] for k in chosen])) if chosen else 1
    rows = ids.transpose(rest + chosen).reshape(-1, size)
    return [frozenset(int(v) for v in row) for row in rows]
  m = re.fullmatch(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attr)
  out_shape = [int(v) for v in m.group(1).split(",")]
  ids = _iota(out_shape, m.group(2), m.group(3)).reshape(out_shape[0], -1)
  return [frozenset(int(v) for v in row) for row in ids]


def _axis_groups(mesh: Any):
  """``(name, groups)`` per mesh axis: the sets of device ids (positions in the
  mesh) that vary along that axis only."""
  ids = np.arange(mesh.size).reshape(tuple(mesh.shape.values()))
  for k, name in enumerate(mesh.shape):
    rows = np.moveaxis(ids, k, -1).reshape(-1, ids.shape[k])
    yield name, [frozenset(int(v) for v in row) for row in rows]


def collective_axis(groups: list[frozenset[int]], mesh: Any) -> str:
  """The mesh axis a collective's replica groups run along.

  Args:
    groups: the replica groups (:func:`replica_groups`); device ids are positions in
      the mesh.
    mesh: a ``jax.sharding.Mesh`` (only its ``shape`` and ``size`` are read).

  Returns:
    An axis name (the first axis whose groups these are: with ``fsdp=1`` the ``data``
    groups span the whole mesh), ``"local"`` (every group one device: nothing moves),
    ``"all"`` (one group of every device, spanning several axes) or ``"other"``.
  """
  if all(len(g) <= 1 for g in groups):
    return "local"
  for name, along in _axis_groups(mesh):
    if set(along) == set(groups):
      return name
  if len(groups) == 1 and len(groups[0]) == mesh.size:
    return "all"
  return "other"


def _pairs_axis(pairs: list[frozenset[int]], mesh: Any) -> str:
  """The axis of a collective-permute: the first whose groups hold every pair."""
  if all(len(p) <= 1 for p in pairs):
    return "local"
  for name, along in _axis_groups(mesh):
    if all(any(p <= g for g in along) for p in pairs):
      return name
  return "all"


def collective_bytes_by_axis(compiled: Any, mesh: Any) -> dict[str, dict]:
  """:func:`collective_bytes` of a compiled program, per mesh axis.

  Each collective of the optimized HLO is attributed to the axis its replica groups
  run along (:func:`collective_axis`; a collective-permute to the first axis whose
  groups hold each of its source-target pairs). Under
  :class:`~absign_jax.train.sharding.Sharded`, the ``fsdp`` entry holds the parameter
  gathers (``all-gather``) and the reduction of a worker's gradient over its devices;
  the ``data`` entry holds the vote.

  Args:
    compiled: a ``jax.stages.Compiled`` or its ``as_text()``.
    mesh: the ``jax.sharding.Mesh`` it was compiled for (only its ``shape``, ``size``
      and ``axis_names`` are read); device ids are positions in it.

  Returns:
    ``{axis: collective_bytes dict}`` for each mesh axis, plus ``"all"``,
    ``"other"`` and ``"local"`` (see :func:`collective_axis`) when some collective
    is of that kind.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  lines = text.splitlines()
  axis_of = []
  everyone = [frozenset(range(mesh.size))]
  for line in lines:
    if _COLLECTIVE_CALL.search(line) is None:
      axis_of.append(None)
      continue
    m = _GROUPS_ATTR.search(line)
    pairs = _SOURCE_TARGET.search(line)
    if m:
      groups = replica_groups(m.group(1), mesh.size)
    elif pairs:  # a permute: each pair is a group; its axis is the one holding both
      groups = [frozenset(int(v) for v in p.split(","))
                for p in re.findall(r"\{([0-9, ]+)\}", pairs.group(1))]
      axis_of.append(_pairs_axis(groups, mesh))
      continue
    else:  # replica_groups={} (or none): every device
      groups = everyone
    axis_of.append(collective_axis(groups, mesh))
  out = {}
  for axis in [*mesh.axis_names, "all", "other", "local"]:
    kept = []
    for line, a in zip(lines, axis_of):
      if a is not None and a != axis:  # another axis's collective: not counted here
        line = _COLLECTIVE_CALL.sub("custom-call(", line, count=1)
      kept.append(line)
    counted = collective_bytes("\n".join(kept), num_devices=mesh.size)
    if axis in mesh.axis_names or counted["ops"]:
      out[axis] = counted
  return out


# -- FLOPs, read from the optimized HLO, and the machine's matmul throughput -----------

_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_LHS_CONTRACTING = re.compile(
    r'\blhs_contracting_dims=\{([0-9,]*)\}|"lhs_contracting_dimensions":\[([0-9",]*)\]')
_DIM_LABELS = re.compile(r"\bdim_labels=\w+_(\w+)->")
_MATMUL_TARGET = re.compile(r'custom_call_target="[^"]*(?:gemm|matmul|conv)', re.I)


def _dims(type_str: str) -> list[int]:
  """The dimensions of an HLO type's first array shape (a tuple's first element)."""
  m = _SHAPE.search(type_str)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def compiled_flops(compiled: Any) -> dict[str, Any]:
  """Matmul FLOPs a compiled program executes, read from its optimized HLO.

  XLA's ``cost_analysis()`` counts a while loop's body once, so a ``lax.scan`` over
  ten layers reports one layer's FLOPs; here each loop body counts ``trip count``
  times (its condition ``trip count + 1`` times) and nested loops multiply. Counted:

  * every ``dot``: ``2 * prod(result dims) * prod(lhs contracting dim sizes)``;
  * every ``convolution``: ``2 * prod(result dims) * prod(kernel dims) / kernel
    output features`` (every kernel tap, padding included);
  * matmul custom calls that carry their dimension numbers (cuBLAS ``__cublas$gemm``
    and ``__cublas$lt$matmul``), as a ``dot``.

  Dots inside fusions, calls and async wrappers count once per execution of the
  instruction that calls them. Of a ``conditional``, only its most expensive branch
  counts (an upper bound: which branch runs is known only at run time). Elementwise
  and transcendental work is not counted (in a transformer's training step matmuls
  dominate); a multiply-add is 2 FLOPs whatever the dtype.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``) or its
      ``as_text()``.

  Returns:
    ``flops`` (``dot_flops + conv_flops``), ``dot_flops``, ``conv_flops``;
    ``unknown_trip_loops``, how many while loops have no known trip count (their
    body is counted once, so ``flops`` is then a lower bound); ``uncounted_calls``,
    how many custom calls look like matmuls or convolutions but name no dimensions
    (not counted).

  Examples:
    >>> f = jax.jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 16)))
    >>> compiled_flops(f.compile())["flops"]  # 2 * 4 * 16 * 8
    1024.0
  """
  comps, types = _computations(compiled)
  counts = {"unknown_trip_loops": 0, "uncounted_calls": 0}
  memo: dict[str, tuple[float, float]] = {}

  def instruction(type_str, opcode, operands, attrs) -> tuple[float, float]:
    """(dot, conv) FLOPs of one execution of one instruction, callees included."""
    out = math.prod(_dims(type_str))
    if opcode == "dot" or (opcode == "custom-call" and _MATMUL_TARGET.search(attrs)):
      m = _LHS_CONTRACTING.search(attrs)
      if m is None:
        counts["uncounted_calls"] += 1
        return 0.0, 0.0
      lhs = _dims(_operand_type(operands[0], types))
      k = math.prod(lhs[int(i)] for i in re.findall(r"\d+", m.group(1) or m.group(2)))
      return 2.0 * out * k, 0.0
    if opcode == "convolution":
      kernel = _dims(_operand_type(operands[1], types))
      out_features = kernel[_DIM_LABELS.search(attrs).group(1).index("o")]
      return 0.0, 2.0 * out * math.prod(kernel) / out_features
    if opcode.endswith(("-done", "-update")):  # the "-start" counted the callee
      return 0.0, 0.0
    if opcode == "while":
      body = re.search(r"\bbody=%?([\w.\-]+)", attrs).group(1)
      cond = re.search(r"\bcondition=%?([\w.\-]+)", attrs).group(1)
      trip = _TRIP_COUNT.search(attrs)
      if trip is None:
        counts["unknown_trip_loops"] += 1
      n = int(trip.group(1)) if trip else 1
      (bd, bc), (cd, cc) = computation(body), computation(cond)
      return n * bd + (n + 1) * cd, n * bc + (n + 1) * cc
    callees = [computation(c) for c in _called(attrs)]
    if opcode == "conditional":
      return max(callees, key=sum, default=(0.0, 0.0))
    return sum(d for d, _ in callees), sum(c for _, c in callees)

  def computation(name: str) -> tuple[float, float]:
    if name not in memo:  # a computation called twice is parsed once
      flops = [instruction(*i[1:]) for i in comps.get(name, [])]
      memo[name] = (sum(d for d, _ in flops), sum(c for _, c in flops))
    return memo[name]

  text = compiled if isinstance(compiled, str) else compiled.as_text()
  entry = re.search(r"^ENTRY\s+%?([\w.\-]+)", text, re.M).group(1)
  dot, conv = computation(entry)
  return {"flops": dot + conv, "dot_flops": dot, "conv_flops": conv, **counts}


def matmul_peak(size: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                device: Any = None) -> dict[str, Any]:
  """This machine's measured matmul throughput through XLA.

  A jitted ``size x size @ size x size`` matmul is compiled and run three times to
  warm up (the first runs start the thread pool and find the caches cold: on a
  2-core CPU they run at 60-75% of the later rate), then ``repeats`` times, each
  waited for (``block_until_ready``); the fastest counts, as a peak should. It is
  the reference for "fraction of peak" figures (a step's
  :func:`compiled_flops` per second over this): measure it in the same run, on the
  same cores, so that the load other processes put on the machine is the same.

  Args:
    size: the side of the square matrices.
    dtype: their dtype.
    repeats: how many timed runs.
    device: the device to run on (default: the first one).

  Returns:
    ``flops_per_s`` (``2 * size**3 / seconds``), ``size``, ``dtype`` (its name),
    ``seconds`` (the fastest matmul), ``median_seconds`` and ``device`` (its kind).
  """
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.full((size, size), 0.5, dtype), device)
  mm = jax.jit(jnp.matmul)
  for _ in range(3):
    mm(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  seconds = min(times)
  return {"flops_per_s": 2.0 * size**3 / seconds, "size": size,
          "dtype": jnp.dtype(dtype).name, "seconds": seconds,
          "median_seconds": statistics.median(times), "device": device.device_kind}
