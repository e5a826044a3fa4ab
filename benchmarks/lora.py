"""LoRA on the Llama model as a baseline for ``step_time.py``.

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

import jax
from flax import nnx

# The adapters are the fine-tuning program's (``--optimizer lora``): one LoRA for both.
from absign_jax.llm.peers import ATTENTION, MLP, LoRALinear, LoRAParam, add_lora

__all__ = ["ATTENTION", "MLP", "LoRALinear", "LoRAParam", "add_lora", "lora_loss",
           "num_lora_params"]


def lora_loss(graphdef):
  """``loss_fn(lora, batch)`` with ``batch = {"data": ..., "base": base_state}``."""

  def loss_fn(lora, batch):
    return nnx.merge(graphdef, lora, batch["base"]).loss(batch["data"])

  return loss_fn


def num_lora_params(lora) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(lora))
