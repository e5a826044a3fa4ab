"""A minimal LoRA for the Llama model, as a baseline for ``step_time.py``.

Every attention and MLP projection ``y = x W`` becomes ``y = x W + (alpha / r) (x A) B``
with the base kernel ``W`` frozen and ``A`` ([in, r], small random) and ``B``
([r, out], zeros) trained. The adapter path is computed as two thin products (never
``W + A B``), so backprop costs what PEFT's LoRA costs: activation gradients through
every layer (full backprop through the frozen base), plus the adapters' own small
weight gradients, and no weight gradient of any base kernel.

Works on the list and the stacked (``scan_layers``) layouts: in the stacked one the
adapters get the same leading layer axis as the kernels.

    model = Llama(cfg, rngs=nnx.Rngs(0))
    add_lora(model, rank=8, rngs=nnx.Rngs(1))
    graphdef, lora, base = nnx.split(model, LoRAParam, ...)
    loss_fn = lora_loss(graphdef)          # loss_fn(lora, {"data": batch, "base": base})

The frozen base rides in the batch argument of the training step, so it is an input
of the compiled program (counted in its memory, never baked in as a constant).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

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
             targets: tuple[str, ...] = ATTENTION + MLP, rngs: nnx.Rngs):
  """Wraps the ``targets`` projections of every layer in :class:`LoRALinear` (in place).

  Returns the model.
  """
  for block in _blocks(model):
    for owner in (block.self_attn, block.mlp):
      for name in targets:
        if hasattr(owner, name):
          setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha, rngs))
  return model


def lora_loss(graphdef):
  """``loss_fn(lora, batch)`` with ``batch = {"data": ..., "base": base_state}``."""

  def loss_fn(lora, batch):
    return nnx.merge(graphdef, lora, batch["base"]).loss(batch["data"])

  return loss_fn


def num_lora_params(lora) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(lora))
