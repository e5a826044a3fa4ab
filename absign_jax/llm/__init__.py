"""LLM support for absign_jax: a Llama-family model, GGUF loading, tokenizer, data.

Submodules (imported lazily, so ``import absign_jax.llm`` needs neither
``gguf`` nor ``tokenizers``):

* :mod:`absign_jax.llm.model` -- :class:`Llama`, :class:`LlamaConfig`,
  ``PRESETS``, :func:`generate`, :func:`eval_loss` (jax/flax only).
* :mod:`absign_jax.llm.gguf` -- :func:`load_gguf`, :func:`save_gguf` (needs ``gguf``).
* :mod:`absign_jax.llm.hf` -- :func:`load_hf`, :func:`save_hf` (Hugging Face
  directories: config.json, safetensors, tokenizer files).
* :mod:`absign_jax.llm.export` -- :func:`load_model` (either form, by path) and
  :func:`export_model`.
* :mod:`absign_jax.llm.tokenizer` -- :class:`Tokenizer` (needs ``tokenizers``).
* :mod:`absign_jax.llm.data` -- offline datasets and resumable :class:`Batches`.

The common names are also available here, e.g. ``absign_jax.llm.load_gguf``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Llama": "model",
    "LlamaConfig": "model",
    "PRESETS": "model",
    "generate": "model",
    "eval_loss": "model",
    "convert_layout": "model",
    "load_gguf": "gguf",
    "save_gguf": "gguf",
    "load_hf": "hf",
    "save_hf": "hf",
    "load_model": "export",
    "export_model": "export",
    "default_gguf_path": "gguf",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "Batches": "data",
    "SequenceSet": "data",
    "load_dataset": "data",
    "second_text": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
