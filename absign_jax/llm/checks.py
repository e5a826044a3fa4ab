"""How the fine-tuning program fails: checks made before it spends time, one-line errors.

* :class:`UsageError`: the command line, or a file it names, cannot be used. The
  program prints its message and exits with status 2 (argparse's usage status).
* :data:`EXPECTED_ERRORS`: the other failures a user can meet (a file that cannot
  be read or written, a value a library refuses, a missing optional package, the
  device out of memory). The program prints one line and exits with status 1.
  Anything else is a bug and keeps its traceback; ``--debug`` shows the traceback
  of every error (:func:`reported_errors`).
* :class:`ArgumentParser` and :class:`HelpFormatter`: option errors as one line,
  and ``--help`` stating each default once.
* Load-time checks of a model: :func:`check_vocabulary` (the tokenizer's ids fit
  the embedding) and :func:`check_finite` (no NaN or Inf among the weights).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["UsageError", "EXPECTED_ERRORS", "ArgumentParser", "HelpFormatter",
           "describe", "reported_errors", "check_output_dir", "check_vocabulary",
           "check_finite"]


class UsageError(Exception):
  """A problem with the command line or its files: printed as a message, exit code 2."""


# Raised on purpose with a message for the user (the loaders, the data readers, the
# export); a bug that raises one of these still reads as one line, and --debug shows
# where it came from.
EXPECTED_ERRORS = (UsageError, ValueError, OSError, ImportError)


class HelpFormatter(argparse.HelpFormatter):
  """Appends ``(default: X)`` to an option's help, unless the help already states
  its default or there is none worth stating (``None``, ``False``)."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    text = action.help or ""
    if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
        or "default" in text):
      return action.help
    return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
  """``argparse`` whose errors are one line: the usage synopsis of the program runs
  to dozens of lines and would bury the message."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def describe(e: BaseException) -> str:
  """One line for the user: the message, the file and the OS's reason for OSErrors."""
  if isinstance(e, OSError) and e.strerror and e.filename is not None:
    text = f"{e.filename}: {e.strerror}"
  else:
    text = str(e) or type(e).__name__
  if _out_of_memory(e):
    text = ("the device ran out of memory: lower --batch or --seq, or add "
            "--micro-batches or --remat (" + text.split("\n")[0].strip() + ")")
  if not isinstance(e, UsageError):  # ours may list several lines on purpose
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return text


def _expected(e: BaseException) -> bool:
  return isinstance(e, EXPECTED_ERRORS) or _out_of_memory(e)


@contextlib.contextmanager
def reported_errors(prog: str, debug: bool = False) -> Iterator[None]:
  """Turns an expected error into ``PROG: error: MESSAGE`` on stderr and an exit.

  :class:`UsageError` exits with status 2, the other :data:`EXPECTED_ERRORS` with 1;
  with ``debug`` every error propagates with its traceback, and unexpected errors
  (bugs) always do.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if debug or not _expected(e):
      raise
    hint = "" if isinstance(e, UsageError) else " (--debug shows the traceback)"
    print(f"{prog}: error: {describe(e)}{hint}", file=sys.stderr, flush=True)
    raise SystemExit(2 if isinstance(e, UsageError) else 1) from None


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
  """Raises :class:`UsageError` when ``path`` cannot be an output folder (a file)."""
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{option}: {path} is a file, not a folder; choose another "
                     f"{option} (a folder, created if missing)")


def check_vocabulary(vocab_rows: int, tokenizer: Any, source: str) -> None:
  """Raises ``ValueError`` when a token id of ``tokenizer`` has no embedding row.

  Such ids index past the embedding (JAX clamps or fills NaN): the loss and
  perplexity of any text holding them are wrong without any error.

  Args:
    vocab_rows: Rows of the model's embedding (``LlamaConfig.vocab_size``).
    tokenizer: A :class:`absign_jax.llm.tokenizer.Tokenizer`.
    source: The files the two come from, for the message.
  """
  ids = tokenizer.backend.get_vocab(with_added_tokens=True).values()
  top = max(ids, default=-1) + 1
  if top > vocab_rows:
    raise ValueError(
        f"{source}: the tokenizer has token ids up to {top - 1} but the model's "
        f"embedding has {vocab_rows} rows; use the tokenizer that belongs to these "
        "weights")


@jax.jit
def _finite_flags(xs: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) for x in xs]


def check_finite(model_or_params: Any, source: str, fix: str) -> None:
  """Raises ``ValueError`` naming a parameter that holds NaN or Inf.

  One reduction per floating-point leaf, in one compiled program.

  Args:
    model_or_params: An ``nnx.Module`` (its ``nnx.Param`` leaves are checked) or a
      pytree of arrays.
    source: The file or checkpoint, for the message.
    fix: What the user can do about it, for the message.
  """
  tree = model_or_params
  if isinstance(tree, nnx.Module):
    tree = nnx.to_pure_dict(nnx.state(tree, nnx.Param))
  leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return
  ok = jax.device_get(_finite_flags([x for _, x in leaves]))
  bad = [(path, x) for (path, x), good in zip(leaves, ok) if not good]
  if not bad:
    return
  path, x = bad[0]
  keys = [str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))
          for k in path]
  if keys[-1] == "value" and len(keys) > 1:  # an nnx.State's Variable
    keys.pop()
  if (len(keys) > 1 and keys[0] == "layers" and not keys[1].isdigit()
      and getattr(x, "is_fully_addressable", True)):  # stacked: name the layer
    finite = np.isfinite(np.asarray(x, np.float32)).reshape(x.shape[0], -1).all(1)
    layers = np.flatnonzero(~finite).tolist()
    keys.insert(1, str(layers[0]))
    more = f" (and in layers {layers[1:]})" if layers[1:] else ""
  else:
    more = ""
  if len(bad) > 1:
    more += f" (and {len(bad) - 1} more parameters)"
  raise ValueError(f"{source}: {'.'.join(keys)}{more} holds NaN or Inf; {fix}")
