"""LLM support for absign_jax: a Llama-family model, GGUF loading, tokenizer, data.

Submodules (imported lazily, so ``import absign_jax.llm`` needs neither
``gguf`` nor ``tokenizers``):

* :mod:`absign_jax.llm.model` -- :class:`Llama`, :class:`LlamaConfig`,
  ``PRESETS``, :func:`eval_loss` (jax/flax only).
* :mod:`absign_jax.llm.generate` -- :func:`generate`, :func:`generate_batch`,
  :func:`chat` (key/value-cache decoding).
* :mod:`absign_jax.llm.weights` -- the weights tensor by tensor
  (:func:`named_tensors`, :func:`model_from_arrays`) and :func:`convert_layout`.
* :mod:`absign_jax.llm.families` -- one module per supported model family: its
  checkpoint names, config mapping, flags and tokenizer quirks.
* :mod:`absign_jax.llm.gguf` -- :func:`load_gguf`, :func:`save_gguf` (needs ``gguf``).
* :mod:`absign_jax.llm.hf` -- :func:`load_hf`, :func:`save_hf` (Hugging Face
  directories: config.json, safetensors, tokenizer files).
* :mod:`absign_jax.llm.loading` -- :func:`load_model` (either form, by path).
* :mod:`absign_jax.llm.export` -- :func:`export_model` (either form).
* :mod:`absign_jax.llm.tokenizer` -- :class:`Tokenizer` (needs ``tokenizers``).
* :mod:`absign_jax.llm.data` -- offline datasets and resumable :class:`Batches`.
* The fine-tuning program (``python -m absign_jax.llm``):
  :mod:`~absign_jax.llm.finetune` (the training loop), :mod:`~absign_jax.llm.config`
  (its options, :class:`RunConfig`), :mod:`~absign_jax.llm.registry` (its
  optimizers), :mod:`~absign_jax.llm.runs` (a run's records, checkpoints and
  resume), :mod:`~absign_jax.llm.evaluation` and :mod:`~absign_jax.llm.summary`
  (what it measures and writes).

The common names are also available here, e.g. ``absign_jax.llm.load_gguf``
(``absign_jax.llm.generate`` is the module: call ``generate.generate``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Llama": "model",
    "LlamaConfig": "model",
    "PRESETS": "model",
    "eval_loss": "model",
    "convert_layout": "weights",
    "load_gguf": "gguf",
    "save_gguf": "gguf",
    "load_hf": "hf",
    "save_hf": "hf",
    "load_model": "loading",
    "export_model": "export",
    "default_gguf_path": "gguf",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "Batches": "data",
    "SequenceSet": "data",
    "load_dataset": "data",
    "second_text": "data",
    "RunConfig": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
