"""How the training steps see a model: a loss, or a model cut at its layers.

The steps need ``loss_fn(params, batch) -> scalar`` and nothing else. A model cut at
its layers hands over more: its pieces as pure functions of the parameter tree
(:class:`LayeredLoss`),

* ``embed(params, batch) -> h``: everything before the first layer,
* ``layer(layer_params, h) -> h``: one layer, given its parameters,
* ``head_loss(params, h, batch) -> loss``: everything after the last layer,
* ``stack_path``: where the layers live in ``params``: one subtree whose leaves carry
  a leading layer axis,
* optionally ``context(params, batch) -> ctx``: what every layer needs from the
  batch besides the hidden state (positions, an attention mask, segment ids of a
  packed or padded batch). The step computes it once per step, outside the layer
  loop, and calls ``layer(layer_params, h, ctx)``. It is a constant of the step: no
  gradient flows through it.

With those, :class:`~absign_jax.BlockTrainStep` runs one compiled program for every
layer with a dynamic block index, instead of one program per layer or the backward of
the whole stack. The batch layout is the model's business: the steps only pass the
batch through (and hand the layers the model's ``context`` of it).

Layers kept as a list or dict of identically structured subtrees (an ``nnx.List``,
linen's ``layers_0 .. layers_N``) are presented *stacked* for training: the adapters
stack them once (:class:`StackedLayers`) and convert back when asked
(:meth:`Cut.restore`, :meth:`NnxParts.merge`). The training program then indexes the
stack; it never copies all the weights per step.

Adapters, so that nobody writes the pure functions by hand:

* :func:`cut_nnx` -- a Flax NNX model: name its layers attribute (an ``nnx.List``, an
  ``nnx.Dict``, or one module stacked by ``nnx.vmap``/``nnx.scan``) and give embed and
  head as small functions of the model; or let the model describe itself through a
  ``layer_cut()`` method returning a :class:`LayerCut`.
* :func:`cut_linen` -- a linen module and its variables (an ``nn.scan`` stack or
  ``layers_0 .. layers_N``).
* :func:`cut` -- a parameter tree and pure functions (any JAX model).
* :func:`split_nnx` -- any NNX model: cut at its layers when it has ``layer_cut()``,
  else ``model.loss(batch)`` as the plain loss function (no :class:`LayeredLoss`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]

__all__ = [
    "Cut",
    "LayerCut",
    "LayeredLoss",
    "LayeredModel",
    "NnxParts",
    "StackedLayers",
    "cut",
    "cut_linen",
    "cut_nnx",
    "split_nnx",
]


class LayeredLoss(NamedTuple):
  """A model cut at its stacked layers, as pure functions of the parameter tree.

  Attributes:
    embed: ``(params, batch) -> h``, everything before the first layer.
    layer: ``(layer_params, h) -> h``, one layer given its slice of the stacked tree;
      ``(layer_params, h, ctx) -> h`` when ``context`` is given.
    head_loss: ``(params, h, batch) -> loss``, everything after the last layer.
    stack_path: keys from the root of ``params`` to the stacked layer subtree.
    context: ``(params, batch) -> ctx``, a pytree of arrays every layer reads
      (positions, attention masks, segment ids), or None when the layers need
      nothing but ``h``. Computed once per step; treated as a constant.
  """

  embed: Callable[[PyTree, Batch], jax.Array]
  layer: Callable[..., jax.Array]
  head_loss: Callable[[PyTree, jax.Array, Batch], jax.Array]
  stack_path: tuple
  context: Callable[[PyTree, Batch], Any] | None = None

  def batch_context(self, params: PyTree, batch: Batch) -> Any:
    """The layers' context of ``batch`` (None without ``context``); no gradient."""
    if self.context is None:
      return None
    return jax.tree.map(jax.lax.stop_gradient, self.context(params, batch))

  def apply_layer(self, layer_params: PyTree, h: jax.Array, ctx: Any = None) -> jax.Array:
    """One layer on ``h``, handed ``ctx`` when the model has a ``context``."""
    if self.context is None:
      return self.layer(layer_params, h)
    return self.layer(layer_params, h, ctx)

  def loss(self, params: PyTree, batch: Batch) -> jax.Array:
    """The full loss (all layers), as a plain loss function."""
    h = self.embed(params, batch)
    ctx = self.batch_context(params, batch)
    h, _ = jax.lax.scan(lambda h, w: (self.apply_layer(w, h, ctx), None), h,
                        subtree(params, self.stack_path))
    return self.head_loss(params, h, batch)


class LayerCut(NamedTuple):
  """Where an NNX model is cut, as functions of the model (see :func:`cut_nnx`).

  A model may return one from a ``layer_cut()`` method; then :func:`split_nnx` and
  :func:`cut_nnx` need no other arguments.

  Attributes:
    embed: ``(model, batch) -> h``.
    head_loss: ``(model, h, batch) -> loss``.
    layers: the attribute path of the layers (``"layers"``, ``"decoder.layers"``).
    layer: ``(layer_module, h) -> h``; None calls the layer: ``layer_module(h)``.
      With ``context``: ``(layer_module, h, ctx) -> h``, default
      ``layer_module(h, ctx)``.
    context: ``(model, batch) -> ctx``: what the layers need from the batch
      (positions, masks, segment ids), computed once per step outside the layer
      loop; None when the layers read ``h`` only.
  """

  embed: Callable[[Any, Batch], jax.Array]
  head_loss: Callable[[Any, jax.Array, Batch], jax.Array]
  layers: Any = "layers"
  layer: Callable[..., jax.Array] | None = None
  context: Callable[[Any, Batch], Any] | None = None


@runtime_checkable
class LayeredModel(Protocol):
  """An NNX model that describes where it is cut (see :func:`split_nnx`)."""

  def loss(self, batch: Batch) -> jax.Array:
    ...

  def layer_cut(self) -> LayerCut:
    ...


def subtree(params: PyTree, path: tuple) -> PyTree:
  """The subtree of ``params`` at ``path`` (a tuple of keys)."""
  for key in path:
    params = params[key]
  return params


# ---------------------------------------------------------------------------------
# Layers as a list, a dict, or a stack
# ---------------------------------------------------------------------------------


def _as_path(path) -> tuple:
  if isinstance(path, str):
    return tuple(int(k) if k.isdigit() else k for k in path.split(".") if k)
  return tuple(path)


def _natural_key(key) -> tuple:
  return tuple(int(t) if t.isdigit() else t
               for t in re.split(r"(\d+)", str(key)) if t)


def _raw(node):
  """``node`` without ``nnx.State``'s wrapper (a State nests plain dicts inside)."""
  raw = getattr(node, "raw_mapping", None)
  return _raw(raw) if raw is not None else node


def _items(node) -> dict:
  return dict(_raw(node).items())


def _rebuild(node, items: dict):
  """A mapping like ``node`` (dict, ``nnx.State``, ``FrozenDict``) holding ``items``."""
  items = {k: _raw(v) for k, v in items.items()}
  if isinstance(node, dict):
    return items
  return type(node)(items)


def _replace(tree, path: tuple, fn):
  """``tree`` with the subtree at ``path`` replaced by ``fn(subtree)``."""
  if not path:
    return fn(tree)
  key, rest = path[0], path[1:]
  if isinstance(tree, (list, tuple)):
    out = list(tree)
    out[key] = _replace(tree[key], rest, fn)
    return type(tree)(out)
  items = _items(tree)
  items[key] = _replace(items[key], rest, fn)
  return _rebuild(tree, items)


def _structure(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), np.dtype(getattr(x, "dtype", np.float32)))
                        for x in leaves)


class StackedLayers:
  """Converts a model's layers between their stored layout and the stacked one.

  The stored layout is found at ``path`` in the parameter tree:

  * ``"stacked"``: one subtree whose leaves share a leading layer axis (``nnx.vmap``,
    ``nnx.scan``, linen ``nn.scan``): nothing to convert;
  * ``"list"``: a list/tuple, or a mapping whose keys are the layer indices
    (``nnx.List`` state), of identically structured subtrees;
  * ``"dict"``: a mapping of named layers, run in ``order`` (default: natural order of
    the keys, ``layer2`` before ``layer10``);
  * ``"siblings"``: linen's ``layers_0 .. layers_N``, children of the parent of
    ``path`` named ``<name>_<i>``.

  :meth:`stack` copies list/dict layers into one stacked subtree at ``path`` (once,
  before training); :meth:`unstack` copies them back.

  Args:
    params: the parameter tree in its stored layout.
    path: keys (or a dotted string) from the root to the layers.
    order: for a dict of layers, the keys in the order the model applies them.
    layout: ``"stacked"``, ``"list"`` or ``"dict"`` to say how the layers at ``path``
      are kept; None guesses: a mapping of two or more identically structured
      subtrees is a dict of layers, else one whose leaves share a leading axis is a
      stack (say ``"stacked"`` for a stacked layer built of identical halves).
  """

  def __init__(self, params: PyTree, path, order: Sequence[Any] | None = None,
               layout: str | None = None):
    if layout not in (None, "stacked", "list", "dict"):
      raise ValueError(f"layout must be None, 'stacked', 'list' or 'dict', got "
                       f"{layout!r}.")
    self.path = _as_path(path)
    if not self.path:
      raise ValueError("the layers path is empty; name the layers, e.g. 'layers'.")
    parent = subtree(params, self.path[:-1]) if len(self.path) > 1 else params
    name = self.path[-1]
    self._template = None
    if isinstance(parent, Mapping) and name not in parent:
      pat = re.compile(rf"^{re.escape(str(name))}_(\d+)$")
      found = {int(m.group(1)): k for k in parent if (m := pat.match(str(k)))}
      if not found:
        raise ValueError(
            f"no layers at {'.'.join(map(str, self.path))}: the parent holds "
            f"{sorted(map(str, parent))[:12]}. Name the layers container (e.g. "
            f"layers='model.layers') or the common prefix of linen's layers_0 .. "
            f"layers_N (layers='layers').")
      if sorted(found) != list(range(len(found))):
        raise ValueError(f"{name}_<i> layers are not numbered 0..N-1: {sorted(found)}")
      self.layout, self.keys = "siblings", [found[i] for i in range(len(found))]
      layers = [parent[k] for k in self.keys]
    else:
      node = subtree(params, self.path)
      if isinstance(node, (list, tuple)):
        self.layout, self.keys = "list", list(range(len(node)))
        layers = list(node)
      elif isinstance(node, Mapping) and node and all(
          isinstance(k, (int, np.integer)) or str(k).isdigit() for k in node):
        self.keys = sorted(node, key=int)
        if [int(k) for k in self.keys] != list(range(len(self.keys))):
          raise ValueError(f"layer indices at {self.path} are not 0..N-1: "
                           f"{[int(k) for k in self.keys]}")
        self.layout, layers = "list", [node[k] for k in self.keys]
        self._template = node
      elif isinstance(node, Mapping) and layout != "stacked" and (
          layout == "dict" or self._is_stack(node) is None
          or (len(node) >= 2 and len({_structure(v) for v in node.values()}) == 1)):
        self.keys = (list(order) if order is not None
                     else sorted(node, key=_natural_key))
        if sorted(map(str, self.keys)) != sorted(map(str, node)):
          raise ValueError(f"order={list(order)} does not name the layers "
                           f"{sorted(map(str, node))} exactly once each.")
        self.layout, layers = "dict", [node[k] for k in self.keys]
        self._template = node
      else:
        n = self._is_stack(node)
        if n is None or layout in ("list", "dict"):
          raise ValueError(
              f"the layers at {'.'.join(map(str, self.path))} are neither a list or "
              f"dict of layers nor stacked (every leaf with the same leading axis).")
        self.layout, self.keys, layers = "stacked", None, None
        self.num_layers = n
    if layers is not None:
      if len(layers) < 1:
        raise ValueError(f"no layers at {self.path}.")
      first = _structure(layers[0])
      for k, layer in zip(self.keys, layers):
        if _structure(layer) != first:
          raise ValueError(
              f"layer {k!r} at {'.'.join(map(str, self.path))} differs in structure "
              f"from layer {self.keys[0]!r}: layers that run through one program "
              f"must have identical parameter trees (shapes and dtypes). Cut the "
              f"model at identical layers only, or train with the plain loss.")
      self.num_layers = len(layers)

  @staticmethod
  def _is_stack(node) -> int | None:
    leaves = jax.tree.leaves(node)
    leads = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if leaves and len(leads) == 1 and None not in leads:
      return int(leads.pop())
    return None

  @property
  def stack_path(self) -> tuple:
    """Where the stacked layers live in the training view of the parameters."""
    return self.path

  def stack(self, params: PyTree) -> PyTree:
    """``params`` with its layers stacked at :attr:`stack_path` (a copy of them)."""
    if self.layout == "stacked":
      return params
    if self.layout == "siblings":
      def fn(parent):
        items = {k: v for k, v in _items(parent).items() if k not in self.keys}
        items[self.path[-1]] = _stack([_raw(parent[k]) for k in self.keys])
        return _rebuild(parent, items)
      return _replace(params, self.path[:-1], fn)
    node = subtree(params, self.path)
    return _replace(params, self.path,
                    lambda _: _raw(_stack([_raw(node[k]) for k in self.keys])))

  def unstack(self, params: PyTree) -> PyTree:
    """The inverse of :meth:`stack`: ``params`` with the layers in their layout."""
    if self.layout == "stacked":
      return params
    stack = subtree(params, self.path)
    layers = [jax.tree.map(lambda x, i=i: _index(x, i), stack)
              for i in range(self.num_layers)]
    if self.layout == "siblings":
      def fn(parent):
        items = {k: v for k, v in _items(parent).items() if k != self.path[-1]}
        items.update(zip(self.keys, layers))
        return _rebuild(parent, items)
      return _replace(params, self.path[:-1], fn)
    layers = [_raw(x) for x in layers]
    if self.layout == "list" and self._template is None:
      return _replace(params, self.path, lambda node: type(node)(layers))
    return _replace(params, self.path,
                    lambda _: _rebuild(_raw(self._template), dict(zip(self.keys, layers))))


def _stack(layers: list) -> PyTree:
  def stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape)
      return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    return jnp.stack(xs)
  return jax.tree.map(stack, *layers)


def _index(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


# ---------------------------------------------------------------------------------
# A model cut at its layers
# ---------------------------------------------------------------------------------


class Cut(NamedTuple):
  """A model cut at its layers, ready for the training steps.

  Attributes:
    params: the parameters as the steps train them (layers stacked).
    loss_fn: ``(params, batch) -> loss``: the whole model on :attr:`params`.
    layered: the :class:`LayeredLoss` for :class:`~absign_jax.BlockTrainStep`.
    layers: the :class:`StackedLayers` conversion.
  """

  params: PyTree
  loss_fn: LossFn
  layered: LayeredLoss
  layers: StackedLayers

  def restore(self, params: PyTree) -> PyTree:
    """Trained ``params`` back in the model's own layout (layers unstacked)."""
    return self.layers.unstack(params)


def cut(params: PyTree, *, embed: Callable[[PyTree, Batch], jax.Array],
        layer: Callable[..., jax.Array],
        head_loss: Callable[[PyTree, jax.Array, Batch], jax.Array],
        layers="layers", order: Sequence[Any] | None = None,
        layout: str | None = None,
        context: Callable[[PyTree, Batch], Any] | None = None) -> Cut:
  """Cuts a model given as a parameter tree and pure functions.

  Args:
    params: the parameters, layers in any layout :class:`StackedLayers` reads.
    embed: ``(params, batch) -> h``; must not read the layers.
    layer: ``(layer_params, h) -> h`` for one layer's subtree.
    head_loss: ``(params, h, batch) -> loss``; must not read the layers.
    layers: path (keys, or a dotted string) to the layers in ``params``.
    order: for a dict of layers, the keys in the order the model applies them.
    layout: how the layers are kept, when the guess is wrong (see
      :class:`StackedLayers`).
    context: ``(params, batch) -> ctx`` for layers that read more of the batch
      than ``h`` (then ``layer`` is ``(layer_params, h, ctx) -> h``).

  Returns:
    A :class:`Cut` whose ``params`` hold the layers stacked; ``restore`` undoes it.

  Examples:
    >>> import jax.numpy as jnp, absign_jax
    >>> params = {"layers": [{"w": jnp.full((2, 2), 0.5)} for _ in range(3)]}
    >>> c = absign_jax.cut(params, embed=lambda p, x: x,
    ...                    layer=lambda w, h: h @ w["w"],
    ...                    head_loss=lambda p, h, x: jnp.sum(h))
    >>> c.params["layers"]["w"].shape, float(c.loss_fn(c.params, jnp.ones(2)))
    ((3, 2, 2), 2.0)
  """
  for name, fn in (("embed", embed), ("layer", layer), ("head_loss", head_loss)):
    if not callable(fn):
      raise TypeError(f"cut: {name} must be a function, got {type(fn).__name__}.")
  if context is not None and not callable(context):
    raise TypeError(f"cut: context must be a function (params, batch) -> ctx, got "
                    f"{type(context).__name__}.")
  lay = StackedLayers(params, layers, order, layout)
  layered = LayeredLoss(embed, layer, head_loss, lay.stack_path, context)
  return Cut(lay.stack(params), layered.loss, layered, lay)


# ---------------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------------


class NnxParts(NamedTuple):
  """A Flax NNX model taken apart for the functional training steps.

  Attributes:
    graphdef: the model's graph definition.
    params: its ``nnx.Param`` state (what the optimizer updates); for a model cut at
      list/dict layers, with the layers stacked.
    rest: all other state (kept constant by the step).
    loss_fn: ``(params, batch) -> loss``.
    layered: the model's :class:`LayeredLoss`, or None.
    layers: the :class:`StackedLayers` conversion of a cut model, or None.
  """

  graphdef: Any
  params: Any
  rest: Any
  loss_fn: LossFn
  layered: LayeredLoss | None
  layers: StackedLayers | None = None

  def model_params(self, params) -> Any:
    """``params`` in the model's own layout (list/dict layers unstacked)."""
    return params if self.layers is None else self.layers.unstack(params)

  def merge(self, params) -> Any:
    """The model with ``params`` put back (e.g. after training)."""
    from flax import nnx
    return nnx.merge(self.graphdef, self.model_params(params), self.rest)


def _attr(obj, path: tuple):
  for key in path:
    obj = obj[key] if isinstance(key, int) or not hasattr(obj, str(key)) else getattr(
        obj, key)
  return obj


def cut_nnx(model, *, embed: Callable[[Any, Batch], jax.Array] | None = None,
            head_loss: Callable[[Any, jax.Array, Batch], jax.Array] | None = None,
            layers="layers", layer: Callable[..., jax.Array] | None = None,
            order: Sequence[Any] | None = None,
            context: Callable[[Any, Batch], Any] | None = None) -> NnxParts:
  """Cuts a Flax NNX model at its layers for the one-program training step.

  Args:
    model: the model. Its layers (at ``layers``) are an ``nnx.List`` / list or an
      ``nnx.Dict`` of modules with identical structure, or one module whose
      parameters carry a leading layer axis (built with ``nnx.vmap``/``nnx.scan``).
      Layers may hold only ``nnx.Param`` state (read per-layer constants through
      ``jax.lax.stop_gradient`` of a ``Param``).
    embed: ``(model, batch) -> h``, the part before the first layer.
    head_loss: ``(model, h, batch) -> loss``, the part after the last layer.
    layers: attribute path of the layers (``"layers"``, ``"decoder.layers"``).
    layer: ``(layer_module, h) -> h``; default ``layer_module(h)``. With
      ``context``: ``(layer_module, h, ctx) -> h``, default ``layer_module(h, ctx)``.
    order: for a dict of layers, the keys in the order the model applies them
      (default: natural key order).
    context: ``(model, batch) -> ctx``: what the layers need from the batch besides
      ``h`` (positions, attention masks, segment ids of a padded or packed batch),
      computed once per step outside the layer loop and handed to every layer.

  Without ``embed`` and ``head_loss``, the model's ``layer_cut()`` (a
  :class:`LayerCut`) supplies all five.

  Returns:
    :class:`NnxParts` whose ``params`` hold the layers stacked (list/dict layers are
    stacked once, here), ``layered`` the pieces, ``loss_fn`` the whole model on the
    stacked parameters (a stacked model's ``loss(batch)`` method where it has one,
    else embed, a scan of the layers and head); ``parts.merge(params)`` returns the
    model in its own layout.

  Examples:
    >>> parts = absign_jax.cut_nnx(                                  # doctest: +SKIP
    ...     model, layers="blocks",
    ...     embed=lambda m, batch: m.embed(batch["inputs"]),
    ...     head_loss=lambda m, h, batch: m.loss_from_hidden(h, batch["targets"]))
    >>> step = absign_jax.BlockTrainStep(parts.loss_fn, tx,        # doctest: +SKIP
    ...                                  layered=parts.layered)
  """
  from flax import nnx

  if embed is None and head_loss is None:
    if not hasattr(model, "layer_cut"):
      raise TypeError(
          f"cut_nnx: give embed=(model, batch) -> h and head_loss=(model, h, batch) "
          f"-> loss, or define {type(model).__name__}.layer_cut() returning a "
          f"LayerCut.")
    spec = model.layer_cut()
    if not isinstance(spec, LayerCut):
      raise TypeError(f"{type(model).__name__}.layer_cut() must return a LayerCut, "
                      f"got {type(spec).__name__}.")
    embed, head_loss, layers, layer, context = spec
  elif embed is None or head_loss is None:
    raise TypeError("cut_nnx: give both embed and head_loss (or neither, with the "
                    "model's layer_cut()).")
  path = _as_path(layers)
  try:
    container = _attr(model, path)
  except (AttributeError, KeyError, IndexError, TypeError) as e:
    raise ValueError(f"cut_nnx: {type(model).__name__} has no layers at "
                     f"{'.'.join(map(str, path))!r} ({e}); pass layers='<attribute>'.") from e
  if context is not None and not callable(context):
    raise TypeError(f"cut_nnx: context must be a function (model, batch) -> ctx, got "
                    f"{type(context).__name__}.")
  if layer is not None:
    call = layer
  elif context is None:
    call = lambda module, h: module(h)
  else:
    call = lambda module, h, ctx: module(h, ctx)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if isinstance(container, (nnx.List, list, tuple)):
    layout = "list"
  elif isinstance(container, (nnx.Dict, dict)):
    layout = "dict"
  elif isinstance(container, nnx.Module):
    layout = "stacked"
  else:
    raise ValueError(f"cut_nnx: the layers at {'.'.join(map(str, path))!r} are a "
                     f"{type(container).__name__}; expected an nnx.List, an nnx.Dict "
                     f"or one module stacked by nnx.vmap/nnx.scan.")
  lay = StackedLayers(params, path, order, layout)
  if lay.layout == "stacked":
    layer_graphdef, _, layer_rest = nnx.split(container, nnx.Param, ...)
  else:
    modules = ([container[k] for k in lay.keys] if lay.layout == "dict"
               else [container[k] for k in range(lay.num_layers)])
    splits = [nnx.split(m, nnx.Param, ...) for m in modules]
    layer_graphdef, _, layer_rest = splits[0]
    for k, (gd, _, _) in zip(lay.keys, splits):
      if gd != layer_graphdef:
        raise ValueError(f"cut_nnx: layer {k!r} is not built like layer "
                         f"{lay.keys[0]!r} (different module graph): one program "
                         f"needs identical layers.")
  if jax.tree.leaves(layer_rest):
    raise ValueError(
        f"cut_nnx: the layers hold non-Param state ({nnx.State(layer_rest)}); the "
        f"training step passes each layer its parameters only. Make per-layer "
        f"constants nnx.Param (read through jax.lax.stop_gradient) or train with "
        f"split_nnx's plain loss.")

  def merge(p):
    return nnx.merge(graphdef, lay.unstack(p), rest)

  layered = LayeredLoss(
      embed=lambda p, batch: embed(merge(p), batch),
      layer=lambda w, h, *ctx: call(nnx.merge(layer_graphdef, w, layer_rest), h, *ctx),
      head_loss=lambda p, h, batch: head_loss(merge(p), h, batch),
      stack_path=lay.stack_path,
      context=None if context is None else (
          lambda p, batch: context(merge(p), batch)))
  # A stacked model's own loss when it has one (it may remat, chunk, ...). Over
  # list/dict layers stacked here, the scan: the model's loss would slice every
  # layer out of the stack, and full backprop through the slices holds a
  # stack-sized gradient per layer (15.4 GB against 3.1 GB for AdamW on the
  # 135M-parameter Llama).
  own = callable(getattr(model, "loss", None)) and lay.layout == "stacked"
  loss_fn = (lambda p, batch: merge(p).loss(batch)) if own else layered.loss
  return NnxParts(graphdef, lay.stack(params), rest, loss_fn, layered,
                  None if lay.layout == "stacked" else lay)


def split_nnx(model) -> NnxParts:
  """Splits an NNX model into the pure functions the training steps take.

  A model with ``layer_cut()`` (a :class:`LayerCut`, see :class:`LayeredModel`) is
  cut there (see :func:`cut_nnx`: list layers are stacked for training, and the
  parts carry the :class:`LayeredLoss` of the one-program step). Any other model
  provides ``loss(batch)``: the parts hold its plain loss function and
  ``layered=None`` (the steps then run a program per block); to cut such a model,
  call :func:`cut_nnx` with its pieces.
  """
  from flax import nnx

  if hasattr(model, "layer_cut"):
    return cut_nnx(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = lambda p, batch: nnx.merge(graphdef, p, rest).loss(batch)
  return NnxParts(graphdef, params, rest, loss_fn, None)


# ---------------------------------------------------------------------------------
# Flax linen
# ---------------------------------------------------------------------------------


def cut_linen(module, variables: Mapping, *,
              embed: Callable[..., jax.Array], head_loss: Callable[..., jax.Array],
              layer, layers="layers", order: Sequence[Any] | None = None,
              layout: str | None = None,
              context: Callable[..., Any] | None = None) -> Cut:
  """Cuts a linen module at its layers for the one-program training step.

  Args:
    module: the (unbound) linen module; ``embed`` and ``head_loss`` run as its
      methods, so the submodules they use must be defined in ``setup``.
    variables: its variables (``{"params": ...}`` plus any constant collections).
    embed: ``(module, batch) -> h``, run with ``module.apply(..., method=embed)``.
    head_loss: ``(module, h, batch) -> loss``, likewise.
    layer: one layer: an unbound linen module applied as ``layer.apply({"params":
      w}, h)`` (a tuple output, as an ``nn.scan`` body returns, gives its first
      element), or a function ``(w, h) -> h``.
    layers: path in ``variables["params"]`` to the layers: an ``nn.scan`` stack, a
      list/dict, or the prefix of ``layers_0 .. layers_N``.
    order: for a dict of layers, the keys in the order the model applies them.
    layout: how the layers are kept, when the guess is wrong (see
      :class:`StackedLayers`).
    context: ``(module, batch) -> ctx``, run like ``embed``, for layers that read
      more of the batch than ``h``: the layer is then applied as
      ``layer.apply({"params": w}, h, ctx)`` (a function: ``(w, h, ctx) -> h``).

  Returns:
    A :class:`Cut` over ``variables["params"]`` with the layers stacked; ``restore``
    gives the ``params`` collection back in the module's layout.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("cut_linen: variables must be the module's variables, a mapping "
                    "with a 'params' collection (module.init(...)).")
  consts = {k: v for k, v in variables.items() if k != "params"}
  params = variables["params"]
  lay = StackedLayers(params, layers, order, layout)
  path = lay.stack_path

  def without_layers(p):
    # embed/head never read the layers; dropping them keeps the trace small.
    parent = subtree(p, path[:-1]) if len(path) > 1 else p
    return _replace(p, path[:-1], lambda node: _rebuild(
        node, {k: v for k, v in _items(node).items() if k != path[-1]})
    ) if path[-1] in parent else p

  if callable(getattr(layer, "apply", None)):
    def apply_layer(w, h, *ctx):
      out = layer.apply({"params": w}, h, *ctx)
      return out[0] if isinstance(out, tuple) else out
  elif callable(layer):
    apply_layer = layer
  else:
    raise TypeError(f"cut_linen: layer must be a linen module or a function (w, h) -> "
                    f"h, got {type(layer).__name__}.")

  def run(method, p, *args):
    return module.apply({"params": without_layers(p), **consts}, *args, method=method)

  if context is not None and not callable(context):
    raise TypeError(f"cut_linen: context must be a function (module, batch) -> ctx, "
                    f"got {type(context).__name__}.")
  layered = LayeredLoss(
      embed=lambda p, batch: run(embed, p, batch),
      layer=apply_layer,
      head_loss=lambda p, h, batch: run(head_loss, p, h, batch),
      stack_path=path,
      context=None if context is None else (
          lambda p, batch: run(context, p, batch)))
  return Cut(lay.stack(params), layered.loss, layered, lay)
