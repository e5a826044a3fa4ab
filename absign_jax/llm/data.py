"""Offline training data: token streams, fixed-length sequences and batches.

Sources
-------
* Default: the English prose of Python's own documentation that ships in the
  standard library as ``pydoc_data.topics`` (79 language-reference topics,
  ~110k SmolLM2 tokens). Topics are split into train / held-out by an MD5 hash
  of their key (about 90/10), so the split never depends on the Python hash
  seed or on dictionary order.
* ``path=FILE``: a ``.jsonl`` file with ``{"messages": [{"role": ...,
  "content": ...}, ...]}`` per line (rendered as ChatML; the loss covers
  assistant tokens only) or any other file as plain UTF-8 text. JSONL lines
  are split by hash like the topics; a text file keeps its last 10% of tokens
  for evaluation.
* :func:`second_text`: a different held-out English text for measuring
  forgetting -- the IDLE user guide, ``idlelib/help.html`` in the standard
  library (~12k tokens of prose about an editor/shell, unlike the language
  reference), converted to plain text. If ``idlelib`` is absent (some Linux
  distributions package it separately) the CPython ``LICENSE.txt`` (license
  history, ~3k tokens) is used; :func:`second_text_source` says which.

Sequences
---------
Documents are concatenated into one stream (separated by the tokenizer's
``doc_sep_id``) with a per-token loss weight, then cut into windows of
``seq_len + 1`` tokens with stride ``seq_len`` (every token but the first is a
target exactly once). A window gives ``inputs = w[:-1]``, ``targets = w[1:]``
and ``mask`` = the weights of the targets.

Batches
-------
:class:`Batches` draws a fresh permutation per epoch from ``(seed, epoch)``;
batch ``k`` is a pure function of ``k`` (:meth:`Batches.batch_at`), so the
iterator's position is one integer, saved by :meth:`Batches.state` and
restored by :meth:`Batches.restore`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import json
import os
import re
import sysconfig
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

__all__ = [
    "TokenizerLike",
    "SequenceSet",
    "Batches",
    "pydoc_documents",
    "is_heldout",
    "pack_sequences",
    "read_jsonl_messages",
    "load_dataset",
    "text_sequences",
    "second_text",
    "second_text_source",
]

HOLDOUT_FRACTION = 0.1


class TokenizerLike(Protocol):
  """What the data pipeline needs from :class:`absign_jax.llm.tokenizer.Tokenizer`."""

  doc_sep_id: int

  def encode(self, text: str) -> list[int]: ...

  def encode_chat(
      self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = ...
  ) -> tuple[list[int], list[int]]: ...


@dataclasses.dataclass(frozen=True)
class SequenceSet:
  """Fixed-length training sequences.

  Attributes:
    tokens: int32 ``[N, seq_len + 1]`` windows.
    mask: float32 ``[N, seq_len]`` loss weights of ``tokens[:, 1:]``.
    segment_ids: int32 ``[N, seq_len]``, the example each input token belongs to
      (1, 2, ... within a window; 0 for padding), for windows that pack whole
      examples; None for windows cut from one stream. Batches carry them, and the
      model attends within each example only, at positions counted from its start.
  """

  tokens: np.ndarray
  mask: np.ndarray
  segment_ids: np.ndarray | None = None

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1] - 1

  def __len__(self) -> int:
    return self.tokens.shape[0]

  @property
  def num_target_tokens(self) -> int:
    return int(np.count_nonzero(self.mask))

  def batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """``{"inputs", "targets", "mask"}`` of the given sequences (and
    ``"segment_ids"`` when the windows pack examples)."""
    idx = np.asarray(indices, dtype=np.int64)
    w = self.tokens[idx]
    out = {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": self.mask[idx]}
    if self.segment_ids is not None:
      out["segment_ids"] = self.segment_ids[idx]
    return out

  def eval_batches(
      self, batch_size: int, max_batches: int | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    """Sequential batches covering the set once (the last may be smaller)."""
    for k, start in enumerate(range(0, len(self), batch_size)):
      if max_batches is not None and k >= max_batches:
        return
      yield self.batch(np.arange(start, min(start + batch_size, len(self))))


class Batches:
  """Deterministic, resumable shuffled batches of a :class:`SequenceSet`.

  Example::

    it = Batches(train, batch_size=8, seed=0)
    batch = next(it)              # the same as it.batch_at(0)
    saved = it.state()            # {"step": 1, "seed": 0, "num_sequences": N}
    ...
    it = Batches(train, 8, seed=0).restore(saved)   # continues with batch 1
  """

  def __init__(self, data: SequenceSet, batch_size: int, seed: int = 0):
    if len(data) == 0:
      raise ValueError("cannot draw batches from an empty SequenceSet")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
    self.step = 0
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm, self._perm_epoch = rng.permutation(len(self.data)), epoch
    return self._perm

  def indices_at(self, step: int) -> np.ndarray:
    """Sequence indices of batch ``step``: consecutive draws from per-epoch permutations."""
    n = len(self.data)
    g = step * self.batch_size + np.arange(self.batch_size)
    epochs, pos = g // n, g % n
    out = np.empty(self.batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[pos[sel]]
    return out

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """Batch number ``step`` (pure in ``step``; does not move the iterator)."""
    return self.data.batch(self.indices_at(step))

  def epoch_of(self, step: int) -> float:
    """Fractional epoch reached after ``step`` batches."""
    return step * self.batch_size / len(self.data)

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def state(self) -> dict[str, int]:
    """Checkpointable position."""
    return {"step": self.step, "seed": self.seed,
            "num_sequences": len(self.data)}

  def restore(self, state: Mapping[str, Any]) -> "Batches":
    """Continues from :meth:`state`; checks it belongs to the same data/seed."""
    if int(state["seed"]) != self.seed or int(state["num_sequences"]) != len(
        self.data
    ):
      raise ValueError(
          f"batch state (seed {state['seed']}, {state['num_sequences']}"
          f" sequences) does not match this iterator (seed {self.seed},"
          f" {len(self.data)} sequences)"
      )
    self.step = int(state["step"])
    return self


# -- documents -----------------------------------------------------------------


def pydoc_documents() -> dict[str, str]:
  """The ``pydoc_data.topics`` texts, keyed by topic."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return dict(sorted(topics.topics.items()))


def is_heldout(key: str, fraction: float = HOLDOUT_FRACTION) -> bool:
  """Deterministic hash split: True for about ``fraction`` of keys."""
  h = int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:8], "little")
  return h / 2.0**64 < fraction


def _check_seq_len(seq_len: int, max_seq_len: int | None) -> None:
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if max_seq_len is not None and seq_len > max_seq_len:
    raise ValueError(
        f"sequence length {seq_len} is above the model's context length"
        f" {max_seq_len}"
    )


def pack_sequences(
    docs: Sequence[tuple[Sequence[int], Sequence[float]]],
    seq_len: int,
    sep_id: int | None = None,
    drop_unmasked: bool = False,
    bos_id: int | None = None,
) -> SequenceSet:
  """Concatenates ``(ids, weights)`` documents and cuts ``seq_len + 1`` windows.

  Args:
    docs: Token ids and per-token loss weights (the weight of predicting that
      token), of equal length.
    seq_len: Model input length.
    sep_id: Token appended after every document (weight 1), or ``None``.
    drop_unmasked: Drop windows whose targets all have weight 0.
    bos_id: Start every window with this token (an input only), for models
      that expect a beginning-of-sequence token (Gemma); windows then hold
      ``seq_len`` stream tokens.

  Returns:
    The windows; stride ``seq_len``, a trailing partial window is dropped.
  """
  ids, weights = [], []
  for doc_ids, doc_w in docs:
    if len(doc_ids) != len(doc_w):
      raise ValueError("ids and weights differ in length")
    ids.append(np.asarray(doc_ids, np.int32))
    weights.append(np.asarray(doc_w, np.float32))
    if sep_id is not None:
      ids.append(np.array([sep_id], np.int32))
      weights.append(np.ones(1, np.float32))
  stream = np.concatenate(ids) if ids else np.zeros(0, np.int32)
  wstream = np.concatenate(weights) if weights else np.zeros(0, np.float32)
  if bos_id is not None:
    n = len(stream) // seq_len
    window = np.arange(n)[:, None] * seq_len + np.arange(seq_len)[None, :]
    tokens = np.concatenate(
        [np.full((n, 1), bos_id, np.int32), stream[window].reshape(n, seq_len)], 1)
    mask = wstream[window].reshape(n, seq_len)
  else:
    n = max((len(stream) - 1) // seq_len, 0)
    starts = np.arange(n) * seq_len
    window = starts[:, None] + np.arange(seq_len + 1)[None, :]
    tokens = stream[window].reshape(n, seq_len + 1)
    mask = wstream[window[:, 1:]].reshape(n, seq_len)
  if drop_unmasked:
    keep = mask.sum(axis=1) > 0
    tokens, mask = tokens[keep], mask[keep]
  return SequenceSet(tokens, mask)


def _encode_texts(tokenizer: TokenizerLike, texts: Sequence[str]) -> list[list[int]]:
  backend = getattr(tokenizer, "backend", None)
  if backend is not None:  # batch-encode in Rust when we can
    return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
  return [tokenizer.encode(t) for t in texts]


def text_sequences(
    tokenizer: TokenizerLike, texts: Sequence[str], seq_len: int
) -> SequenceSet:
  """Packs plain texts (all tokens weighted 1) into windows."""
  docs = [(ids, np.ones(len(ids))) for ids in _encode_texts(tokenizer, texts)]
  return pack_sequences(docs, seq_len, sep_id=tokenizer.doc_sep_id,
                        bos_id=_window_bos(tokenizer))


def _window_bos(tokenizer: TokenizerLike) -> int | None:
  """The token each window starts with: bos when the tokenizer adds one."""
  return tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else None


def _not_text(path: str, e: UnicodeDecodeError, expected: str) -> ValueError:
  return ValueError(
      f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} "
      f"cannot be decoded): {expected}")


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if not os.path.isfile(path):
    raise ValueError(f"data file {path} is not a regular file (a directory?): give a "
                     "UTF-8 text file or a .jsonl chat file")


def read_jsonl_messages(path: str | os.PathLike) -> list[list[dict[str, str]]]:
  """Reads ``{"messages": [...]}`` lines; errors name the line and the problem."""
  path = os.fspath(path)
  _check_file(path)
  out = []
  try:
    lines = _read_text(path).split("\n")
  except UnicodeDecodeError as e:
    raise _not_text(path, e, 'a .jsonl file holds one {"messages": [...]} JSON object '
                    "per line, in UTF-8") from None
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue

    def bad(why: str):
      return ValueError(f"{path}, line {lineno}: {why}")

    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or "messages" not in record:
      raise bad('expected an object with a "messages" key')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise bad('"messages" must be a non-empty list')
    for j, m in enumerate(messages):
      if not isinstance(m, dict):
        raise bad(f"message {j} is not an object")
      for field in ("role", "content"):
        if not isinstance(m.get(field), str):
          raise bad(f'message {j} has no string "{field}"')
    out.append([{"role": m["role"], "content": m["content"]} for m in messages])
  if not out:
    raise ValueError(f"{path}: no conversations found")
  return out


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def load_dataset(
    tokenizer: TokenizerLike,
    path: str | os.PathLike | None = None,
    seq_len: int = 256,
    *,
    max_seq_len: int | None = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> tuple[SequenceSet, SequenceSet]:
  """Train and held-out sequences of ``seq_len + 1`` tokens.

  Args:
    tokenizer: Encodes text (and ChatML for JSONL).
    path: ``None`` for the pydoc topics; a ``.jsonl`` chat file; or a plain
      text file.
    seq_len: Model input length per sequence.
    max_seq_len: The model's context length; a larger ``seq_len`` is an error.
    holdout_fraction: Share of documents / lines / tokens held out.

  Returns:
    ``(train, heldout)``. ``heldout`` may be empty for very small files.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: Malformed JSONL (with the line number), ``seq_len`` above
      ``max_seq_len``, or too little data for one training sequence.
  """
  _check_seq_len(seq_len, max_seq_len)
  if path is None:
    docs = pydoc_documents()
    split = {k: is_heldout(k, holdout_fraction) for k in docs}
    train = text_sequences(tokenizer, [v for k, v in docs.items() if not split[k]], seq_len)
    heldout = text_sequences(tokenizer, [v for k, v in docs.items() if split[k]], seq_len)
    source = "pydoc_data.topics"
  elif os.fspath(path).endswith(".jsonl"):
    convs = read_jsonl_messages(path)
    encoded = [tokenizer.encode_chat(c) for c in convs]
    held = [is_heldout(json.dumps(c, sort_keys=True), holdout_fraction) for c in convs]
    bos = _window_bos(tokenizer)
    train = pack_sequences([e for e, h in zip(encoded, held) if not h], seq_len,
                           drop_unmasked=True, bos_id=bos)
    heldout = pack_sequences([e for e, h in zip(encoded, held) if h], seq_len,
                             drop_unmasked=True, bos_id=bos)
    source = os.fspath(path)
  else:
    path = os.fspath(path)
    _check_file(path)
    try:
      text = _read_text(path)
    except UnicodeDecodeError as e:
      raise _not_text(path, e, "a data file other than .jsonl is read as plain UTF-8 "
                      "text; convert it to text (or JSONL chat) first") from None
    if "\x00" in text:
      raise ValueError(f"{path} holds NUL bytes, so it is not a text file: a data file "
                       "other than .jsonl is read as plain UTF-8 text; convert it first")
    ids = (tokenizer.encode(text, add_bos=False) if hasattr(tokenizer, "add_bos")
           else tokenizer.encode(text))
    cut = len(ids) - int(len(ids) * holdout_fraction)
    bos = _window_bos(tokenizer)
    train = pack_sequences([(ids[:cut], np.ones(cut))], seq_len, bos_id=bos)
    heldout = pack_sequences([(ids[cut:], np.ones(len(ids) - cut))], seq_len,
                             bos_id=bos)
    source = path
  if len(train) == 0:
    raise ValueError(
        f"{source}: not enough (trainable) tokens for one training sequence of"
        f" {seq_len + 1} tokens"
    )
  return train, heldout


# -- second held-out text ------------------------------------------------------


class _MainTextParser(html.parser.HTMLParser):
  """Collects the text of Sphinx's ``<div role="main">``, one block per line."""

  _BLOCKS = {"p", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "div", "tr"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.depth = 0  # div nesting inside the main div; 0 = outside
    self.skip = 0  # inside a headerlink anchor
    self.parts: list[str] = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if self.depth == 0:
      if tag == "div" and attrs.get("role") == "main":
        self.depth = 1
      return
    if tag == "div":
      self.depth += 1
    if tag == "a" and "headerlink" in (attrs.get("class") or ""):
      self.skip += 1
    if tag in self._BLOCKS:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if self.depth == 0:
      return
    if tag == "div":
      self.depth -= 1
    if tag == "a" and self.skip:
      self.skip -= 1
    if tag in self._BLOCKS:
      self.parts.append("\n")

  def handle_data(self, data):
    if self.depth and not self.skip:
      self.parts.append(data)

  def text(self) -> str:
    text = "".join(self.parts)
    lines = (re.sub(r"[ \t]+", " ", ln).strip() for ln in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _second_text_candidates() -> list[tuple[str, str]]:
  stdlib = sysconfig.get_path("stdlib")
  return [
      ("idlelib/help.html", os.path.join(stdlib, "idlelib", "help.html")),
      ("LICENSE.txt", os.path.join(stdlib, "LICENSE.txt")),
  ]


def second_text_source() -> str:
  """Path of the file :func:`second_text` reads."""
  for _, path in _second_text_candidates():
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      "neither idlelib/help.html nor LICENSE.txt ships with this Python"
  )


def second_text() -> str:
  """A held-out English text different from ``pydoc_data`` (see module doc)."""
  path = second_text_source()
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  if path.endswith(".html"):
    parser = _MainTextParser()
    parser.feed(raw)
    return parser.text()
  return raw
