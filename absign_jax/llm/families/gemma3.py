"""Gemma 3's text model (also the text part of a multimodal checkpoint).

Sliding-window and full-attention layers alternate (every ``pattern``-th layer
is global), with a RoPE base each; per-head QK-norm; RMSNorms scale by
``1 + w`` and sit before and after both attention and the MLP (sandwich norms);
GeGLU (tanh GELU); embeddings scaled by ``sqrt(dim)``; a tied head; attention
scores scaled by ``query_pre_attn_scalar ** -0.5``.

Hugging Face: ``Gemma3ForCausalLM`` or ``Gemma3ForConditionalGeneration``,
whose ``text_config`` holds the text model (entries it leaves out take
``Gemma3TextConfig``'s defaults) and whose vision tensors are skipped.
``rope_parameters`` (transformers 5.x) is keyed by layer type. A GGUF file
stores every RMSNorm weight as ``1 + w`` (the loader follows ``norm_unit_offset``).

Tokenizer: SentencePiece-style BPE; a GGUF file without a chat template gets
Gemma's turn format, whose assistant turns end with ``<end_of_turn>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from absign_jax.llm.families import Family, GgufKeys, frozen, periodic_layer_types

if TYPE_CHECKING:
  from absign_jax.llm.model import LlamaConfig

# Gemma's turn format, for Gemma GGUF files that carry no chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Gemma3TextConfig's defaults, for text_config entries a checkpoint leaves out.
HF_DEFAULTS = frozen(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
    head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    sliding_window=4096, sliding_window_pattern=6, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
)


def from_hf(c: Mapping[str, Any], unsupported: Callable[[str], Exception]
            ) -> dict[str, Any]:
  for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
    if c.get(cap):
      raise unsupported(cap)
  types = c.get("layer_types") or periodic_layer_types(
      int(c["num_hidden_layers"]), int(c.get("sliding_window_pattern") or 6))
  return dict(query_scale=float(c["query_pre_attn_scalar"]) ** -0.5,
              sliding_window=int(c["sliding_window"]), layer_types=tuple(types))


def to_hf(cfg: LlamaConfig, c: dict[str, Any]) -> None:
  # transformers declares query_pre_attn_scalar an int (it is one in every Gemma 3).
  scalar = (cfg.query_scale or cfg.head_size ** -0.5) ** -2
  c.update(
      hidden_activation="gelu_pytorch_tanh",
      query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 * scalar
      else scalar,
      sliding_window=cfg.sliding_window,
      layer_types=list(cfg.layer_types or ["full_attention"] * cfg.n_layers),
      final_logit_softcapping=None, attn_logit_softcapping=None,
      attention_bias=False,
  )


def from_gguf(keys: GgufKeys) -> dict[str, Any]:
  # llama.cpp's defaults: every 6th layer is global, local RoPE base 10000.
  pattern = int(keys.get("attention.sliding_window_pattern", 6))
  out = dict(
      tie_embeddings=True,
      sliding_window=int(keys.get("attention.sliding_window")),
      layer_types=periodic_layer_types(int(keys.get("block_count")), pattern),
      rope_local_theta=keys.get_float("rope.freq_base_swa", 10000.0),
  )
  scalar = keys.get("attention.query_pre_attn_scalar", None)
  if scalar is not None:
    out["query_scale"] = float(scalar) ** -0.5
  return out


FAMILY = Family(
    name="gemma3",
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    hf_model_type="gemma3_text",
    gguf_architectures=("gemma3",),
    gguf_export_arch="gemma3",
    flags=frozen(mlp_act="gelu_tanh", qk_norm=True, sandwich_norm=True,
                 norm_unit_offset=True, embed_scale=True),
    hf_defaults=HF_DEFAULTS,
    hf_text_config=True,
    hf_activations=("gelu_pytorch_tanh", "gelu_tanh"),
    hf_tensor_prefixes=("model.", "model.language_model.", "language_model.model."),
    hf_ignored_prefixes=("vision_tower.", "multi_modal_projector.",
                         "model.vision_tower.", "model.multi_modal_projector."),
    from_hf=from_hf,
    to_hf=to_hf,
    rope_by_layer_type=True,
    rope_theta=1e6,
    rope_local_theta=1e4,
    from_gguf=from_gguf,
    chat_end_tokens=("<end_of_turn>",),
    chat_template=CHAT_TEMPLATE,
    chat_template_token="<start_of_turn>",
)
