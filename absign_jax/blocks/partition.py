"""Block partition: which block each parameter leaf belongs to.

A *block* is one transformer layer with everything inside it. Layers are numbered
from 0 (next to the embeddings) to N-1 (next to the head). Non-layer parameters are
frozen unless an embedding block (placed before layer 0) or a head block (placed after
the last layer) is asked for.

Detection works on any pytree of arrays: ``nnx.State``, an ``nnx.Module`` (its
``nnx.Param`` state), linen ``{"params": ...}`` dicts and plain dict/list trees. It
recognises

* layer lists: ``model.layers.3``, ``transformer.h.3``, ``blocks.3``, ... (integer
  children of a container; the index is parsed as an integer, so layer 1 is never
  confused with layer 11),
* linen auto-names: ``layers_0``, ``layers_1``, ... or ``Block_0``, ``Block_1``, ...,
* stacked layers: every leaf under ``layers`` / ``h`` / ``blocks`` has a leading axis
  of length N (``nnx.vmap``/``nnx.scan`` or linen ``nn.scan``); block ``k`` is slice
  ``k`` of each such leaf. Under another name, the container whose leaves (two or
  more, all at least matrices) share a leading axis.

An explicit ``partition`` (a callable on the dotted path, or a labels tree) overrides
detection.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any
# A partition callable gets the dotted path of a leaf and the leaf; it returns the
# block id (0 = shallowest) or None for a frozen leaf.
PartitionFn = Callable[[str, Any], "int | None"]

# Container names whose integer children (or stacked leaves) are transformer layers.
# Layer containers: model.layers, transformer.h, gpt_neox.layers, h, decoder.layers, blocks,
# model.decoder.layers, transformer.blocks, transformer.layers, layers.
LAYER_CONTAINER_NAMES = ("layers", "h", "blocks", "layer", "block")
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "tok_embeddings", "pos_emb")

_INDEXED_NAME = re.compile(r"^(.*\D)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class LeafBlock:
  """Where one leaf belongs.

  Attributes:
    block: block id of the whole leaf, or of slice 0 when ``stacked``; None = frozen.
    stacked: the leaf's leading axis indexes consecutive blocks ``block + j``.
  """

  block: int | None
  stacked: bool = False


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """A static description of the blocks of one parameter tree.

  Attributes:
    num_blocks: number of blocks N.
    names: a readable name per block, e.g. ``"layers.3"``, ``"embedding"``.
    leaf_paths: dotted path of every leaf, in ``jax.tree`` flatten order.
    leaf_blocks: the :class:`LeafBlock` of every leaf, in the same order.
    members: for each block, its ``(leaf_index, slice_index_or_None)`` pairs.
    layout: ``"list"``, ``"linen"``, ``"stacked"`` or ``"explicit"``.
  """

  num_blocks: int
  names: tuple[str, ...]
  leaf_paths: tuple[str, ...]
  leaf_blocks: tuple[LeafBlock, ...]
  members: tuple[tuple[tuple[int, int | None], ...], ...]
  layout: str

  def block_of(self, path: str) -> LeafBlock:
    """The :class:`LeafBlock` of the leaf with dotted ``path``."""
    return self.leaf_blocks[self.leaf_paths.index(path)]

  def block_leaf_indices(self, block: int) -> tuple[int, ...]:
    return tuple(i for i, _ in self.members[block])

  def stacked_range(self) -> tuple[int, int] | None:
    """``(lo, hi)`` if blocks lo..hi-1 are all slices of the same stacked leaves."""
    stacked = [lb for lb in self.leaf_blocks if lb.stacked]
    if not stacked:
      return None
    lo = stacked[0].block
    hi = lo
    while hi < self.num_blocks and all(s is not None for _, s in self.members[hi]):
      hi += 1
    return lo, hi

  def block_sizes(self, leaves: Sequence[Any]) -> tuple[int, ...]:
    """Number of parameters in each block, given the flattened leaves."""
    sizes = []
    for members in self.members:
      n = 0
      for i, s in members:
        shape = np.shape(leaves[i])
        n += int(np.prod(shape[1:] if s is not None else shape))
      sizes.append(n)
    return tuple(sizes)

  def describe(self) -> str:
    """A one-line-per-block summary, for logs and error messages."""
    lines = [f"{self.num_blocks} blocks ({self.layout} layout):"]
    for b, name in enumerate(self.names):
      lines.append(f"  block {b}: {name} ({len(self.members[b])} leaves)")
    frozen = [p for p, lb in zip(self.leaf_paths, self.leaf_blocks) if lb.block is None]
    if frozen:
      shown = ", ".join(frozen[:6]) + (" ..." if len(frozen) > 6 else "")
      lines.append(f"  frozen: {len(frozen)} leaves ({shown})")
    return "\n".join(lines)


def _key_str(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None
               ) -> tuple[tuple[tuple[str, ...], ...], list[Any]]:
  """Flattens ``tree`` into (key tuples, leaves).

  A trailing ``value`` attribute (an ``nnx.Variable`` flattened as a pytree) is
  dropped, so a state of Variables and its pure-array twin have the same paths.

  Args:
    tree: any pytree.
    is_leaf: passed to ``jax.tree_util.tree_flatten_with_path`` (e.g. to keep the
      None entries of a sparse gradient tree as leaves).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  paths = []
  for path, _ in flat:
    keys = tuple(_key_str(k) for k in path)
    if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
      keys = keys[:-1]
    paths.append(keys)
  return tuple(paths), [leaf for _, leaf in flat]


def _as_param_tree(tree: PyTree) -> PyTree:
  try:  # An nnx.Module: partition its trainable parameters.
    from flax import nnx

    if isinstance(tree, nnx.Module):
      return nnx.state(tree, nnx.Param)
  except ImportError:  # pragma: no cover - flax is a dependency
    pass
  return tree


def _is_int(key: str) -> bool:
  return key.isdigit()


def _find_layer_list(paths):
  """Finds the layer list: returns {leaf_index: layer_index} and a layout name.

  Candidate groups are keyed by (container prefix, base name); a leaf registers in a
  group for every position of its path with an integer key (``layers.3``) or an
  indexed name (``layers_3``). Known container names win; otherwise the largest
  group of >= 2 structurally identical members.
  """
  groups: dict[tuple, dict[int, dict[int, tuple[str, ...]]]] = {}
  for leaf_idx, keys in enumerate(paths):
    for j in range(len(keys)):
      k = keys[j]
      if _is_int(k) and j >= 1:
        gid, idx = (keys[:j], None), int(k)
      else:
        m = _INDEXED_NAME.match(k)
        if not m:
          continue
        gid, idx = (keys[:j], m.group(1)), int(m.group(2))
      groups.setdefault(gid, {}).setdefault(idx, {})[leaf_idx] = keys[j + 1 :]

  def name_of(gid):
    prefix, base = gid
    return base if base is not None else (prefix[-1] if prefix else "")

  def valid(members):
    return sorted(members) == list(range(len(members)))

  def identical(members):
    shapes = {tuple(sorted(rel.values())) for rel in members.values()}
    return len(shapes) == 1

  known = [
      g for g, m in groups.items()
      if name_of(g).lower() in LAYER_CONTAINER_NAMES and valid(m)
  ]
  generic = [g for g, m in groups.items() if len(m) >= 2 and valid(m) and identical(m)]
  # Outermost group first (the layer list contains the per-layer sub-lists), then
  # the one covering most leaves.
  order = lambda g: (len(g[0]), -sum(len(v) for v in groups[g].values()))
  for candidates in (known, generic):
    if candidates:
      best = min(candidates, key=order)
      assignment = {
          leaf: idx for idx, leaves in groups[best].items() for leaf in leaves
      }
      return assignment, ("list" if best[1] is None else "linen"), best
  return None, None, None


def _find_stacked(paths, shapes):
  """Finds a container of stacked layers: all leaves under it share a leading axis."""
  candidates = {}
  for leaf_idx, keys in enumerate(paths):
    for j, k in enumerate(keys[:-1]):
      if k.lower() in LAYER_CONTAINER_NAMES:
        candidates.setdefault(keys[: j + 1], []).append(leaf_idx)
        break
  best = None
  for prefix, idxs in candidates.items():
    lead = {shapes[i][0] if shapes[i] else None for i in idxs}
    if len(lead) == 1 and None not in lead:
      if best is None or len(idxs) > len(candidates[best]):
        best = prefix
  if best is None:
    # Any other name (``transformer_blocks``, ``decoder``): the container whose
    # leaves, two or more and none of them a vector, share a leading axis; the one
    # covering most leaves, outermost first.
    candidates = {}
    for leaf_idx, keys in enumerate(paths):
      for j in range(1, len(keys)):
        candidates.setdefault(keys[:j], []).append(leaf_idx)
    ok = [p for p, idxs in candidates.items()
          if len(idxs) >= 2 and all(len(shapes[i]) >= 2 for i in idxs)
          and len({shapes[i][0] for i in idxs}) == 1]
    if ok:
      best = min(ok, key=lambda p: (-len(candidates[p]), len(p)))
  if best is None:
    return None, 0, None
  n = int(shapes[candidates[best][0]][0])
  return set(candidates[best]), n, best


def _is_embedding(keys: tuple[str, ...]) -> bool:
  return any(marker in k.lower() for k in keys for marker in EMBEDDING_MARKERS)


def _undetectable_error(paths) -> ValueError:
  top = sorted({".".join(k[:2]) for k in paths})
  shown = ", ".join(top[:20]) + (" ..." if len(top) > 20 else "")
  return ValueError(
      "block_spec: no transformer layer list found in the parameter tree. "
      f"Top-level paths seen: {shown}. Expected integer-indexed layers under one of "
      f"{LAYER_CONTAINER_NAMES} (e.g. 'model.layers.0.*'), linen names like "
      "'layers_0', or stacked layers with a leading layer axis. Pass an explicit "
      "partition instead: partition=lambda path, leaf: <block id or None>, or a "
      "labels tree of ints (-1 = frozen) with the same paths as the parameters."
  )


def _explicit(paths, leaves, partition) -> BlockSpec:
  dotted = [".".join(k) for k in paths]
  if callable(partition):
    labels = [partition(p, leaf) for p, leaf in zip(dotted, leaves)]
  else:
    label_paths, label_leaves = leaf_paths(partition)
    by_path = {".".join(k): v for k, v in zip(label_paths, label_leaves)}
    missing = [p for p in dotted if p not in by_path]
    if missing:
      raise ValueError(
          f"block_spec: the labels tree has no label for {missing[:5]}; give every "
          "parameter path an int block id (-1 = frozen)."
      )
    labels = [by_path[p] for p in dotted]
  blocks = []
  for p, lab in zip(dotted, labels):
    if lab is None or (isinstance(lab, (int, np.integer)) and int(lab) == -1):
      blocks.append(None)
    elif isinstance(lab, (int, np.integer)) and not isinstance(lab, bool) and lab >= 0:
      blocks.append(int(lab))
    else:
      raise ValueError(
          f"block_spec: partition gave {lab!r} for {p!r}; expected a block id >= 0, "
          "or None / -1 for a frozen leaf."
      )
  ids = sorted({b for b in blocks if b is not None})
  if not ids:
    raise ValueError("block_spec: the explicit partition froze every leaf; assign at "
                     "least one leaf to block 0.")
  if ids != list(range(len(ids))):
    raise ValueError(
        f"block_spec: partition block ids must be 0..K-1 without gaps; got {ids}."
    )
  names = tuple(f"block{b}" for b in ids)
  return _build(dotted, [LeafBlock(b) for b in blocks], names, "explicit")


def _build(dotted, leaf_blocks, names, layout, stacked_len=0) -> BlockSpec:
  members: list[list[tuple[int, int | None]]] = [[] for _ in names]
  for i, lb in enumerate(leaf_blocks):
    if lb.block is None:
      continue
    if lb.stacked:
      for j in range(stacked_len):
        members[lb.block + j].append((i, j))
    else:
      members[lb.block].append((i, None))
  return BlockSpec(
      num_blocks=len(names),
      names=tuple(names),
      leaf_paths=tuple(dotted),
      leaf_blocks=tuple(leaf_blocks),
      members=tuple(tuple(m) for m in members),
      layout=layout,
  )


def block_spec(
    params: PyTree,
    *,
    include_embedding: bool = False,
    include_head: bool = False,
    partition: PartitionFn | PyTree | None = None,
) -> BlockSpec:
  """Partitions a parameter tree into blocks (one per transformer layer).

  Args:
    params: the parameters: ``nnx.State``, ``nnx.Module``, linen dict, or any pytree
      of arrays. Only the paths and shapes are read.
    include_embedding: add a block 0 holding the embedding leaves (paths containing
      ``embed``, ``wte``, ``wpe``); layers then start at block 1.
    include_head: add a last block holding the other non-layer leaves (final norm,
      LM head).
    partition: an explicit partition that replaces detection: a callable
      ``(dotted_path, leaf) -> block id or None``, or a labels tree with an int per
      leaf (-1 = frozen).

  Returns:
    A static :class:`BlockSpec`.

  Raises:
    ValueError: empty tree, or no layer list found (the message lists the paths seen).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"embed": jnp.zeros((8, 4)),
    ...           "layers": [{"w": jnp.zeros((4, 4))} for _ in range(3)]}
    >>> block_spec(params).names
    ('layers.0', 'layers.1', 'layers.2')
  """
  params = _as_param_tree(params)
  paths, leaves = leaf_paths(params)
  if not leaves:
    raise ValueError("block_spec: the parameter tree has no leaves; pass the model's "
                     "parameters (e.g. nnx.state(model, nnx.Param)).")
  if partition is not None:
    return _explicit(paths, leaves, partition)
  if callable(params):
    raise TypeError("block_spec: got a callable; pass a parameter tree.")
  return _detect(paths, tuple(np.shape(x) for x in leaves), include_embedding,
                 include_head)


@functools.lru_cache(maxsize=256)
def _detect(paths, shapes, include_embedding, include_head) -> BlockSpec:
  dotted = [".".join(k) for k in paths]
  assignment, layout, group = _find_layer_list(paths)
  stacked_leaves: set[int] = set()
  n_layers = 0
  if assignment is not None:
    # Indexed submodules *inside* a stack (linen's Dense_0, Dense_1 in an nn.scan
    # body) are parts of one layer: the stack is the layer list.
    known = (group[1] or (group[0][-1] if group[0] else "")).lower()
    inside = _find_stacked(paths, shapes)[2]
    if (known not in LAYER_CONTAINER_NAMES and inside is not None
        and group[0][:len(inside)] == inside):
      assignment = None
  if assignment is not None:
    n_layers = max(assignment.values()) + 1
    container = ".".join(group[0] + ((group[1],) if group[1] else ()))
    sep = "." if layout == "list" else "_"
    layer_names = [f"{container}{sep}{i}" for i in range(n_layers)]
  else:
    stacked_leaves, n_layers, prefix = _find_stacked(paths, shapes)
    if not stacked_leaves:
      raise _undetectable_error(paths)
    layout = "stacked"
    layer_names = [f"{'.'.join(prefix)}[{i}]" for i in range(n_layers)]

  offset = 1 if include_embedding else 0
  names = (["embedding"] if include_embedding else []) + layer_names
  if include_head:
    names.append("head")
  leaf_blocks = []
  for i, keys in enumerate(paths):
    if assignment is not None and i in assignment:
      leaf_blocks.append(LeafBlock(assignment[i] + offset))
    elif i in stacked_leaves:
      leaf_blocks.append(LeafBlock(offset, stacked=True))
    elif _is_embedding(keys):
      leaf_blocks.append(LeafBlock(0 if include_embedding else None))
    else:
      leaf_blocks.append(LeafBlock(len(names) - 1 if include_head else None))
  spec = _build(dotted, leaf_blocks, names, layout, stacked_len=n_layers)
  empty = [spec.names[b] for b in range(spec.num_blocks) if not spec.members[b]]
  if empty:
    raise ValueError(f"block_spec: blocks {empty} have no parameters (e.g. "
                     "include_embedding=True on a model without embedding leaves).")
  return spec


def gather_block(spec: BlockSpec, leaves: Sequence[Any], block: int) -> list[Any]:
  """The arrays of ``block`` (a stacked leaf contributes its slice)."""
  return [leaves[i] if s is None else leaves[i][s] for i, s in spec.members[block]]


def scatter_block(
    spec: BlockSpec, leaves: Sequence[Any], block: int, values: Sequence[Any]
) -> list[Any]:
  """A copy of ``leaves`` with ``block``'s arrays replaced by ``values``."""
  out = list(leaves)
  for (i, s), v in zip(spec.members[block], values):
    out[i] = v if s is None else out[i].at[s].set(v)
  return out


class ShapeOnly:
  """Shape/dtype stand-in that slices like a stacked leaf (touches no data)."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)

  def __getitem__(self, index):
    return ShapeOnly(self.shape[1:], self.dtype)


def block_groups(spec: BlockSpec, leaves: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
  """Group id of every block, and the first block of each group.

  Blocks whose arrays have equal shapes and dtypes form one group: a stateful inner
  transformation (or a master copy) needs one state per group, not per block.
  """
  signatures: dict[tuple, int] = {}
  group_of, first = [], []
  shaped = [ShapeOnly(np.shape(x), x.dtype) for x in leaves]
  for b in range(spec.num_blocks):
    sig = tuple((x.shape, x.dtype.name) for x in gather_block(spec, shaped, b))
    if sig not in signatures:
      signatures[sig] = len(signatures)
      first.append(b)
    group_of.append(signatures[sig])
  return np.asarray(group_of, np.int32), first
