"""Model families: what each supported family changes, one module per family.

:class:`~absign_jax.llm.model.Llama` covers every family by config flags. What
makes a family is data: the Hugging Face ``architectures`` it is read from and
written as, its GGUF ``general.architecture``, the :class:`LlamaConfig` flags its
models always have, how its ``config.json`` keys and GGUF metadata map to
:class:`LlamaConfig` fields beyond the keys every family shares, and its
tokenizer's quirks. Each family is one :class:`Family` in its own module here;
:mod:`absign_jax.llm.hf`, :mod:`absign_jax.llm.gguf` and
:mod:`absign_jax.llm.tokenizer` look families up in :data:`FAMILIES` and never
branch on a family's name.

=======  =============================================  ======================
family   Hugging Face ``architectures``                 GGUF architecture
=======  =============================================  ======================
llama    LlamaForCausalLM (Llama 1-3, SmolLM2)          llama
mistral  MistralForCausalLM                             (written as llama)
qwen2    Qwen2ForCausalLM                               qwen2
qwen3    Qwen3ForCausalLM                               qwen3
gemma3   Gemma3ForCausalLM,                             gemma3
         Gemma3ForConditionalGeneration (its text part)
=======  =============================================  ======================

Adding a family
---------------
A family whose computation the model's flags already express is one file here
plus its tests:

1. ``families/<name>.py`` defining ``FAMILY = Family(name="<name>", ...)``: its
   Hugging Face architectures (the first is what an export writes) and
   ``model_type``, its GGUF architectures (read; ``gguf_export_arch`` is written),
   the ``flags`` its models always have, and, where the shared readers are not
   enough, the hooks ``from_hf``/``to_hf``/``from_gguf`` and the tokenizer entries
   (``pre_tokenizers``, ``chat_end_tokens``, a ``chat_template`` for files that
   carry none). Copy the closest existing family.
2. Import it in ``_MODULES`` below; the order is the one error messages list.
3. Tests: a tiny config in ``tests/llm/test_hf.py``'s ``CONFIGS`` (checked
   against the float64 reference there and, with transformers installed, the
   export's round trip), its RoPE forms in ``tests/llm/test_hf_rope.py``, and a
   GGUF round trip if it has a GGUF architecture.

A family that computes something new needs a :class:`LlamaConfig` flag and its
code in :mod:`absign_jax.llm.model` first (and ``tests/llm/test_model.py``), and
an entry for every new tensor in the names of :mod:`absign_jax.llm.gguf`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

if TYPE_CHECKING:  # hints only: the families are data, read without building a model
  from absign_jax.llm.model import LlamaConfig

__all__ = [
    "Family",
    "GgufKeys",
    "FAMILIES",
    "HF_ARCHITECTURES",
    "GGUF_ARCHITECTURES",
    "DIGITS",
    "frozen",
    "family",
    "for_hf_architecture",
    "for_gguf_architecture",
    "periodic_layer_types",
    "pre_tokenizers",
    "chat_end_tokens",
    "fallback_chat_template",
]

# A pre-tokenizer entry: split every digit, then apply the GPT-2 regex.
DIGITS = "digits"
_REQUIRED = object()


def frozen(mapping: Mapping[str, Any] | None = None, **entries: Any) -> Mapping[str, Any]:
  """A read-only mapping, for the mapping fields of a :class:`Family`."""
  return types.MappingProxyType({**(mapping or {}), **entries})


class GgufKeys:
  """The ``<arch>.*`` keys of GGUF metadata, as the readers ask for them."""

  def __init__(self, meta: Mapping[str, Any], arch: str):
    self.meta, self.arch = meta, arch

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    """``<arch>.<key>``; without ``default`` a missing key raises ``ValueError``."""
    name = f"{self.arch}.{key}"
    if name in self.meta:
      return self.meta[name]
    if default is _REQUIRED:
      raise ValueError(f"GGUF metadata lacks {name}")
    return default

  def get_float(self, key: str, default: Any = _REQUIRED) -> float:
    """A float32 value as its shortest decimal: GGUF stores ``1e-5`` as
    ``9.99999974e-06``, which reads back as ``1e-5`` here."""
    return float(str(np.float32(self.get(key, default))))


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: how its checkpoints map onto :class:`LlamaConfig`.

  Attributes:
    name: The family's name, :attr:`LlamaConfig.arch`.
    hf_architectures: ``config.json`` ``architectures`` entries read as this family;
      the first is the one an export writes.
    hf_model_type: The ``model_type`` an export writes.
    gguf_architectures: GGUF ``general.architecture`` values read as this family.
    gguf_export_arch: The GGUF architecture an export writes (llama.cpp runs Mistral
      as ``llama``); None when the family cannot be written to GGUF.
    flags: :class:`LlamaConfig` fields every model of the family has (``qk_norm``,
      ``sandwich_norm``, ``embed_scale``, ...), from either format.
    hf_defaults: ``config.json`` entries a checkpoint may leave out (the defaults
      of the family's transformers config class where they are not the shared ones).
    hf_text_config: The text model's entries may be nested under ``text_config``
      (a multimodal checkpoint).
    hf_activations: ``hidden_act``/``hidden_activation`` values read; the model's
      activation is ``flags["mlp_act"]`` (SwiGLU when not given).
    hf_tensor_prefixes: Prefixes of the text model's tensor names, tried in order.
    hf_ignored_prefixes: Tensors of the checkpoint that are not the text model's.
    from_hf: ``(c, unsupported) -> fields``: the family's :class:`LlamaConfig`
      fields from its (text) ``config.json`` dict ``c`` beyond the shared ones;
      raises ``unsupported(what)`` on a setting the model cannot run.
    to_hf: ``(cfg, c) -> None``: adds the family's entries to the ``config.json``
      dict ``c`` an export writes.
    rope_by_layer_type: ``rope_parameters`` (transformers 5.x) is keyed by layer
      type (``full_attention``, ``sliding_attention``), and sliding layers have a
      RoPE base of their own (4.x: ``rope_local_base_freq``).
    rope_theta: RoPE base when a ``config.json`` names none.
    rope_local_theta: The sliding layers' RoPE base when a config names none (with
      ``rope_by_layer_type``).
    from_gguf: ``(keys: GgufKeys) -> fields``: the family's :class:`LlamaConfig`
      fields from its GGUF metadata beyond the shared ones.
    gguf_permuted_qk: llama.cpp's converter permutes the rows of ``attn_q`` and
      ``attn_k`` into interleaved rotary pairs (see :mod:`absign_jax.llm.gguf`).
    pre_tokenizers: GGUF ``tokenizer.ggml.pre`` names of the family's vocabularies
      -> the split regex applied before byte-level BPE, or :data:`DIGITS`.
    chat_end_tokens: Tokens that end an assistant turn in the family's chat
      templates: where chat generation stops.
    chat_template: The family's chat template, for GGUF files that carry none and
      whose vocabulary has ``chat_template_token``.
    chat_template_token: The vocabulary entry that marks the family's chat format.
  """

  name: str
  hf_architectures: tuple[str, ...]
  hf_model_type: str
  gguf_architectures: tuple[str, ...] = ()
  gguf_export_arch: str | None = None
  flags: Mapping[str, Any] = dataclasses.field(default_factory=frozen)
  hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=frozen)
  hf_text_config: bool = False
  hf_activations: tuple[str, ...] = ("silu",)
  hf_tensor_prefixes: tuple[str, ...] = ("model.",)
  hf_ignored_prefixes: tuple[str, ...] = ()
  from_hf: Callable[[Mapping[str, Any], Callable[[str], Exception]],
                    dict[str, Any]] | None = None
  to_hf: Callable[["LlamaConfig", dict[str, Any]], None] | None = None
  rope_by_layer_type: bool = False
  rope_theta: float = 10000.0
  rope_local_theta: float | None = None
  from_gguf: Callable[[GgufKeys], dict[str, Any]] | None = None
  gguf_permuted_qk: bool = False
  pre_tokenizers: Mapping[str, str] = dataclasses.field(default_factory=frozen)
  chat_end_tokens: tuple[str, ...] = ()
  chat_template: str | None = None
  chat_template_token: str | None = None


def periodic_layer_types(n_layers: int, pattern: int) -> tuple[str, ...]:
  """Every ``pattern``-th layer full attention, the others sliding (Gemma 3's
  ``sliding_window_pattern``, llama.cpp's too)."""
  return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
               for i in range(n_layers))


# The family modules import Family from here, so they come after its definition.
from absign_jax.llm.families import gemma3, llama, mistral, qwen2, qwen3  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_MODULES = (llama, mistral, qwen2, qwen3, gemma3)

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}
# config.json architectures entry -> family, in the order error messages list them.
HF_ARCHITECTURES: dict[str, Family] = {
    a: f for f in FAMILIES.values() for a in f.hf_architectures}
# GGUF general.architecture -> family.
GGUF_ARCHITECTURES: dict[str, Family] = {
    a: f for f in FAMILIES.values() for a in f.gguf_architectures}


def family(name: str) -> Family:
  """The family named ``name`` (:attr:`LlamaConfig.arch`)."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def for_hf_architecture(architecture: str) -> Family | None:
  """The family a ``config.json`` ``architectures`` entry is read as, or None."""
  return HF_ARCHITECTURES.get(architecture)


def for_gguf_architecture(architecture: str) -> Family | None:
  """The family a GGUF ``general.architecture`` is read as, or None."""
  return GGUF_ARCHITECTURES.get(architecture)


def pre_tokenizers() -> dict[str, str]:
  """Every family's ``tokenizer.ggml.pre`` entries (see :attr:`Family.pre_tokenizers`)."""
  return {k: v for f in FAMILIES.values() for k, v in f.pre_tokenizers.items()}


def chat_end_tokens() -> tuple[str, ...]:
  """Every family's end-of-turn tokens, without repeats, in registry order."""
  return tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.chat_end_tokens))


def fallback_chat_template(tokens: Any) -> str | None:
  """The chat template of the family whose marker token is in ``tokens`` (a GGUF
  file without a template), or None."""
  return next((f.chat_template for f in FAMILIES.values()
               if f.chat_template and f.chat_template_token in tokens), None)
