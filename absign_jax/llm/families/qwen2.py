"""Qwen2 (and Qwen2.5): Llama with biases on the query/key/value projections.

Its byte-level BPE vocabulary splits text with Qwen's regex (GGUF
``tokenizer.ggml.pre`` ``qwen2``: Llama 3's, with single digits), and its
ChatML template ends assistant turns with ``<|im_end|>``. Sliding-window
attention (``use_sliding_window``) is not supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from absign_jax.llm.families import Family, frozen, llama

if TYPE_CHECKING:
  from absign_jax.llm.model import LlamaConfig

QWEN2_REGEX = llama.LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def from_hf(c: Mapping[str, Any], unsupported: Callable[[str], Exception]
            ) -> dict[str, Any]:
  if c.get("use_sliding_window"):
    raise unsupported("use_sliding_window")
  return {}


def to_hf(cfg: LlamaConfig, c: dict[str, Any]) -> None:
  c.update(hidden_act="silu", attention_bias=False, mlp_bias=False,
           use_sliding_window=False)
  if cfg.sliding_window:
    c["sliding_window"] = cfg.sliding_window


FAMILY = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    gguf_architectures=("qwen2",),
    gguf_export_arch="qwen2",
    flags=frozen(attn_bias=True),
    from_hf=from_hf,
    to_hf=to_hf,
    pre_tokenizers=frozen({"qwen2": QWEN2_REGEX}),
    chat_end_tokens=("<|im_end|>",),
)
