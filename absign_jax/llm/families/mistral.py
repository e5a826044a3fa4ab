"""Mistral: Llama with an optional sliding window on every layer.

llama.cpp has no Mistral architecture: GGUF files are written (and read back)
as ``llama``, with ``llama.attention.sliding_window`` and the ``llama`` Q/K row
permutation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from absign_jax.llm.families import Family, llama

if TYPE_CHECKING:
  from absign_jax.llm.model import LlamaConfig


def from_hf(c: Mapping[str, Any], unsupported: Callable[[str], Exception]
            ) -> dict[str, Any]:
  del unsupported  # every Mistral setting is supported
  return {"sliding_window": int(c["sliding_window"])} if c.get("sliding_window") else {}


def to_hf(cfg: LlamaConfig, c: dict[str, Any]) -> None:
  llama.to_hf(cfg, c)
  c["sliding_window"] = cfg.sliding_window  # null: full attention


FAMILY = Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_type="mistral",
    gguf_export_arch="llama",
    from_hf=from_hf,
    to_hf=to_hf,
    gguf_permuted_qk=True,
)
