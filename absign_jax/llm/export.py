"""Bring your own model: export it as a Hugging Face directory or a GGUF file.

* :func:`export_model` writes ``<out>/hf/`` (config.json, safetensors with the
  Hugging Face names, tokenizer.json, tokenizer_config.json with the chat
  template) or ``<out>/model.gguf`` (llama.cpp's names and metadata, the
  tokenizer copied).
* ``python -m absign_jax.llm export --model PATH --to hf|gguf --out DIR``
  converts without training (:func:`main`); ``PATH`` may also be a run of the
  fine-tuning program (its ``--out`` directory): its newest checkpoint is exported.

An export is written next to its target and moved into place, replacing an earlier
export whole; an interrupted one leaves the earlier export as it was. Loading (GGUF or
Hugging Face, by path) is :mod:`absign_jax.llm.loading`; its :func:`load_model` and
:func:`read_config_and_tokenizer` are also importable from here.
"""

from __future__ import annotations

import os
import sys

from absign_jax.llm import checks
from absign_jax.llm import gguf as gguf_lib
from absign_jax.llm import hf as hf_lib
from absign_jax.llm import runs
from absign_jax.llm.loading import is_run_directory, load_model, read_config_and_tokenizer
from absign_jax.llm.model import Llama
from absign_jax.llm.tokenizer import Tokenizer

__all__ = ["load_model", "read_config_and_tokenizer", "export_model", "export_target",
           "check_export_target", "is_run_directory", "main", "EXPORT_FORMATS",
           "EXPORT_DTYPES"]

EXPORT_FORMATS = ("hf", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
PROG = "python -m absign_jax.llm export"


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
        _, model, tokenizer = runs.load_run(args.model, args.step)
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
