"""A Llama-family decoder-only transformer in Flax NNX.

One model class covers the supported families by config flags: Llama 1-3
(with ``llama3`` RoPE scaling), SmolLM2, Mistral (sliding window), Qwen2 (q/k/v
biases), Qwen3 (per-head QK-norm, its own head size) and Gemma 3's text model
(sliding-window / full-attention alternation with two RoPE bases, (1 + w)
RMSNorms before and after attention and MLP, GeGLU, sqrt(d)-scaled embeddings).
All use grouped-query attention with rotary position embeddings (rotate-half
convention, as in Hugging Face Llama), a gated MLP and a tied or untied head.

Parameter layout
----------------
The block partition of :mod:`absign_jax` finds the transformer layers by name,
so these attribute names are part of the API::

    model.embed_tokens   nnx.Embed, param ``embedding`` [vocab, dim]
    model.layers         nnx.List of LlamaBlock            (default), or
                         one LlamaBlock built with nnx.vmap  (scan_layers=True):
                         every leaf has a leading axis of length n_layers
    model.norm           final RMSNorm, param ``scale`` [dim]
    model.lm_head        nnx.Linear [dim, vocab], only when the head is untied

Inside a block: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj`` (plus
``self_attn.{q,k}_norm`` with QK-norm, and ``self_attn.sliding`` when layer
types alternate), ``post_attention_layernorm`` (with ``sandwich_norm`` also
``{pre,post}_feedforward_layernorm``) and ``mlp.{gate,up,down}_proj``. Linear
kernels are stored ``[in, out]``; names match Hugging Face's.

Training
--------
The training step sees the model through :meth:`Llama.layer_cut` (an
:class:`absign_jax.LayerCut`: ``embed``, the layers at ``"layers"``, ``head_loss``
and the batch ``context`` of padded or packed rows), which
:func:`absign_jax.split_nnx` turns into pure functions of the parameters.

``model(inputs)`` returns float32 logits and ``model.loss(batch)`` equals
``head_loss(run_layers(embed(inputs)), targets, mask)``, i.e.
``sum(nll * mask) / sum(mask)``.

Also here: :func:`eval_loss` (token-weighted loss over batches). Generation is in
:mod:`absign_jax.llm.generate`, the weights tensor by tensor (and the list <->
stacked conversion) in :mod:`absign_jax.llm.weights`, and what each supported
family sets in :mod:`absign_jax.llm.families`.

Precision: matmuls run in the parameter dtype (float32 or bfloat16) with float32
accumulation for attention scores and logits; RMSNorm statistics, softmax and the
loss are computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from absign_jax.llm.families import family as _family
from absign_jax.llm.families import periodic_layer_types

if TYPE_CHECKING:  # the training package imports at call time (no import cycle)
  from absign_jax.train.model import LayerCut

__all__ = [
    "LlamaConfig",
    "PRESETS",
    "RMSNorm",
    "Attention",
    "MLP",
    "LlamaBlock",
    "Llama",
    "rope_tables",
    "rope_inv_freq",
    "layer_flags",
    "apply_rope",
    "eval_loss",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ATTN_IMPLS = ("einsum", "xla", "cudnn")
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
_LAYER_TYPES = ("sliding_attention", "full_attention")
_ROPE_SCALINGS = ("llama3", "linear", "yarn")
# Keys each scaling needs; YaRN's others (attention_factor, beta_fast, beta_slow,
# mscale, mscale_all_dim, truncate) are optional, with transformers' defaults.
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a :class:`Llama` model.

  Attributes:
    vocab_size: Number of token ids.
    dim: Residual stream width.
    n_layers: Number of transformer blocks.
    n_heads: Number of query heads.
    n_kv_heads: Number of key/value heads (grouped-query attention); must
      divide ``n_heads``.
    hidden_dim: Width of the SwiGLU MLP.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    max_seq_len: Context length the model supports.
    tie_embeddings: Use the token embedding as the output head.
    dtype: Parameter (and compute) dtype: ``"float32"`` or ``"bfloat16"``
      (``jnp`` dtypes are accepted and normalised to their name).
    remat: Wrap every block in ``jax.checkpoint`` (recompute activations in the
      backward pass instead of storing them).
    scan_layers: Stacked layout: one ``nnx.vmap``-created block whose leaves
      have a leading ``n_layers`` axis, applied with ``lax.scan``.
    loss_chunk: Tokens per chunk of the cross-entropy, so the full
      ``[tokens, vocab]`` logits never materialise; 0 disables chunking.
    head_dim: Per-head width; ``None`` means ``dim // n_heads``.
    qk_norm: Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    attn_impl: ``"einsum"`` (explicit, float32 softmax), ``"xla"`` or
      ``"cudnn"`` (``jax.nn.dot_product_attention``; cuDNN needs a GPU and
      bfloat16).
    attn_bias: Biases on the query/key/value projections (Qwen2).
    norm_unit_offset: RMSNorm scales by ``1 + w``, in float32 (Gemma).
    sandwich_norm: Norms after attention and around the MLP too (Gemma 3):
      blocks get ``post_attention_layernorm`` (on the attention output),
      ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``.
    mlp_act: Gate activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU).
    embed_scale: Multiply the embeddings by ``sqrt(dim)`` (Gemma).
    query_scale: Attention score scale; ``None`` means ``head_size ** -0.5``.
    sliding_window: Keys a sliding-window layer sees (itself included);
      ``None`` means full causal attention everywhere.
    layer_types: Per layer ``"sliding_attention"`` or ``"full_attention"``;
      ``None`` with a ``sliding_window`` means every layer slides. Mixed
      types give each block a ``self_attn.sliding`` flag parameter (+1 or -1,
      never trained: it is read through ``stop_gradient``), so the stacked
      layout keeps one graph for every layer.
    rope_local_theta: RoPE base of the sliding layers (Gemma 3); ``None`` means
      ``rope_theta``.
    rope_scaling: RoPE scaling of the full-attention layers as sorted
      ``(key, value)`` pairs: ``rope_type`` ``"llama3"`` (with ``factor``,
      ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``), ``"linear"`` (``factor``) or
      ``"yarn"`` (``factor``, ``original_max_position_embeddings`` and
      optionally ``attention_factor``, ``beta_fast``, ``beta_slow``,
      ``mscale``, ``mscale_all_dim``, ``truncate``), as Hugging Face
      transformers defines them. Sliding layers always use unscaled RoPE.
    arch: The family the weights came from (``"llama"``, ``"mistral"``,
      ``"qwen2"``, ``"qwen3"``, ``"gemma3"``: the names of
      :data:`absign_jax.llm.families.FAMILIES`); names the export's architecture.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  hidden_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False
  loss_chunk: int = 0
  head_dim: int | None = None
  qk_norm: bool = False
  attn_impl: str = "einsum"
  attn_bias: bool = False
  norm_unit_offset: bool = False
  sandwich_norm: bool = False
  mlp_act: str = "silu"
  embed_scale: bool = False
  query_scale: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  rope_local_theta: float | None = None
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  arch: str = "llama"

  def __post_init__(self):
    name = jnp.dtype(self.dtype).name
    if name not in _DTYPES:
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
    object.__setattr__(self, "dtype", name)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of"
          f" n_kv_heads={self.n_kv_heads}"
      )
    if self.head_dim is None and self.dim % self.n_heads:
      raise ValueError(
          f"dim={self.dim} is not a multiple of n_heads={self.n_heads};"
          " set head_dim explicitly"
      )
    if self.attn_impl not in _ATTN_IMPLS:
      raise ValueError(
          f"attn_impl must be one of {_ATTN_IMPLS}, got {self.attn_impl!r}"
      )
    if self.loss_chunk < 0:
      raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
    if self.mlp_act not in _ACTIVATIONS:
      raise ValueError(
          f"mlp_act must be one of {sorted(_ACTIVATIONS)}, got {self.mlp_act!r}"
      )
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      bad = set(self.layer_types) - set(_LAYER_TYPES)
      if bad or len(self.layer_types) != self.n_layers:
        raise ValueError(
            f"layer_types must list {self.n_layers} entries from {_LAYER_TYPES},"
            f" got {self.layer_types}"
        )
      if "sliding_attention" in self.layer_types and not self.sliding_window:
        raise ValueError("layer_types has sliding layers but no sliding_window")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(
          self, "rope_scaling", tuple(sorted(self.rope_scaling.items()))
      )
    if self.rope_scaling is not None:
      kind = dict(self.rope_scaling).get("rope_type")
      if kind not in _ROPE_SCALINGS:
        raise ValueError(
            f"rope_scaling rope_type {kind!r} is not supported; supported:"
            f" {_ROPE_SCALINGS} (or none)"
        )
      missing = [k for k in _ROPE_KEYS[kind]
                 if dict(self.rope_scaling).get(k) is None]
      if missing:
        raise ValueError(
            f"rope_scaling rope_type {kind!r} needs {', '.join(missing)};"
            " add them to rope_scaling"
        )

  @property
  def mixed_attention(self) -> bool:
    """Whether sliding-window and full-attention layers alternate."""
    return self.layer_types is not None and len(set(self.layer_types)) > 1

  @property
  def static_window(self) -> int | None:
    """The sliding window when every layer slides, else ``None``."""
    if not self.sliding_window or self.mixed_attention:
      return None
    if self.layer_types is not None and self.layer_types[0] == "full_attention":
      return None
    return self.sliding_window

  def layer_is_sliding(self, i: int) -> bool:
    """Whether layer ``i`` uses the sliding window."""
    if self.layer_types is None:
      return bool(self.sliding_window)
    return self.layer_types[i] == "sliding_attention"

  @property
  def param_dtype(self) -> jnp.dtype:
    return jnp.dtype(_DTYPES[self.dtype])

  @property
  def head_size(self) -> int:
    return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

  def replace(self, **changes: Any) -> "LlamaConfig":
    """Returns a copy with ``changes`` applied."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
    """Returns the named entry of :data:`PRESETS`, with ``overrides`` applied."""
    if name not in PRESETS:
      raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  def num_params(self) -> int:
    """Number of parameters of the model this config describes."""
    hd = self.head_size
    attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
    layer += 2 * hd if self.qk_norm else 0
    layer += hd * (self.n_heads + 2 * self.n_kv_heads) if self.attn_bias else 0
    layer += 2 * self.dim if self.sandwich_norm else 0
    layer += 1 if self.mixed_attention else 0
    emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + emb + self.dim


PRESETS: dict[str, LlamaConfig] = {
    # Runs a train step on a laptop CPU in milliseconds; for tests.
    "tiny": LlamaConfig(
        vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
        hidden_dim=128, max_seq_len=64,
    ),
    # GPT-2 small's shape in the Llama architecture (tied head, MHA).
    "gpt2-small": LlamaConfig(
        vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
        hidden_dim=3072, max_seq_len=1024, tie_embeddings=True,
    ),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        hidden_dim=1536, rope_theta=1e5, norm_eps=1e-5, max_seq_len=2048,
        tie_embeddings=True,
    ),
    # Gemma 3 270M's text model (268.1M parameters, 168M of them the tied
    # embedding): every 6th layer full attention, the others a 512-token window.
    "gemma3-270m": LlamaConfig(
        vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1,
        head_dim=256, hidden_dim=2048, rope_theta=1e6, rope_local_theta=1e4,
        norm_eps=1e-6, max_seq_len=32768, tie_embeddings=True,
        query_scale=256 ** -0.5, sliding_window=512,
        layer_types=periodic_layer_types(18, 6), arch="gemma3",
        **_family("gemma3").flags,  # GeGLU, QK-norm, sandwich norms, ...
    ),
    # Llama 3.2 1B's shape (1.24B parameters, tied), with its llama3 RoPE scaling.
    "llama-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        hidden_dim=8192, rope_theta=5e5, norm_eps=1e-5, max_seq_len=131072,
        tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    # Qwen3-8B's shape (8.19B parameters), set up for memory-bound training.
    "qwen3-8b": LlamaConfig(
        vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8,
        head_dim=128, hidden_dim=12288, rope_theta=1e6, norm_eps=1e-6,
        max_seq_len=40960, tie_embeddings=False, dtype="bfloat16", remat=True,
        loss_chunk=1024, qk_norm=True,
    ),
}


def _normal(stddev: float = 0.02):
  return nnx.initializers.normal(stddev)


class RMSNorm(nnx.Module):
  """RMSNorm with float32 statistics; the output has the input's dtype.

  With ``unit_offset`` (Gemma) the scale is ``1 + w`` (``w`` starts at 0) and is
  applied in float32 before the cast, as Hugging Face's Gemma does.
  """

  def __init__(self, dim: int, *, eps: float, param_dtype: Any,
               unit_offset: bool = False):
    self.eps = eps
    self.unit_offset = unit_offset
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    if self.unit_offset:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    # HF Llama casts back before the scale; keeps bf16 numerics identical.
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


def _norm(dim: int, cfg: "LlamaConfig") -> RMSNorm:
  return RMSNorm(dim, eps=cfg.norm_eps, param_dtype=cfg.param_dtype,
                 unit_offset=cfg.norm_unit_offset)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Any = None
) -> np.ndarray:
  """Float32 RoPE inverse frequencies ``[head_dim // 2]``, scaled as configured.

  ``scaling`` is a mapping (or ``(key, value)`` pairs) with ``rope_type``
  ``"llama3"``, ``"linear"`` or ``"yarn"``, as in a Hugging Face
  ``config.json``. Computed with NumPy: they depend on the configuration only,
  so they enter a compiled program as constants.
  """
  inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling:
    sc = dict(scaling)
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":
      inv_freq = inv_freq / factor
    elif sc["rope_type"] == "yarn":
      # YaRN: frequencies that turn more than beta_fast times over the original
      # context are kept, fewer than beta_slow times are divided by `factor`,
      # with a linear ramp over the dimensions between.
      old = float(sc["original_max_position_embeddings"])
      fast, slow = float(sc.get("beta_fast") or 32), float(sc.get("beta_slow") or 1)

      def dim_of(turns):
        return head_dim * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

      low, high = dim_of(fast), dim_of(slow)
      if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
      low, high = max(low, 0), min(high, head_dim - 1)
      if low == high:
        high += 0.001  # as transformers does, against a zero-width ramp
      ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0, 1)
      inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    else:
      # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and
      # the band between is interpolated smoothly.
      low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
      old = float(sc["original_max_position_embeddings"])
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
      smooth = (old / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < old / high) & ~(wavelen > old / low)
      inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def _rope_attention_factor(scaling: Any) -> float:
  """YaRN's scale on ``cos`` and ``sin`` (so on attention logits, squared); else 1."""
  sc = dict(scaling or ())
  if sc.get("rope_type") != "yarn":
    return 1.0
  if sc.get("attention_factor") is not None:
    return float(sc["attention_factor"])
  factor = float(sc["factor"])

  def mscale(m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

  m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
  if m and m_all:
    return mscale(float(m)) / mscale(float(m_all))
  return mscale(1.0)


def rope_tables(
    positions: jax.Array | np.ndarray, head_dim: int, theta: float, scaling: Any = None
) -> tuple[jax.Array, jax.Array]:
  """Returns float32 ``(cos, sin)`` of shape ``[T, head_dim]`` (halves repeated).

  Both carry YaRN's attention factor when ``scaling`` is YaRN. NumPy
  ``positions`` (the training forward's ``0 .. T-1``) give NumPy tables:
  constants of the compiled program, instead of ``cos``/``sin`` evaluated in every
  layer's forward and again in its backward.
  """
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  xp = np if isinstance(positions, np.ndarray) else jnp
  angles = positions.astype(xp.float32)[:, None] * inv_freq[None, :]
  angles = xp.concatenate([angles, angles], axis=-1)
  cos, sin = xp.cos(angles), xp.sin(angles)
  factor = _rope_attention_factor(scaling)
  if factor != 1.0:
    cos, sin = cos * np.float32(factor), sin * np.float32(factor)
  return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on ``x`` of shape ``[B, T, H, head_dim]``."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  # Tables of shared positions are [T, head_dim]; per-row ones [B, T, head_dim].
  cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (
      cos[:, :, None, :], sin[:, :, None, :])
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# _flat_matmul_note: projections run on [B*T, D] rather than [B, T, D]. The
# weight gradient of a 3-D matmul contracts two axes, which XLA:CPU lowers to a
# slow path (about 2x slower backward on the MLP); 2-D is never worse on GPU.


def _linear(din: int, dout: int, cfg: LlamaConfig, rngs: nnx.Rngs,
            bias: bool = False) -> nnx.Linear:
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=cfg.param_dtype,
      param_dtype=cfg.param_dtype, kernel_init=_normal(), rngs=rngs,
  )


def _layer_rope(positions, head_dim: int, theta: float, scaling: Any,
                local_theta: float | None, *, mixed: bool,
                static_local: bool) -> dict[str, Any]:
  """The RoPE tables a layer reads: ``cos``/``sin``, plus ``cos_local``/``sin_local``
  for models that mix sliding and full layers.

  ``positions`` is ``[T]`` (tables ``[T, head_dim]``) or ``[B, T]`` (tables
  ``[B, T, head_dim]``).
  """
  shape = np.shape(positions)
  flat = positions.reshape(-1)

  def tables(theta, scaling=None):
    cos, sin = rope_tables(flat, head_dim, theta, scaling)
    return cos.reshape(*shape, -1), sin.reshape(*shape, -1)

  if mixed:
    cos, sin = tables(theta, scaling)
    cos_l, sin_l = tables(local_theta or theta)
    return {"cos": cos, "sin": sin, "cos_local": cos_l, "sin_local": sin_l}
  if static_local and local_theta:
    cos, sin = tables(local_theta)
  else:
    cos, sin = tables(theta, scaling)
  return {"cos": cos, "sin": sin}


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Each token's position within its segment: ``[B, T]`` int32, from 0 at a
  segment's first token (a run of equal ids; padding is a segment of its own)."""
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    hd = cfg.head_size
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
    self.rope_theta = cfg.rope_theta
    self.rope_scaling = cfg.rope_scaling
    self.rope_local_theta = cfg.rope_local_theta
    self.scale = (
        cfg.query_scale if cfg.query_scale is not None else 1.0 / math.sqrt(hd)
    )
    self.window = cfg.sliding_window
    self.static_window = cfg.static_window
    self.attn_impl = cfg.attn_impl
    b = cfg.attn_bias
    self.q_proj = _linear(cfg.dim, cfg.n_heads * hd, cfg, rngs, bias=b)
    self.k_proj = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg, rngs, bias=b)
    self.v_proj = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg, rngs, bias=b)
    self.o_proj = _linear(cfg.n_heads * hd, cfg.dim, cfg, rngs)
    if cfg.qk_norm:
      self.q_norm = _norm(hd, cfg)
      self.k_norm = _norm(hd, cfg)
    else:
      self.q_norm = self.k_norm = None
    # Per-layer data (not a static attribute), so stacked layers share a graph.
    self.sliding = (
        nnx.Param(jnp.ones((), jnp.float32)) if cfg.mixed_attention else None
    )

  def _is_sliding(self) -> jax.Array | None:
    if self.sliding is None:
      return None
    return jax.lax.stop_gradient(self.sliding[...]) > 0

  def _mask(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Bool ``[T, S]``: causal, and inside the window on sliding layers."""
    mask = k_pos[None, :] <= q_pos[:, None]
    in_window = q_pos[:, None] - k_pos[None, :] < (self.window or 0)
    if self.static_window:
      mask = mask & in_window
    elif self.sliding is not None:  # traced: not in place (mask may be NumPy)
      mask = mask & (in_window | ~self._is_sliding())
    return mask

  def _qkv(self, x: jax.Array, positions: jax.Array | None = None,
           tables: dict | None = None):
    """Projected, rotated q, k and v; RoPE from ``positions`` or ready ``tables``."""
    b, t, d = x.shape
    x = x.reshape(b * t, d)  # 2-D matmuls: see _flat_matmul_note
    q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if tables is None:
      tables = _layer_rope(positions, self.head_dim, self.rope_theta, self.rope_scaling,
                           self.rope_local_theta, mixed=self.sliding is not None,
                           static_local=bool(self.static_window))
    cos, sin = tables["cos"], tables["sin"]
    if "cos_local" in tables:
      sliding = self._is_sliding()
      cos = jnp.where(sliding, tables["cos_local"], cos)
      sin = jnp.where(sliding, tables["sin_local"], sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def _attend(self, q, k, v, mask):
    """Einsum attention; ``mask`` is bool ``[T, S]`` (True = attend)."""
    b, t, _, hd = q.shape
    groups = self.n_heads // self.n_kv_heads
    q = q.reshape(b, t, self.n_kv_heads, groups, hd)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
    ) * self.scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b * t, self.n_heads * hd)

  def _call_in_context(self, x: jax.Array, ctx: Mapping[str, jax.Array]) -> jax.Array:
    """Attention with per-row positions and mask (see :meth:`Llama.batch_context`)."""
    b, t, _ = x.shape
    q, k, v = self._qkv(x, tables=ctx)
    mask = ctx["mask"]  # [B, T, S]
    if "mask_window" in ctx:
      mask = (ctx["mask_window"] if self.sliding is None
              else jnp.where(self._is_sliding(), ctx["mask_window"], mask))
    if self.attn_impl == "einsum":
      out = self._attend(q, k, v, mask[:, None, None])
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=mask[:, None], scale=self.scale, implementation=self.attn_impl,
      ).reshape(b * t, self.n_heads * self.head_dim)
    return self.o_proj(out).reshape(b, t, -1)

  def __call__(self, x: jax.Array, ctx: Mapping[str, jax.Array] | None = None
               ) -> jax.Array:
    """Causal self-attention over ``x`` ``[B, T, D]``.

    Without ``ctx`` every row holds one sequence at positions ``0 .. T-1``. With
    ``ctx`` (from :meth:`Llama.batch_context`), each row's positions and attention
    mask come from its segments: padding and packed examples.
    """
    if ctx is not None:
      return self._call_in_context(x, ctx)
    b, t, _ = x.shape
    pos = np.arange(t)  # static positions: RoPE tables and mask are constants
    q, k, v = self._qkv(x, pos)
    if self.attn_impl == "einsum":
      out = self._attend(q, k, v, self._mask(pos, pos))
    elif self.window:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=self._mask(pos, pos)[None, None], scale=self.scale,
          implementation=self.attn_impl,
      ).reshape(b * t, self.n_heads * self.head_dim)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True, scale=self.scale,
          implementation=self.attn_impl,
      ).reshape(b * t, self.n_heads * self.head_dim)
    return self.o_proj(out).reshape(b, t, -1)

  def decode(
      self, x: jax.Array, start: jax.Array, cache: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attends ``x`` (positions ``start + arange(T)``) to a key/value cache.

    Args:
      x: ``[B, T, D]`` new tokens' hidden states.
      start: Scalar position of ``x[:, 0]``.
      cache: ``(k, v)``, each ``[B, S, n_kv_heads, head_dim]``; positions
        ``>= start`` may hold anything.

    Returns:
      The attention output and the cache with the new keys/values written.
    """
    t = x.shape[1]
    positions = start + jnp.arange(t)
    q, k, v = self._qkv(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k, start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v, start, axis=1)
    mask = self._mask(positions, jnp.arange(k_cache.shape[1]))
    out = self.o_proj(self._attend(q, k_cache, v_cache, mask))
    return out.reshape(x.shape[0], t, -1), (k_cache, v_cache)


class MLP(nnx.Module):
  """Gated feed-forward: ``down(act(gate(x)) * up(x))`` (SwiGLU or GeGLU)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.act = cfg.mlp_act
    self.gate_proj = _linear(cfg.dim, cfg.hidden_dim, cfg, rngs)
    self.up_proj = _linear(cfg.dim, cfg.hidden_dim, cfg, rngs)
    self.down_proj = _linear(cfg.hidden_dim, cfg.dim, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # 2-D matmuls: see _flat_matmul_note
    act = _ACTIVATIONS[self.act]
    y = self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
    return y.reshape(*shape[:-1], y.shape[-1])


class LlamaBlock(nnx.Module):
  """One pre-norm transformer layer: ``h + attn(norm(h))``, then ``+ mlp(norm(h))``.

  Calling the block applies ``jax.checkpoint`` when the config asks for remat,
  so callers that run layers one at a time get it too.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.remat = cfg.remat
    self.input_layernorm = _norm(cfg.dim, cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = _norm(cfg.dim, cfg)
    if cfg.sandwich_norm:
      self.pre_feedforward_layernorm = _norm(cfg.dim, cfg)
      self.post_feedforward_layernorm = _norm(cfg.dim, cfg)
    else:
      self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
    self.mlp = MLP(cfg, rngs=rngs)

  def _mlp_residual(self, h: jax.Array) -> jax.Array:
    if self.pre_feedforward_layernorm is None:
      return h + self.mlp(self.post_attention_layernorm(h))
    return h + self.post_feedforward_layernorm(
        self.mlp(self.pre_feedforward_layernorm(h)))

  def _attn_out(self, a: jax.Array) -> jax.Array:
    # Sandwich norm: post_attention_layernorm normalises the attention output.
    if self.pre_feedforward_layernorm is None:
      return a
    return self.post_attention_layernorm(a)

  def forward(self, h: jax.Array, ctx: Mapping[str, jax.Array] | None = None
              ) -> jax.Array:
    """The layer without remat (``ctx``: see :meth:`Llama.batch_context`)."""
    h = h + self._attn_out(self.self_attn(self.input_layernorm(h), ctx))
    return self._mlp_residual(h)

  def __call__(self, h: jax.Array, ctx: Mapping[str, jax.Array] | None = None
               ) -> jax.Array:
    if not self.remat:
      return self.forward(h, ctx)
    graphdef, state = nnx.split(self)
    # Pure function of the block's state, so jax.checkpoint sees plain arrays.
    run = jax.checkpoint(lambda s, x, c: nnx.merge(graphdef, s).forward(x, c))
    return run(state, h, ctx)

  def decode(self, h, start, cache):
    """Incremental forward with a key/value cache (see :meth:`Attention.decode`)."""
    a, cache = self.self_attn.decode(self.input_layernorm(h), start, cache)
    h = h + self._attn_out(a)
    return self._mlp_residual(h), cache


def layer_flags(cfg: LlamaConfig) -> jax.Array:
  """The ``self_attn.sliding`` values of the layers: +1 sliding, -1 full."""
  return jnp.asarray(
      [1.0 if cfg.layer_is_sliding(i) else -1.0 for i in range(cfg.n_layers)],
      jnp.float32,
  )


class Llama(nnx.Module):
  """Llama-family causal language model (see the module docstring)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.dim, dtype=cfg.param_dtype,
        param_dtype=cfg.param_dtype, embedding_init=_normal(), rngs=rngs,
    )
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layers)
      def make_stack(r: nnx.Rngs) -> LlamaBlock:
        return LlamaBlock(cfg, rngs=r)

      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List(
          [LlamaBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
      )
    if cfg.mixed_attention:
      flags = layer_flags(cfg)
      if cfg.scan_layers:
        self.layers.self_attn.sliding.set_value(flags)
      else:
        for layer, flag in zip(self.layers, flags):
          layer.self_attn.sliding.set_value(flag)
    self.norm = _norm(cfg.dim, cfg)
    if cfg.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

  @property
  def n_layers(self) -> int:
    return self.config.n_layers

  @property
  def stacked(self) -> bool:
    """Whether ``layers`` is one block with stacked (leading-axis) leaves."""
    return self.config.scan_layers

  # -- pieces, for the training step ---------------------------------------------

  def layer_cut(self) -> LayerCut:
    """Where the training step cuts the model: an :class:`absign_jax.LayerCut`.

    Either layout: :func:`absign_jax.split_nnx` stacks list layers for training,
    so both run the one dynamic-index program. Batches are ``{"inputs",
    "targets", "mask"}``, with ``"segment_ids"`` for padded or packed rows (see
    :meth:`batch_context`, computed once per step). A layer runs its ``forward``
    (no remat): the step keeps or recomputes the layers above the active one
    itself.
    """
    from absign_jax.train.model import LayerCut  # pylint: disable=g-import-not-at-top,redefined-outer-name

    return LayerCut(
        embed=lambda m, batch: m.embed(batch["inputs"]),
        head_loss=lambda m, h, batch: m.head_loss(
            h, batch["targets"], batch.get("mask")),
        layers="layers",
        layer=lambda block, h, ctx: block.forward(h, ctx),
        context=lambda m, batch: m.batch_context(batch),
    )

  def batch_context(self, batch: Mapping[str, Any]) -> dict[str, jax.Array] | None:
    """What every layer reads from ``batch`` besides the hidden state, or None.

    A batch whose rows hold one sequence each at positions ``0 .. T-1`` needs
    nothing (None: the layers use constant RoPE tables and a causal mask). A batch
    with ``"segment_ids"`` (int ``[B, T]``: equal ids mark one example, runs of
    them may follow each other; padding is an id of its own, conventionally 0)
    gets per-row tables and masks: each token attends causally within its own
    segment, at its position in that segment, so left padding and packed examples
    compute what each example alone would.

    Returns:
      None, or ``{"cos", "sin"[, "cos_local", "sin_local"], "mask"[,
      "mask_window"]}``: RoPE tables ``[B, T, head_dim]`` and bool attention masks
      ``[B, T, T]`` (``mask_window`` also limits sliding-window layers).
    """
    if "segment_ids" not in batch:
      return None
    cfg = self.config
    seg = jnp.asarray(batch["segment_ids"])
    if seg.shape != np.shape(batch["inputs"]):
      raise ValueError(f"segment_ids has shape {seg.shape}, the inputs "
                       f"{np.shape(batch['inputs'])}: give one segment id per input "
                       f"token.")
    t = seg.shape[-1]
    ctx = _layer_rope(segment_positions(seg), cfg.head_size, cfg.rope_theta,
                      cfg.rope_scaling, cfg.rope_local_theta,
                      mixed=cfg.mixed_attention, static_local=bool(cfg.static_window))
    idx = np.arange(t)
    causal = idx[None, :] <= idx[:, None]
    ctx["mask"] = (seg[:, :, None] == seg[:, None, :]) & causal
    if cfg.static_window or cfg.mixed_attention:
      # Within one segment, index distance is position distance.
      ctx["mask_window"] = ctx["mask"] & (idx[:, None] - idx[None, :]
                                          < cfg.sliding_window)
    return ctx

  def embed(self, inputs: jax.Array) -> jax.Array:
    """Token ids ``[B, T]`` to hidden states ``[B, T, D]`` (param dtype)."""
    h = self.embed_tokens(inputs)
    if self.config.embed_scale:
      h = h * jnp.asarray(math.sqrt(self.config.dim), h.dtype)
    return h

  def run_layers(
      self, h: jax.Array, start: int = 0, stop: int | None = None,
      ctx: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array:
    """Runs layers ``start .. stop-1`` (static bounds) on ``h`` (``ctx``: see
    :meth:`batch_context`)."""
    stop = self.n_layers if stop is None else stop
    if start >= stop:
      return h
    if not self.stacked:
      for i in range(start, stop):
        h = self.layers[i](h, ctx)
      return h
    graphdef, state = nnx.split(self.layers)
    if (start, stop) != (0, self.n_layers):
      state = jax.tree.map(lambda x: x[start:stop], state)

    def body(carry, layer_state):
      return nnx.merge(graphdef, layer_state)(carry, ctx), None

    h, _ = jax.lax.scan(body, h, state)
    return h

  def _head_weight(self) -> jax.Array:
    """The output projection as stored: ``[V, D]`` when tied, else ``[D, V]``."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...]
    return self.lm_head.kernel[...]

  def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [N, D]`` times the head ``w`` (from ``_head_weight``): float32 ``[N, V]``.

    A tied head contracts the embedding's D axis directly instead of multiplying by
    ``embedding.T``, leaving the operand layout to XLA (on XLA:CPU the compiled
    sizes came out the same either way).
    """
    contract = 1 if self.lm_head is None else 0
    return jax.lax.dot_general(x, w, (((1,), (contract,)), ((), ())),
                               preferred_element_type=jnp.float32)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm and head; float32 logits ``[..., V]``."""
    w = self._head_weight()
    x = self.norm(h).astype(w.dtype).reshape(-1, h.shape[-1])
    logits = self._project(x, w)
    return logits.reshape(*h.shape[:-1], logits.shape[-1])

  def head_loss(
      self, h: jax.Array, targets: jax.Array, mask: jax.Array | None = None
  ) -> jax.Array:
    """Mean float32 cross-entropy of the head applied to ``h``.

    Args:
      h: ``[B, T, D]`` output of the last layer.
      targets: int32 ``[B, T]`` next-token ids.
      mask: ``[B, T]`` per-token weights (usually 0/1); ``None`` means ones.

    Returns:
      ``sum(nll * mask) / sum(mask)`` (0 when the mask is empty). With
      ``config.loss_chunk > 0`` the tokens are processed in rematerialised
      chunks, so only ``[chunk, V]`` logits exist at a time, in the forward
      and in the backward pass.
    """
    d = h.shape[-1]
    h = h.reshape(-1, d)
    targets = targets.reshape(-1).astype(jnp.int32)
    mask = (
        jnp.ones(targets.shape, jnp.float32)
        if mask is None
        else mask.reshape(-1).astype(jnp.float32)
    )
    w = self._head_weight()
    norm_graphdef, norm_state = nnx.split(self.norm)

    def chunk_nll_sum(w, norm_state, h, targets, mask):
      x = nnx.merge(norm_graphdef, norm_state)(h).astype(w.dtype)
      logits = self._project(x, w)
      logz = jax.nn.logsumexp(logits, axis=-1)
      tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
      return jnp.sum((logz - tgt) * mask)

    n, chunk = h.shape[0], self.config.loss_chunk
    if chunk <= 0 or chunk >= n:
      total = chunk_nll_sum(w, norm_state, h, targets, mask)
    else:
      pad = (-n) % chunk
      h = jnp.pad(h, ((0, pad), (0, 0)))
      targets = jnp.pad(targets, (0, pad))
      mask_p = jnp.pad(mask, (0, pad))  # padded tokens carry zero weight
      xs = (
          h.reshape(-1, chunk, d),
          targets.reshape(-1, chunk),
          mask_p.reshape(-1, chunk),
      )
      step = jax.checkpoint(chunk_nll_sum)

      def body(acc, x):
        return acc + step(w, norm_state, *x), None

      total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total / jnp.maximum(jnp.sum(mask), 1e-9)

  # -- whole-model API ---------------------------------------------------------

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Token ids ``[B, T]`` to float32 logits ``[B, T, V]``."""
    return self.logits(self.run_layers(self.embed(inputs)))

  def loss(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean cross-entropy of ``batch = {"inputs", "targets", "mask"}`` (and
    ``"segment_ids"`` for padded or packed rows, see :meth:`batch_context`)."""
    h = self.run_layers(self.embed(batch["inputs"]), ctx=self.batch_context(batch))
    return self.head_loss(h, batch["targets"], batch.get("mask"))

  def decode(
      self, inputs: jax.Array, start: jax.Array, caches: Any
  ) -> tuple[jax.Array, Any]:
    """Incremental forward: float32 logits of ``inputs`` and updated caches.

    ``caches`` comes from :meth:`init_cache`; ``inputs`` sit at positions
    ``start .. start + T - 1``.
    """
    h, caches = self.decode_hidden(inputs, start, caches)
    return self.logits(h), caches

  def decode_hidden(
      self, inputs: jax.Array, start: jax.Array, caches: Any
  ) -> tuple[jax.Array, Any]:
    """Like :meth:`decode` but returns the last layer's hidden states."""
    h = self.embed(inputs)
    if self.stacked:
      graphdef, state = nnx.split(self.layers)

      def body(carry, xs):
        layer_state, cache = xs
        carry, cache = nnx.merge(graphdef, layer_state).decode(carry, start, cache)
        return carry, cache

      return jax.lax.scan(body, h, (state, caches))
    new = []
    for layer, cache in zip(self.layers, caches):
      h, cache = layer.decode(h, start, cache)
      new.append(cache)
    return h, new

  def init_cache(self, batch: int, length: int) -> Any:
    """Zeroed key/value caches for :meth:`decode`."""
    cfg = self.config
    shape = (batch, length, cfg.n_kv_heads, cfg.head_size)
    if self.stacked:
      z = jnp.zeros((cfg.n_layers, *shape), cfg.param_dtype)
      return (z, z)
    z = jnp.zeros(shape, cfg.param_dtype)
    return [(z, z) for _ in range(cfg.n_layers)]


def eval_loss(
    model: Llama, batches: Iterable[Mapping[str, Any]]
) -> float:
  """Token-weighted mean loss of ``model`` over ``batches`` (jitted per shape).

  ``exp`` of the result is the perplexity.
  """
  graphdef, state = nnx.split(model)
  total, weight = 0.0, 0.0
  for batch in batches:
    w = float(np.sum(batch["mask"]))
    if w == 0:
      continue
    total += float(_eval_step(graphdef, state, dict(batch))) * w
    weight += w
  if weight == 0:
    raise ValueError("no tokens with mask > 0 to evaluate")
  return total / weight


@functools.partial(jax.jit, static_argnames="graphdef")
def _eval_step(graphdef, state, batch):
  return nnx.merge(graphdef, state).loss(batch)
