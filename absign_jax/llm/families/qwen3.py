"""Qwen3: Qwen2 without the biases, with per-head RMSNorm on queries and keys
(before RoPE) and a head size of its own (``head_dim``, read by the shared
reader). Same vocabulary and chat format as Qwen2.
"""

from __future__ import annotations

from absign_jax.llm.families import Family, frozen, qwen2

FAMILY = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_type="qwen3",
    gguf_architectures=("qwen3",),
    gguf_export_arch="qwen3",
    flags=frozen(qk_norm=True),
    from_hf=qwen2.from_hf,
    to_hf=qwen2.to_hf,
    pre_tokenizers=frozen({"qwen2": qwen2.QWEN2_REGEX}),
    chat_end_tokens=("<|im_end|>",),
)
