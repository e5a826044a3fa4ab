"""Byte-level BPE tokenizer and ChatML chat rendering from GGUF metadata.

The tokenizer is rebuilt with the ``tokenizers`` package from the GGUF keys
``tokenizer.ggml.{model,pre,tokens,token_type,merges,bos_token_id,
eos_token_id}``. Only ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) is
supported. The pre-tokenizer follows ``tokenizer.ggml.pre`` the way llama.cpp
does: ``smollm``/``starcoder``-style vocabularies split every digit, then apply
the GPT-2 regex; ``llama-bpe`` and ``qwen2`` use their own regexes.

Chat rendering is ChatML, written out directly rather than by running the
Jinja ``tokenizer.chat_template``::

    <|im_start|>{role}\\n{content}<|im_end|>\\n     (per message)
    <|im_start|>assistant\\n                          (generation prompt)

SmolLM2's template prepends a default system message when the conversation
does not start with one; that message is read from the template text (the
first ``<|im_start|>system\\n...<|im_end|>`` literal in it), so it matches
the checkpoint.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

__all__ = ["Tokenizer", "load_tokenizer", "IM_START", "IM_END"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_GPT2_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "exaone",
                     "minerva", "command-r")
# GGUF token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRES:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  if pre in ("llama-bpe", "llama3", "qwen2"):
    regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  return byte_level  # "gpt2", "default" and unknown: the GPT-2 regex


class Tokenizer:
  """A byte-level BPE tokenizer with ChatML helpers.

  Attributes:
    backend: The underlying ``tokenizers.Tokenizer``.
    bos_id: Beginning-of-sequence id (SmolLM2: ``<|im_start|>`` = 1).
    eos_id: End-of-sequence id (SmolLM2: ``<|im_end|>`` = 2).
    doc_sep_id: Id placed between documents when packing plain text
      (``<|endoftext|>`` if the vocabulary has it, else ``eos_id``).
    add_bos: Whether :meth:`encode` prepends ``bos_id`` by default.
    chat_template: The checkpoint's Jinja template (kept for reference only).
    default_system: System message inserted when a conversation has none.
  """

  def __init__(
      self,
      tokens: Sequence[str],
      merges: Sequence[str],
      *,
      token_types: Sequence[int] | None = None,
      bos_id: int,
      eos_id: int,
      pre: str = "gpt2",
      add_bos: bool = False,
      chat_template: str | None = None,
  ):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models  # pylint: disable=g-import-not-at-top

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    self.backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                   ignore_merges=False)
    )
    self.backend.pre_tokenizer = _pre_tokenizer(pre)
    self.backend.decoder = decoders.ByteLevel()
    types = list(token_types) if token_types is not None else [1] * len(tokens)
    special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
    # Special tokens are matched before pre-tokenisation and keep their ids.
    self.backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special]
    )
    self.backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in user]
    )
    self._vocab = vocab
    self.bos_id, self.eos_id, self.add_bos = int(bos_id), int(eos_id), add_bos
    self.doc_sep_id = vocab.get("<|endoftext|>", self.eos_id)
    self.chat_template = chat_template
    self.default_system = _default_system(chat_template)

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
    """Builds the tokenizer from GGUF key/value metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
          f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2')"
          " tokenizers are supported"
      )
    return cls(
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.merges"],
        token_types=meta.get("tokenizer.ggml.token_type"),
        bos_id=meta["tokenizer.ggml.bos_token_id"],
        eos_id=meta["tokenizer.ggml.eos_token_id"],
        pre=meta.get("tokenizer.ggml.pre", "gpt2"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry (byte-level form, e.g. ``"Ġworld"``)."""
    return self._vocab.get(token)

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text``; special-token strings map to their ids."""
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if self.add_bos if add_bos is None else add_bos:
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids``."""
    return self.backend.decode(
        [int(i) for i in ids], skip_special_tokens=skip_special_tokens
    )

  # -- ChatML ------------------------------------------------------------------

  def _messages(self, messages: Sequence[Mapping[str, str]]):
    msgs = list(messages)
    if self.default_system and (not msgs or msgs[0].get("role") != "system"):
      msgs.insert(0, {"role": "system", "content": self.default_system})
    return msgs

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, str]],
      add_generation_prompt: bool = True,
  ) -> str:
    """Renders ``[{"role": ..., "content": ...}, ...]`` as ChatML text."""
    text = "".join(
        f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
        for m in self._messages(messages)
    )
    if add_generation_prompt:
      text += f"{IM_START}assistant\n"
    return text

  def encode_chat(
      self,
      messages: Sequence[Mapping[str, str]],
      add_generation_prompt: bool = False,
  ) -> tuple[list[int], list[int]]:
    """Token ids of the ChatML rendering and a per-token assistant mask.

    The mask is 1 on every assistant message's content and its closing
    ``<|im_end|>`` (so the model learns to stop), 0 elsewhere (role headers,
    the newline after ``<|im_end|>``, other roles). The ids equal
    ``encode(apply_chat_template(messages, add_generation_prompt))``.

    Returns:
      ``(ids, mask)`` of equal length.
    """
    ids: list[int] = []
    mask: list[int] = []

    def put(text: str, weight: int):
      piece = self.encode(text, add_bos=False)
      ids.extend(piece)
      mask.extend([weight] * len(piece))

    for m in self._messages(messages):
      train = int(m["role"] == "assistant")
      put(f"{IM_START}{m['role']}\n", 0)
      put(f"{m['content']}{IM_END}", train)
      put("\n", 0)
    if add_generation_prompt:
      put(f"{IM_START}assistant\n", 0)
    return ids, mask


def _default_system(template: str | None) -> str | None:
  if not template:
    return None
  match = re.search(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END),
                    template, flags=re.S)
  return match.group(1) if match else None


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
  """Tokenizer of a GGUF file (``None`` = the default SmolLM2 checkpoint)."""
  from absign_jax.llm.gguf import read_metadata  # pylint: disable=g-import-not-at-top

  return Tokenizer.from_gguf_metadata(read_metadata(path))
