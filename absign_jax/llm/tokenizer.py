"""Tokenizers from GGUF metadata or a Hugging Face ``tokenizer.json``; chat rendering.

From GGUF, the tokenizer is rebuilt with the ``tokenizers`` package from the
keys ``tokenizer.ggml.{model,pre,tokens,token_type,merges,scores,bos_token_id,
eos_token_id}``:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The pre-tokenizer
  follows ``tokenizer.ggml.pre`` the way llama.cpp does: ``smollm``/
  ``starcoder``-style vocabularies split every digit, then apply the GPT-2
  regex; ``llama-bpe`` and ``qwen2`` use their own regexes (a family's entries
  are its ``pre_tokenizers`` in :mod:`absign_jax.llm.families`).
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE (Gemma, Llama 2):
  spaces become ``▁``, unknown bytes fall back to ``<0xNN>`` tokens, and the
  merges are derived from the token scores (a pair merges with the score of the
  token it forms, highest first), as llama.cpp's SPM tokenizer does.

From a Hugging Face directory, ``tokenizer.json`` is used as is, with the
special tokens and chat template of ``tokenizer_config.json``.

Chat rendering: a ChatML template (SmolLM2, Qwen) is written out directly::

    <|im_start|>{role}\\n{content}<|im_end|>\\n     (per message)
    <|im_start|>assistant\\n                          (generation prompt)

SmolLM2's template prepends a default system message when the conversation
does not start with one; that message is read from the template text (the
first ``<|im_start|>system\\n...<|im_end|>`` literal in it), so it matches
the checkpoint. Any other template is run with Jinja (a GGUF file without one
gets the template of the family whose marker token its vocabulary has: Gemma's
turn format); the assistant mask of :meth:`encode_chat` then covers what each
assistant message adds to the rendering. Chat generation stops at the families'
end-of-turn token the template uses (``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``), else at ``eos``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

from absign_jax.llm import families

__all__ = ["Tokenizer", "load_tokenizer", "IM_START", "IM_END"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_GPT2_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex or families.DIGITS: the families' vocabularies,
# and llama.cpp's other digit-splitting ones (their models load as a family's).
_PRE_TOKENIZERS = {
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva",
                     "command-r"), families.DIGITS),
    **families.pre_tokenizers(),
}
# GGUF token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


def _spm_backend(tokens: Sequence[str], scores: Sequence[float],
                 types: Sequence[int], add_space_prefix: bool):
  """A ``tokenizers`` BPE equivalent to llama.cpp's SPM tokenizer."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers  # pylint: disable=g-import-not-at-top

  vocab = {tok: i for i, tok in enumerate(tokens)}
  normal = [i for i, t in enumerate(types) if t in (1, 0)]
  merges = []
  for i in normal:
    tok = tokens[i]
    local = [(tok[:k], tok[k:]) for k in range(1, len(tok))
             if tok[:k] in vocab and tok[k:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    merges.extend((scores[i], lr) for lr in local)
  merges.sort(key=lambda m: -m[0])  # stable: ties keep vocabulary order
  unk = next((tokens[i] for i, t in enumerate(types) if t == 2), None)
  backend = HFTokenizer(models.BPE(
      vocab=vocab, merges=[lr for _, lr in merges], unk_token=unk,
      fuse_unk=True, byte_fallback=True, ignore_merges=False))
  steps = [normalizers.Replace(" ", "\u2581")]
  if add_space_prefix:
    steps.insert(0, normalizers.Prepend("\u2581"))
  backend.normalizer = normalizers.Sequence(steps)
  backend.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
  return backend


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  split = _PRE_TOKENIZERS.get(pre)
  if split == families.DIGITS:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  if split is not None:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
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
      backend: Any = None,
  ):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models  # pylint: disable=g-import-not-at-top

    types = list(token_types) if token_types is not None else [1] * len(tokens)
    if backend is None:
      vocab = {tok: i for i, tok in enumerate(tokens)}
      pairs = [tuple(m.split(" ", 1)) for m in merges]
      backend = HFTokenizer(
          models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                     ignore_merges=False)
      )
      backend.pre_tokenizer = _pre_tokenizer(pre)
      backend.decoder = decoders.ByteLevel()
    self.backend = backend
    special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
    # Special tokens are matched before pre-tokenisation and keep their ids.
    self.backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special]
    )
    self.backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in user]
    )
    self._setup(bos_id, eos_id, add_bos, chat_template)
    self.gguf_metadata: dict[str, Any] | None = None

  def _setup(self, bos_id, eos_id, add_bos, chat_template) -> None:
    self._vocab = self.backend.get_vocab(with_added_tokens=True)
    self.bos_id, self.eos_id, self.add_bos = int(bos_id), int(eos_id), add_bos
    self.doc_sep_id = self._vocab.get("<|endoftext|>", self.eos_id)
    self.chat_template = chat_template
    self.chatml = bool(chat_template) and IM_START in chat_template
    self.default_system = _default_system(chat_template) if self.chatml else None
    # The token that ends an assistant turn: where chat generation stops.
    end = next((t for t in families.chat_end_tokens()
                if t in self._vocab and chat_template and t in chat_template), None)
    self.chat_eos_id = self._vocab[end] if end else self.eos_id

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
    """Builds the tokenizer from GGUF key/value metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
      tokens = meta["tokenizer.ggml.tokens"]
      types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
      template = meta.get("tokenizer.chat_template")
      if template is None:
        template = families.fallback_chat_template(tokens)
      backend = _spm_backend(tokens, meta["tokenizer.ggml.scores"], types,
                             bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
      tok = cls(tokens, [], token_types=types, backend=backend,
                bos_id=meta["tokenizer.ggml.bos_token_id"],
                eos_id=meta["tokenizer.ggml.eos_token_id"],
                add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                chat_template=template)
      tok.gguf_metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
      return tok
    if kind != "gpt2":
      raise ValueError(
          f"tokenizer.ggml.model is {kind!r}; supported: byte-level BPE ('gpt2')"
          " and SentencePiece-style BPE ('llama')"
      )
    tok = cls._from_gpt2_metadata(meta)
    tok.gguf_metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return tok

  @classmethod
  def _from_gpt2_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
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

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    """``tokenizer.json`` plus ``tokenizer_config.json`` of a checkpoint directory."""
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      raise FileNotFoundError(
          f"{path}: no tokenizer.json; the checkpoint directory needs the fast"
          " tokenizer file (save it with transformers' tokenizer.save_pretrained)")
    backend = HFTokenizer.from_file(tj)
    conf = {}
    cpath = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cpath):
      with open(cpath, encoding="utf-8") as f:
        conf = json.load(f)
    template = conf.get("chat_template")
    jinja = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
      with open(jinja, encoding="utf-8") as f:
        template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t["template"] for t in template
                       if t.get("name") == "default"), template[0]["template"])
    vocab = backend.get_vocab(with_added_tokens=True)

    def token_id(key, fallback):
      t = conf.get(key)
      t = t.get("content") if isinstance(t, dict) else t
      return vocab[t] if t in vocab else fallback

    eos = token_id("eos_token", None)
    if eos is None:
      raise ValueError(f"{cpath}: no eos_token in the vocabulary; tokenizer_config.json"
                       " must name the end-of-sequence token")
    bos = token_id("bos_token", eos)
    add_bos = conf.get("add_bos_token")
    if add_bos is None:  # a post-processor that prepends bos (Llama 3)
      ids = backend.encode("a", add_special_tokens=True).ids
      add_bos = bool(ids) and ids[0] == bos and bos != eos
    tok = cls.__new__(cls)
    tok.backend = backend
    tok._setup(bos, eos, bool(add_bos), template)
    tok.gguf_metadata = None
    return tok

  def save_hf(self, out_dir: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir = os.fspath(out_dir)
    self.backend.save(os.path.join(out_dir, "tokenizer.json"))
    inv = {i: t for t, i in self._vocab.items()}
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": inv.get(self.bos_id), "eos_token": inv.get(self.eos_id),
        "add_bos_token": self.add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if self.chat_template:
      conf["chat_template"] = self.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w",
              encoding="utf-8") as f:
      json.dump(conf, f, indent=2, ensure_ascii=False)

  def to_gguf_metadata(self) -> dict[str, Any]:
    """``tokenizer.*`` GGUF keys: the original ones when read from GGUF, else
    built from a byte-level BPE ``tokenizer.json``."""
    if self.gguf_metadata is not None:
      meta = dict(self.gguf_metadata)
    else:
      model = json.loads(self.backend.to_str())["model"]
      decoder = json.loads(self.backend.to_str()).get("decoder") or {}
      if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(decoder):
        raise ValueError(
            "this tokenizer.json is not byte-level BPE; writing it into GGUF is"
            " supported for byte-level BPE tokenizers (and any tokenizer read from"
            " GGUF); export to a Hugging Face directory instead (--to hf)")
      vocab = self.backend.get_vocab(with_added_tokens=True)
      tokens = [None] * (max(vocab.values()) + 1)
      for t, i in vocab.items():
        tokens[i] = t
      tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
      added = {a.content: a.special
               for a in self.backend.get_added_tokens_decoder().values()}
      types = [(_CONTROL if added[t] else _USER_DEFINED) if t in added else 1
               for t in tokens]
      merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
      meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
              "tokenizer.ggml.merges": merges}
    meta.update({"tokenizer.ggml.bos_token_id": self.bos_id,
                 "tokenizer.ggml.eos_token_id": self.eos_id,
                 "tokenizer.ggml.add_bos_token": self.add_bos})
    if self.chat_template:
      meta["tokenizer.chat_template"] = self.chat_template
    return meta

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

  # -- chat ------------------------------------------------------------------------

  def _render(self, messages, add_generation_prompt: bool) -> str:
    if not self.chat_template:
      raise ValueError("this checkpoint has no chat template; chat data needs one")
    inv = {self.bos_id: None, self.eos_id: None}
    for t, i in self._vocab.items():
      if i in inv:
        inv[i] = t
    return _render_template(self.chat_template, messages, add_generation_prompt,
                            inv[self.bos_id] or "", inv[self.eos_id] or "")

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
    """Renders ``[{"role": ..., "content": ...}, ...]`` with the chat template."""
    if not self.chatml:
      return self._render(messages, add_generation_prompt)
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

    if not self.chatml:
      # What each message adds to the rendering; an assistant message's share
      # (its content and end-of-turn marker) is trained on.
      msgs, done = list(messages), ""
      for k, m in enumerate(msgs):
        if m["role"] == "assistant":
          head = self._render(msgs[:k], True)
          if head.startswith(done):
            put(head[len(done):], 0)
            done = head
        text = self._render(msgs[:k + 1], False)
        if not text.startswith(done):
          raise ValueError("the chat template does not render conversations"
                           " incrementally; cannot mask assistant turns")
        put(text[len(done):], int(m["role"] == "assistant"))
        done = text
      if add_generation_prompt:
        put(self._render(msgs, True)[len(done):], 0)
      return ids, mask

    for m in self._messages(messages):
      train = int(m["role"] == "assistant")
      put(f"{IM_START}{m['role']}\n", 0)
      put(f"{m['content']}{IM_END}", train)
      put("\n", 0)
    if add_generation_prompt:
      put(f"{IM_START}assistant\n", 0)
    return ids, mask


def _render_template(template: str, messages, add_generation_prompt, bos, eos) -> str:
  import jinja2  # pylint: disable=g-import-not-at-top

  def raise_exception(msg):
    raise ValueError(f"chat template: {msg}")

  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt,
      bos_token=bos, eos_token=eos)


def _default_system(template: str | None) -> str | None:
  if not template:
    return None
  match = re.search(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END),
                    template, flags=re.S)
  return match.group(1) if match else None


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
  """Tokenizer of a GGUF file or a Hugging Face directory (``None`` = the
  default SmolLM2 checkpoint)."""
  if path is not None and os.path.isdir(path):
    return Tokenizer.from_hf_dir(path)
  from absign_jax.llm.gguf import read_metadata  # pylint: disable=g-import-not-at-top

  return Tokenizer.from_gguf_metadata(read_metadata(path))
