"""How the training steps see a model: a loss, or a model cut at its layers.

The steps need ``loss_fn(params, batch) -> scalar`` and nothing else. A model whose
layers are stacked (one parameter subtree with a leading layer axis, applied with a
scan) can also hand over its pieces as a :class:`LayeredLoss`; then the partial-backprop
step runs one program for every layer with a dynamic block index instead of
differentiating through the whole scan.

For Flax NNX models, :func:`split_nnx` takes a model apart into pure functions. The
model provides ``loss(batch)``; a stacked-layer model may also provide
``layered_loss()`` returning its :class:`LayeredLoss` (written against the parameter
state ``nnx.split(model, nnx.Param, ...)`` gives). The batch layout is the model's
business: the steps only pass the batch through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]

__all__ = [
    "LayeredLoss",
    "LayeredModel",
    "NnxParts",
    "split_nnx",
]


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
                        subtree(params, self.stack_path))
    return self.head_loss(params, h, batch)


@runtime_checkable
class LayeredModel(Protocol):
  """An NNX model that can hand over its stacked layers (see :func:`split_nnx`)."""

  def loss(self, batch: Batch) -> jax.Array:
    ...

  def layered_loss(self) -> LayeredLoss | None:
    ...


def subtree(params: PyTree, path: tuple) -> PyTree:
  """The subtree of ``params`` at ``path`` (a tuple of keys)."""
  for key in path:
    params = params[key]
  return params


class NnxParts(NamedTuple):
  """A Flax NNX model taken apart for the functional training steps.

  Attributes:
    graphdef: the model's graph definition.
    params: its ``nnx.Param`` state (what the optimizer updates).
    rest: all other state (kept constant by the step).
    loss_fn: ``(params, batch) -> model.loss(batch)``.
    layered: the model's :class:`LayeredLoss` (from ``model.layered_loss()``), or None.
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
  """Splits an NNX model into the pure functions the training steps take.

  The model provides ``loss(batch)``. When it also has ``layered_loss()`` (the
  :class:`LayeredModel` protocol) and that returns a :class:`LayeredLoss`, the parts
  carry it, for the stacked-layer program of :class:`~absign_jax.BlockTrainStep`.
  """
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = lambda p, batch: nnx.merge(graphdef, p, rest).loss(batch)
  layered = model.layered_loss() if hasattr(model, "layered_loss") else None
  if layered is not None and not isinstance(layered, LayeredLoss):
    raise TypeError(f"{type(model).__name__}.layered_loss() must return a LayeredLoss "
                    f"or None, got {type(layered).__name__}.")
  return NnxParts(graphdef, params, rest, loss_fn, layered)
