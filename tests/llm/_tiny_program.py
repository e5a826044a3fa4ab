"""A tiny Llama GGUF with SmolLM2's tokenizer, so that the fine-tuning program runs in
seconds (tests of its command line, records, resume and signals)."""

from __future__ import annotations

import contextlib

import numpy as np

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A plain ChatML template (the shape of SmolLM2's), for the chat-formatted tasks.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he")


def byte_level_vocab() -> list[str]:
  """GPT-2's byte-level alphabet (every byte as a printable character)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def write_tiny_gguf(path, n_layers: int = 2, dim: int = 32, hidden: int = 64,
                    n_heads: int = 2, n_kv_heads: int = 1, seed: int = 0,
                    chat_template: str | None = None, context: int = 64) -> None:
  """Random Llama weights (tied head) with a byte-level BPE tokenizer of 264 tokens
  (three ChatML special tokens, the 256 bytes and a few merges); ``chat_template``
  (e.g. ``CHATML``) is stored when given."""
  import gguf

  tokens = [*SPECIAL, *byte_level_vocab(), *("".join(m.split()) for m in MERGES)]
  types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
  vocab = len(tokens)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(n_layers)
  w.add_context_length(context)
  w.add_embedding_length(dim)
  w.add_feed_forward_length(hidden)
  w.add_head_count(n_heads)
  w.add_head_count_kv(n_kv_heads)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(vocab)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(list(MERGES))
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(False)
  if chat_template is not None:
    w.add_chat_template(chat_template)
  rng = np.random.default_rng(seed)
  hd = dim // n_heads

  def t(*shape, scale=0.05):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  w.add_tensor("token_embd.weight", t(vocab, dim, scale=0.05))
  for i in range(n_layers):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", np.ones(dim, np.float32))
    w.add_tensor(p + "attn_q.weight", t(n_heads * hd, dim))
    w.add_tensor(p + "attn_k.weight", t(n_kv_heads * hd, dim))
    w.add_tensor(p + "attn_v.weight", t(n_kv_heads * hd, dim))
    w.add_tensor(p + "attn_output.weight", t(dim, n_heads * hd))
    w.add_tensor(p + "ffn_norm.weight", np.ones(dim, np.float32))
    w.add_tensor(p + "ffn_gate.weight", t(hidden, dim))
    w.add_tensor(p + "ffn_up.weight", t(hidden, dim))
    w.add_tensor(p + "ffn_down.weight", t(dim, hidden))
  w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_tiny_files(directory) -> dict[str, str]:
  """The tiny GGUF and a text file of 3,000 characters in ``directory``."""
  from absign_jax.llm import data

  gguf_path, text = directory / "tiny.gguf", directory / "notes.txt"
  write_tiny_gguf(gguf_path)
  text.write_text(data.second_text()[:3000], encoding="utf-8")
  return {"gguf": str(gguf_path), "data": str(text)}


def tiny_argv(files: dict[str, str], *extra: str) -> list[str]:
  """Options of a tiny run of a few seconds (add ``--out``, ``--steps``, ...)."""
  return ["--model", files["gguf"], "--data", files["data"], "--batch", "2", "--seq",
          "16", "--eval-seqs", "2", "--eval-every", "2", "--steps", "3",
          "--ckpt-every", "0", "--no-progress", *extra]


@contextlib.contextmanager
def compilation_cache(directory):
  """JAX's persistent compilation cache in ``directory``: the tiny runs of a test
  module compile each program once."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (str(directory), 0.0, 0)):
    jax.config.update(n, v)
  cache.reset_cache()
  try:
    yield
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    cache.reset_cache()


def tiny_files_fixture(name: str):
  """A module-scoped pytest fixture ``files``: :func:`write_tiny_files` in a new
  folder named after ``name``, with :func:`compilation_cache` in it for the module's
  runs (its path under ``"cache"``, for subprocesses to share)."""
  import pytest

  @pytest.fixture(scope="module")
  def files(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp(name)
    written = write_tiny_files(d)
    with compilation_cache(d / "jax_cache"):
      yield {**written, "cache": str(d / "jax_cache")}

  return files
