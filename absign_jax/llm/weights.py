"""Weights of a :class:`~absign_jax.llm.model.Llama`, tensor by tensor, in either layout.

* :func:`named_tensors` -- every parameter as ``(path inside a layer, layer, array)``,
  the same sequence for the list and the stacked layout: what checkpoint writers
  (:mod:`absign_jax.llm.hf`, :mod:`absign_jax.llm.gguf`) name tensors by.
* :func:`model_from_arrays` -- the inverse: a model built one checkpoint tensor at a
  time, each converted and placed on its device before the next is read.
* :func:`convert_layout` -- a list-layout model as a stacked one, or back.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from absign_jax.llm.model import Llama, LlamaConfig, layer_flags

__all__ = ["named_tensors", "model_from_arrays", "convert_layout"]


def named_tensors(model: Llama) -> Iterable[tuple[tuple, int | None, Any]]:
  """Every parameter of ``model`` as ``(path, layer, array)``, whatever the layout.

  ``path`` is the key path inside a layer (``("self_attn", "q_proj", "kernel")``) for
  layer tensors, with ``layer`` its index, and the key path from the root with
  ``layer=None`` for the others: what checkpoint writers name tensors by. Stacked
  layers are sliced, so both layouts give the same sequence.
  """
  pure = nnx.to_pure_dict(nnx.state(model))
  n_layers = model.config.n_layers
  for kpath, x in jax.tree_util.tree_leaves_with_path(pure):
    p = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kpath)
    if p[0] != "layers":
      yield p, None, x
    elif model.config.scan_layers:
      for i in range(n_layers):
        yield p[1:], i, np.asarray(x[i])
    else:
      yield p[2:], int(p[1]), x


def model_from_arrays(
    cfg: LlamaConfig,
    get: Callable[[tuple[str, ...], int | None, tuple[int, ...]], np.ndarray],
    *,
    sharding: Any = None,
) -> Llama:
  """Builds a :class:`Llama` from a checkpoint, one tensor at a time.

  Args:
    cfg: The model's config (its ``dtype`` and ``scan_layers`` apply).
    get: ``get(path, layer, shape)`` returns the parameter at ``path`` (inside
      a block when ``layer`` is an int, e.g. ``("self_attn", "q_proj",
      "kernel")``; else a top-level path such as ``("norm", "scale")``) as a
      NumPy array (a memory-mapped view is fine) of the expected ``shape``; it
      raises when the checkpoint disagrees. ``self_attn.sliding`` flags are not
      asked for: they follow from ``cfg.layer_types``.
    sharding: A ``jax.sharding.Sharding`` for every parameter, or a callable
      ``path -> Sharding`` (paths as in ``nnx.to_pure_dict``); ``None`` puts
      them on the default device.

  Returns:
    The model. Each parameter is converted to ``cfg.dtype`` and moved to its
    device before the next is read, so host memory holds one tensor (one
    stacked leaf in the stacked layout) beyond the model itself.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flags = np.asarray(layer_flags(cfg)) if cfg.mixed_attention else None

  def put(path, x):
    target = sharding(path) if callable(sharding) else sharding
    return jax.device_put(x, target) if target is not None else jnp.asarray(x)

  def leaf(kpath, spec):
    path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kpath)
    dtype = np.dtype(spec.dtype)
    if path[0] != "layers":
      x = np.asarray(get(path, None, tuple(spec.shape)), dtype)
    elif cfg.scan_layers:
      inner = path[1:]
      if inner == ("self_attn", "sliding"):
        x = flags.astype(dtype)
      else:
        x = np.empty(spec.shape, dtype)
        for i in range(cfg.n_layers):
          x[i] = get(inner, i, tuple(spec.shape[1:]))
    else:
      i, inner = int(path[1]), path[2:]
      if inner == ("self_attn", "sliding"):
        x = flags[i].astype(dtype)
      else:
        x = np.asarray(get(inner, i, tuple(spec.shape)), dtype)
    return put(path, x)

  pure = nnx.to_pure_dict(state)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(leaf, pure))
  return nnx.merge(graphdef, state)


def convert_layout(model: Llama, scan_layers: bool) -> Llama:
  """Returns ``model`` with its layers in the list or the stacked layout.

  The weights are copied (stacked or sliced); other parameters are shared.
  Returns ``model`` itself when it already has the requested layout.
  """
  if model.stacked == scan_layers:
    return model
  cfg = model.config.replace(scan_layers=scan_layers)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(nnx.state(model))
  layers = pure["layers"]
  if scan_layers:
    pure["layers"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[layers[i] for i in range(cfg.n_layers)]
    )
  else:
    pure["layers"] = {
        i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.n_layers)
    }
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
