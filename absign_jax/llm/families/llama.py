"""Llama 1-3 and SmolLM2 (a Llama in every file format): the plain family.

SwiGLU, no biases, rotate-half RoPE with an optional ``rope_type: llama3``
scaling (read by the shared RoPE reader of :mod:`absign_jax.llm.hf`). A GGUF
``llama`` file may carry a sliding window (``llama.attention.sliding_window``):
llama.cpp writes Mistral as ``llama``.

Tokenizers: Llama 3's byte-level BPE splits text with its own regex (GGUF
``tokenizer.ggml.pre`` ``llama-bpe``) and ends assistant turns with
``<|eot_id|>``; SmolLM2's vocabulary (``smollm``) splits every digit, and its
ChatML template ends turns with ``<|im_end|>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from absign_jax.llm.families import DIGITS, Family, GgufKeys, frozen

if TYPE_CHECKING:
  from absign_jax.llm.model import LlamaConfig

# Llama 3's pre-tokenizer regex, as llama.cpp applies it for "llama-bpe".
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def to_hf(cfg: LlamaConfig, c: dict[str, Any]) -> None:
  """SwiGLU without biases; the sliding window where the model has one."""
  c.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
  if cfg.sliding_window:
    c["sliding_window"] = cfg.sliding_window


def from_gguf(keys: GgufKeys) -> dict[str, Any]:
  window = keys.get("attention.sliding_window", None)
  return {"sliding_window": int(window)} if window else {}


FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_type="llama",
    gguf_architectures=("llama",),
    gguf_export_arch="llama",
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_permuted_qk=True,
    pre_tokenizers=frozen({"llama-bpe": LLAMA3_REGEX, "llama3": LLAMA3_REGEX,
                           "smollm": DIGITS}),
    chat_end_tokens=("<|im_end|>", "<|eot_id|>"),
)
