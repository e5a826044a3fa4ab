"""PyTorch reference rows for ``step_time.py``: the same model, weights and batches.

``transformers``' ``LlamaForCausalLM`` is built from the benchmark's
:class:`~absign_jax.llm.model.LlamaConfig` (``absign_jax.llm.hf.hf_config``) and loaded
with the JAX model's weights (``absign_jax.llm.weights.named_tensors`` mapped to
Hugging Face names by ``absign_jax.llm.hf.hf_tensor_name``), so both compute the same
function. Two steps:

* ``torch_adamw``: ``torch.optim.AdamW`` (same learning rate and weight decay as the
  JAX row), full backprop.
* ``torch_block_sign``: the one-layer sign step the PyTorch way: only the active
  layer's parameters have ``requires_grad``, so autograd stops below it, and
  ``p -= lr * sign(p.grad)``. It follows the block sequence it is given (the
  benchmark hands it absignsgd's).

Needs ``pip install torch==2.13.0 transformers`` (the ``bench`` extra);
:func:`available` says why not when they are missing.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from absign_jax.llm import hf as hf_lib
from absign_jax.llm import model as model_lib
from absign_jax.llm import weights


def available() -> str | None:
  """None when torch and transformers import, else the reason (with the fix)."""
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import transformers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return (f"skipped: {e.name} is not installed (pip install torch==2.13.0 "
            f"transformers, or the project's `bench` extra)")
  return None


def versions() -> dict[str, str]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads()}


def build(jax_model: model_lib.Llama, threads: int | None = None):
  """``LlamaForCausalLM`` in float32 with ``jax_model``'s weights, in train mode.

  ``threads``: ``torch.set_num_threads`` (default: the machine's core count, what
  XLA:CPU's thread pool uses too).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = jax_model.config
  if cfg.arch != "llama":
    raise ValueError(f"the PyTorch reference rows build LlamaForCausalLM; this model "
                     f"is {cfg.arch!r}.")
  torch.set_num_threads(threads or os.cpu_count() or 1)
  hcfg = hf_lib.hf_config(cfg, torch_dtype="float32")
  hcfg.pop("architectures", None)
  hcfg.pop("model_type", None)
  hcfg.pop("torch_dtype", None)
  config = transformers.LlamaConfig(**hcfg)
  with torch.device("cpu"):
    model = transformers.LlamaForCausalLM(config).float()
  state = {}
  for path, layer, x in weights.named_tensors(jax_model):
    if path[-1] == "sliding":
      continue
    x = np.asarray(x, np.float32)
    if path[-1] == "kernel":
      x = x.T
    state[hf_lib.hf_tensor_name(path, layer)] = torch.from_numpy(np.array(x, copy=True))
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
  if missing or unexpected:
    raise ValueError(f"weights do not map onto LlamaForCausalLM: missing {missing}, "
                     f"unexpected {unexpected}")
  if cfg.tie_embeddings:
    model.tie_weights()
  model.train()  # no dropout in Llama; train mode as a fine-tuning run has it
  return model


def torch_batch(batch: dict) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  return {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}


def loss_of(model, tb: dict):
  """Mean token cross-entropy weighted by the mask (what the JAX model's loss is)."""
  import torch  # pylint: disable=g-import-not-at-top
  logits = model(input_ids=tb["inputs"].long(), use_cache=False).logits
  nll = torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]).float(), tb["targets"].reshape(-1).long(),
      reduction="none")
  mask = tb["mask"].reshape(-1).float()
  return (nll * mask).sum() / mask.sum().clamp_min(1e-9)


def eval_loss(model, tb: dict) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return float(loss_of(model, tb))


class ForwardRunner:
  """The model's forward and loss only, under ``torch.no_grad`` (PyTorch's floor)."""

  def __init__(self, model, batch: dict):
    self.model, self.batch = model, torch_batch(batch)

  def __call__(self, block: int | None = None) -> tuple[float, Any]:
    import torch  # pylint: disable=g-import-not-at-top
    del block
    t = time.perf_counter()
    with torch.no_grad():
      float(loss_of(self.model, self.batch))
    return time.perf_counter() - t, None


class AdamWRunner:
  """One full AdamW step per call (``torch.optim.AdamW``, default implementation)."""

  def __init__(self, model, batch: dict, lr: float, weight_decay: float):
    import torch  # pylint: disable=g-import-not-at-top
    self.model, self.batch = model, torch_batch(batch)
    self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

  def __call__(self, block: int | None = None) -> tuple[float, Any]:
    del block
    t = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = loss_of(self.model, self.batch)
    loss.backward()
    self.opt.step()
    return time.perf_counter() - t, None

  def state_bytes(self) -> int:
    return sum(v.numel() * v.element_size() for s in self.opt.state.values()
               for v in s.values() if hasattr(v, "numel"))


class BlockSignRunner:
  """One-layer sign descent with partial backprop by ``requires_grad``.

  Only layer ``b``'s parameters require grad, so autograd builds no graph below
  it and computes no weight gradient elsewhere. ``block=None`` takes the next
  block from ``next_block()`` (the benchmark: absignsgd's last block).
  """

  def __init__(self, model, batch: dict, lr: float, next_block=None):
    self.model, self.batch, self.lr = model, torch_batch(batch), lr
    self.layers = list(model.model.layers)
    self.next_block = next_block
    for p in model.parameters():
      p.requires_grad_(False)
    self._active = None

  def _activate(self, b: int):
    if self._active == b:
      return
    if self._active is not None:
      for p in self.layers[self._active].parameters():
        p.requires_grad_(False)
    for p in self.layers[b].parameters():
      p.requires_grad_(True)
    self._active = b

  def __call__(self, block: int | None = None) -> tuple[float, int]:
    import torch  # pylint: disable=g-import-not-at-top
    b = block if block is not None else self.next_block()
    t = time.perf_counter()
    self._activate(b)
    loss = loss_of(self.model, self.batch)
    loss.backward()
    with torch.no_grad():
      for p in self.layers[b].parameters():
        p.sub_(self.lr * torch.sign(p.grad))
        p.grad = None
    return time.perf_counter() - t, b
