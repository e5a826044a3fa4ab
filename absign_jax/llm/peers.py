"""The memory-efficient peers of ABSignSGD for the fine-tuning program: LoRA and GaLore.

Both train with the ordinary full-backprop step (:class:`absign_jax.FullTrainStep`)
on a *part* of the model's state while the rest stays frozen. The frozen part rides
in the step's batch argument (``{"data": batch, "frozen": state}``), so it is an
input of the compiled program, counted in its memory like everyone's parameters,
never baked in as a constant, and gets no weight gradient.

* LoRA (:func:`lora_parts`): every targeted projection ``y = x W`` of every layer
  becomes ``y = x W + (alpha / r) (x A) B`` with ``W`` frozen, ``A`` ([in, r],
  Gaussian with variance ``1 / in``) and ``B`` ([r, out], zeros) trained. The
  adapter path is two thin products (never ``W + A B``): backprop runs through
  every layer for the activations, with no weight gradient of any base kernel. On
  the stacked layout the adapters carry the same leading layer axis as the kernels.
* GaLore (:func:`galore`, with :func:`layer_parts`): ``optax.contrib.galore``
  (Adam on gradients projected to rank ``r`` by an SVD refreshed every
  ``update_proj_gap`` steps) on the transformer layers; embedding and final norm are
  frozen, as for the block methods. ``optax.contrib.galore`` projects whole 2-D
  leaves and has no batch axis, so :func:`per_layer` runs it per layer of the
  stacked leaves (a scan): one projection per layer and matrix.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = [
    "ATTENTION",
    "MLP",
    "LoRAParam",
    "LoRALinear",
    "add_lora",
    "fold_lora",
    "PartialParts",
    "lora_parts",
    "layer_parts",
    "per_layer",
    "galore",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Variable):
  """A trainable adapter weight (not an ``nnx.Param``: filters tell them apart)."""


class LoRALinear(nnx.Module):
  """``x W + (alpha / r) (x A) B`` with ``W`` the wrapped linear layer's kernel.

  The kernel keeps its attribute name (``kernel``), so parameter paths of the base
  model are unchanged.
  """

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, rngs: nnx.Rngs):
    if getattr(base, "bias", None) is not None:
      raise ValueError("LoRALinear: a linear layer with a bias is not supported.")
    self.kernel = base.kernel
    shape = self.kernel[...].shape  # [..., in, out]; leading axes: stacked layers
    lead, din, dout = shape[:-2], shape[-2], shape[-1]
    dtype = self.kernel[...].dtype
    a = jax.random.normal(rngs.params(), (*lead, din, rank), jnp.float32)
    self.lora_a = LoRAParam((a / math.sqrt(din)).astype(dtype))
    self.lora_b = LoRAParam(jnp.zeros((*lead, rank, dout), dtype))
    self.scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...]
    x = x.astype(w.dtype)
    y = x @ w
    return y + ((x @ self.lora_a[...]) @ self.lora_b[...]) * jnp.asarray(self.scale,
                                                                        w.dtype)


def _blocks(model):
  return [model.layers] if getattr(model, "stacked", False) else list(model.layers)


def add_lora(model, *, rank: int = 8, alpha: float = 16.0,
             targets: Sequence[str] = ATTENTION + MLP, rngs: nnx.Rngs):
  """Wraps the ``targets`` projections of every layer in :class:`LoRALinear` (in place).

  Returns the model.

  Raises:
    ValueError: a bad rank, or a target no layer has.
  """
  if int(rank) < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  unknown = [t for t in targets if t not in ATTENTION + MLP]
  if unknown or not targets:
    raise ValueError(f"LoRA targets {list(unknown) or '(none)'}: choose from "
                     f"{', '.join(ATTENTION + MLP)}")
  for block in _blocks(model):
    for owner in (block.self_attn, block.mlp):
      for name in targets:
        if hasattr(owner, name):
          setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha, rngs))
  return model


def fold_lora(model):
  """Folds every LoRA adapter into its kernel, in place: ``W + (alpha / r) A B``.

  The sum is taken in float32 and rounded once to the kernel's dtype. The model is
  its base architecture again (plain linear layers, the base parameter paths): what
  the checkpoint writers export and other runtimes load. A model without adapters
  comes back unchanged.

  Returns:
    The model.
  """
  for block in _blocks(model):
    for owner in (block.self_attn, block.mlp):
      for name in ATTENTION + MLP:
        lora = getattr(owner, name, None)
        if not isinstance(lora, LoRALinear):
          continue
        w = lora.kernel[...]
        delta = (lora.lora_a[...].astype(jnp.float32)
                 @ lora.lora_b[...].astype(jnp.float32)) * lora.scale
        linear = nnx.Linear(w.shape[-2], w.shape[-1], use_bias=False, dtype=w.dtype,
                            param_dtype=w.dtype, kernel_init=nnx.initializers.zeros,
                            rngs=nnx.Rngs(0))
        linear.kernel = nnx.Param((w.astype(jnp.float32) + delta).astype(w.dtype))
        setattr(owner, name, linear)
  return model


class PartialParts(NamedTuple):
  """A model split into a trained part and a frozen part that rides in the batch.

  Attributes:
    graphdef: the model's graph definition.
    params: the trained state (what the optimizer sees).
    frozen: the frozen state (passed to the step inside the batch).
    rest: any other state (constant).
    loss_fn: ``(params, {"data": batch, "frozen": frozen}) -> loss``.
  """

  graphdef: Any
  params: Any
  frozen: Any
  rest: Any
  loss_fn: Callable[[Any, Any], jax.Array]

  layered = None  # no partial-backprop protocol: trained with the full step

  def merge(self, params) -> Any:
    """The model with ``params`` (and the frozen state) put back."""
    return nnx.merge(self.graphdef, params, self.frozen, self.rest)

  def wrap(self, batch) -> dict[str, Any]:
    """The step's batch argument for a data batch."""
    return {"data": batch, "frozen": self.frozen}


def _partial_parts(model, trained, frozen) -> PartialParts:
  graphdef, params, frozen_state, rest = nnx.split(model, trained, frozen, ...)

  def loss_fn(params, batch):
    return nnx.merge(graphdef, params, batch["frozen"], rest).loss(batch["data"])

  return PartialParts(graphdef, params, frozen_state, rest, loss_fn)


def lora_parts(model, *, rank: int = 8, alpha: float = 16.0,
               targets: Sequence[str] = ATTENTION + MLP, seed: int = 0) -> PartialParts:
  """Adds LoRA adapters to ``model`` (in place) and splits it: adapters trained."""
  add_lora(model, rank=rank, alpha=alpha, targets=tuple(targets), rngs=nnx.Rngs(seed))
  return _partial_parts(model, LoRAParam, nnx.Param)


def layer_parts(model) -> PartialParts:
  """Splits ``model``: the transformer layers' parameters trained, the rest frozen."""
  in_layers = nnx.All(nnx.Param, nnx.PathContains("layers"))
  return _partial_parts(model, in_layers, nnx.Param)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies ``inner`` to each layer's slice of stacked (leading layer axis) leaves.

  Every leaf must have the same leading axis. The state is ``inner``'s state of one
  layer stacked along that axis, and the update is a ``lax.scan`` over the layers
  (one compiled body, whatever the depth), so per-matrix transforms act on each
  layer's own matrices and a ``lax.cond`` inside ``inner`` stays a branch.
  """

  def check(tree):
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0] if leaves and leaves[0].ndim else None
    if n is None or any(x.ndim == 0 or x.shape[0] != n for x in leaves):
      raise ValueError("per_layer: every leaf needs the same leading (layer) axis")

  def init(params):
    check(params)
    return jax.vmap(inner.init)(params)

  def update(updates, state, params=None):
    check(updates)

    def body(_, xs):
      g, s, p = xs
      u, s = inner.update(g, s, p)
      return None, (u, s)

    _, (updates, state) = jax.lax.scan(body, None, (updates, state, params))
    return updates, state

  return optax.GradientTransformation(init, update)


def galore(learning_rate, *, rank: int = 128, update_proj_gap: int = 200,
           scale: float = 0.25, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """``optax.contrib.galore`` per layer of the stacked layers (see :func:`per_layer`).

  Args:
    learning_rate: Peak step size (a float or an injected hyperparameter).
    rank: Projection rank (capped at each matrix's smaller side).
    update_proj_gap: Steps between SVD refreshes of the projections.
    scale: GaLore's alpha: the projected-back update is multiplied by it.
    weight_decay: Decoupled weight decay.
  """
  if int(rank) < 1 or int(update_proj_gap) < 1:
    raise ValueError(f"GaLore rank and update_proj_gap must be >= 1, got {rank}, "
                     f"{update_proj_gap}")
  return optax.chain(
      per_layer(optax.contrib.scale_by_galore(rank=int(rank),
                                              update_proj_gap=int(update_proj_gap),
                                              scale=scale)),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
