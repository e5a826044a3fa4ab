"""Hugging Face checkpoint directories: ``config.json``, safetensors, tokenizer.

Reads (:func:`load_hf`) and writes (:func:`save_hf`) the layout
``transformers`` uses for the supported families (each described by its module
in :mod:`absign_jax.llm.families`):

==================================  ===========================================
``architectures``                   what the model turns on
==================================  ===========================================
LlamaForCausalLM                    Llama 1-3 (``rope_type: llama3`` scaling),
                                    SmolLM2
MistralForCausalLM                  optional ``sliding_window``
Qwen2ForCausalLM                    q/k/v biases
Qwen3ForCausalLM                    q/k-norm, its own ``head_dim``
Gemma3ForCausalLM,                  sliding/full alternation with two RoPE
Gemma3ForConditionalGeneration      bases, q/k-norm, sandwich norms, GeGLU,
(its text part)                     ``sqrt(d)``-scaled embeddings, (1 + w) norms
==================================  ===========================================

The keys every family shares are read here; a family's own keys by its
``from_hf`` (and written by its ``to_hf``).

RoPE is read from either form transformers writes: 4.x's ``rope_theta`` and
``rope_scaling`` (Gemma 3: plus ``rope_local_base_freq`` for the sliding
layers) or 5.x's ``rope_parameters`` (Gemma 3: one dict per layer type); where
a config has both, they must agree. Types ``default``, ``linear``, ``llama3``
and ``yarn`` are supported (sliding layers: ``default`` only); the export
writes both forms, so transformers 4.x and 5.x read it alike.

Weights are read tensor by tensor from memory-mapped safetensors files
(one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)
and converted straight to the target dtype; the reader is a few lines over
``np.memmap`` because safetensors' NumPy API cannot return bfloat16.
Linear weights are stored ``[out, in]`` there and ``[in, out]`` in the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from absign_jax.llm import families
from absign_jax.llm import weights
from absign_jax.llm.families import Family
from absign_jax.llm.model import Llama, LlamaConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SafetensorsFile",
    "save_safetensors",
    "config_from_hf",
    "hf_config",
    "hf_tensor_name",
    "is_hf_dir",
    "load_hf",
    "save_hf",
    "check_replaceable",
    "atomic_output",
]

# architectures entry -> family (LlamaConfig.arch)
SUPPORTED_ARCHITECTURES = {a: f.name for a, f in families.HF_ARCHITECTURES.items()}

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LAYER_TYPES = ("full_attention", "sliding_attention")


# -- safetensors -------------------------------------------------------------------


class SafetensorsFile:
  """A memory-mapped ``.safetensors`` file; :meth:`get` returns zero-copy views.

  Raises on construction when the header is malformed or the file is shorter
  than its header says (a truncated download).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 "
                         "bytes); download it again")
      n = int.from_bytes(head, "little")
      if n > size - 8:
        raise ValueError(
            f"{self.path}: truncated safetensors file (header of {n} bytes, file"
            f" of {size}); download it again")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{self.path}: not a safetensors file (unreadable header:"
                         f" {e}); download it again") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._offset = 8 + n
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if self._offset + end > size:
      raise ValueError(
          f"{self.path}: truncated safetensors file (its tensors need"
          f" {self._offset + end} bytes, the file has {size}); download it again")
    self._map = (np.memmap(self.path, np.uint8, mode="r") if size > self._offset
                 else np.zeros(0, np.uint8))

  def keys(self) -> list[str]:
    return list(self._header)

  def __contains__(self, name: str) -> bool:
    return name in self._header

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def dtype(self, name: str) -> str:
    return self._header[name]["dtype"]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only view of the mapped file."""
    info = self._header[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which"
                       f" this reader does not handle ({sorted(_ST_DTYPES)})")
    start, stop = (self._offset + int(o) for o in info["data_offsets"])
    dtype = _ST_DTYPES[info["dtype"]]
    return self._map[start:stop].view(dtype).reshape(info["shape"])


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` (NumPy, bfloat16 via ml_dtypes) as one safetensors file."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  arrays = {}
  for name, x in tensors.items():
    x = np.ascontiguousarray(x)
    if x.dtype not in _ST_NAMES:
      raise ValueError(f"tensor {name}: dtype {x.dtype} cannot be written")
    header[name] = {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape),
                    "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
    arrays[name] = x
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * ((-len(raw)) % 8)  # align the data to 8 bytes
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for x in arrays.values():
      f.write(x.tobytes())


# -- config ------------------------------------------------------------------------


def is_hf_dir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path)


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _rope_entry(params: Any, where: str,
                source: str) -> tuple[float | None, dict[str, Any] | None]:
  """``(rope_theta or None, scaling dict or None)`` of one RoPE parameter dict."""
  p = dict(params or {})
  kind = p.pop("rope_type", None) or p.pop("type", None) or "default"
  p.pop("type", None)
  theta = p.pop("rope_theta", None)
  partial = p.pop("partial_rotary_factor", None)
  if partial is not None and float(partial) != 1.0:
    raise ValueError(f"{source}: {where} partial_rotary_factor {partial} is not"
                     " supported; only full rotary embeddings (1.0) are")
  if kind not in _ROPE_TYPES:
    raise ValueError(f"{source}: {where} rope_type {kind!r} is not supported;"
                     f" supported: {', '.join(_ROPE_TYPES)}")
  return (None if theta is None else float(theta),
          None if kind == "default" else {"rope_type": kind, **p})


def _agreed(values: list[tuple[str, Any]], default: Any, source: str) -> Any:
  """The one value the named sources give (``default`` if none); raises on a conflict."""
  for name, value in values[1:]:
    if value != values[0][1]:
      raise ValueError(f"{source}: {values[0][0]} ({values[0][1]}) and {name} ({value})"
                       " disagree; remove one of them or make them equal")
  return values[0][1] if values else default


def _rope_from_hf(c: Mapping[str, Any], family: Family, max_pos: int,
                  source: str) -> dict[str, Any]:
  """RoPE fields of :class:`LlamaConfig` from a (text) ``config.json`` dict.

  Reads both the transformers 4.x keys (``rope_theta``, ``rope_scaling``,
  ``rope_local_base_freq``) and 5.x's ``rope_parameters`` (keyed by layer type
  for a family with ``rope_by_layer_type``); where both are present they must
  agree.
  """
  params = c.get("rope_parameters") or {}
  nested = any(k in _LAYER_TYPES for k in params)
  if family.rope_by_layer_type:
    if params and not (nested and set(params) <= set(_LAYER_TYPES)):
      raise ValueError(
          f"{source}: {family.name} rope_parameters must be keyed by layer type"
          f" ({', '.join(_LAYER_TYPES)}), got keys {sorted(params)}")
    kinds = _LAYER_TYPES
  elif nested:
    raise ValueError(f"{source}: rope_parameters keyed by layer type is not supported"
                     f" for {family.name}; give one rope_parameters dict for every"
                     " layer")
  else:
    params, kinds = {"full_attention": params}, ("full_attention",)
  legacy = {"full_attention": ("rope_theta", c.get("rope_theta")),
            "sliding_attention": ("rope_local_base_freq", c.get("rope_local_base_freq"))}
  defaults = {"full_attention": family.rope_theta,
              "sliding_attention": family.rope_local_theta}
  out = {}
  for kind in kinds:
    where = f"rope_parameters.{kind}" if family.rope_by_layer_type else "rope_parameters"
    thetas, scalings = [], []
    key, value = legacy[kind]
    if value is not None:
      thetas.append((key, float(value)))
    if kind == "full_attention" and c.get("rope_scaling"):
      theta, scaling = _rope_entry(c["rope_scaling"], "rope_scaling", source)
      if theta is not None:
        thetas.append(("rope_scaling.rope_theta", theta))
      scalings.append(("rope_scaling", scaling))
    if params.get(kind):
      theta, scaling = _rope_entry(params[kind], where, source)
      if theta is not None:
        thetas.append((f"{where}.rope_theta", theta))
      scalings.append((where, scaling))
    theta = _agreed(thetas, defaults[kind], source)
    scaling = _agreed(scalings, None, source)
    if scaling and kind == "sliding_attention":
      raise ValueError(f"{source}: {where} rope_type {scaling['rope_type']!r} is not"
                       " supported on sliding layers; only default RoPE is")
    if scaling and scaling["rope_type"] in ("llama3", "yarn"):
      # transformers' defaults: the pretraining context is the model's, and
      # YaRN's factor is the context's growth over it.
      scaling.setdefault("original_max_position_embeddings", max_pos)
      if scaling["rope_type"] == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    if kind == "full_attention":
      out.update(rope_theta=theta, rope_scaling=scaling)
    else:
      out["rope_local_theta"] = theta
  return out


def config_from_hf(config: Mapping[str, Any], *, source: str = "config.json",
                   **overrides: Any) -> LlamaConfig:
  """:class:`LlamaConfig` from a Hugging Face ``config.json`` dict."""
  archs = list(config.get("architectures") or [])
  known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
  if not known:
    raise ValueError(
        f"{source}: architectures {archs} is not supported; supported:"
        f" {', '.join(SUPPORTED_ARCHITECTURES)}")
  family = families.for_hf_architecture(known[0])
  text = (config.get("text_config") or config) if family.hf_text_config else config
  c = {**family.hf_defaults, **dict(text)}

  def need(key):
    if key not in c:
      raise ValueError(f"{source}: {key} is missing")
    return c[key]

  def unsupported(what):
    return ValueError(f"{source}: {what} is not supported by this loader")

  dim, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
  head_dim = c.get("head_dim") or dim // n_heads
  cfg = dict(
      arch=family.name, vocab_size=int(need("vocab_size")), dim=dim,
      n_layers=int(need("num_hidden_layers")), n_heads=n_heads,
      n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
      hidden_dim=int(need("intermediate_size")),
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      max_seq_len=int(c.get("max_position_embeddings", 2048)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      head_dim=int(head_dim) if head_dim * n_heads != dim else None,
  )
  if c.get("mlp_bias"):
    raise unsupported("mlp_bias")
  if c.get("attention_bias") and not family.flags.get("attn_bias"):
    raise unsupported("attention_bias (o_proj bias)")
  cfg.update(_rope_from_hf(c, family, cfg["max_seq_len"], source))
  act_key = "hidden_activation" if c.get("hidden_activation") else "hidden_act"
  act = c.get("hidden_activation") or c.get("hidden_act", "silu")
  if act not in family.hf_activations:
    raise unsupported(f"{act_key} {act!r}")
  cfg.update(family.flags)
  if family.from_hf is not None:
    cfg.update(family.from_hf(c, unsupported))
  cfg.update(overrides)
  return LlamaConfig(**cfg)


def hf_config(cfg: LlamaConfig, *, torch_dtype: str = "float32",
              bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
  """The ``config.json`` dict of ``cfg`` (inverse of :func:`config_from_hf`)."""
  family = families.family(cfg.arch)
  c: dict[str, Any] = {
      "architectures": [family.hf_architectures[0]],
      "model_type": family.hf_model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_size, "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": cfg.tie_embeddings,
      "torch_dtype": torch_dtype, "attention_dropout": 0.0,
  }
  # RoPE in both forms: transformers 5.x reads rope_parameters, 4.x the legacy
  # keys (5.x reads those too, and config_from_hf checks that they agree).
  scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})}
  c.update(rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=full)
  if family.rope_by_layer_type:
    local = cfg.rope_local_theta or cfg.rope_theta
    c.update(rope_local_base_freq=local, rope_parameters={
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": local}})
  if bos_id is not None:
    c["bos_token_id"] = bos_id
  if eos_id is not None:
    c["eos_token_id"] = eos_id
  if family.to_hf is not None:
    family.to_hf(cfg, c)
  return c


# -- tensor names ------------------------------------------------------------------


def hf_tensor_name(path: tuple, layer: int | None, prefix: str = "model.") -> str:
  """Hugging Face name of our parameter ``path`` (inside ``layer`` if given)."""
  *mods, leaf = path
  if mods == ["lm_head"]:
    return "lm_head.weight"
  if mods == ["embed_tokens"]:
    return prefix + "embed_tokens.weight"
  base = ".".join(str(m) for m in mods)
  if layer is not None:
    base = f"layers.{layer}.{base}"
  return prefix + base + (".bias" if leaf == "bias" else ".weight")


def _transposed(path: tuple) -> bool:
  return path[-1] == "kernel"


class _Tensors:
  """Name -> file over one file or a sharded set, with clear errors."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map; the index is malformed")
      files = {}
      for fname in sorted(set(weight_map.values())):
        fpath = os.path.join(directory, fname)
        if not os.path.isfile(fpath):
          raise FileNotFoundError(
              f"{fpath}: shard listed in {index} is missing; download it")
        files[fname] = SafetensorsFile(fpath)
      self.where = {}
      for name, fname in weight_map.items():
        if name not in files[fname]:
          raise ValueError(f"{index}: tensor {name} is listed in {fname}, which"
                           " does not hold it; the shard set is inconsistent")
        self.where[name] = files[fname]
    elif os.path.isfile(single):
      f = SafetensorsFile(single)
      self.where = {name: f for name in f.keys()}
    else:
      raise FileNotFoundError(
          f"{directory}: no model.safetensors or model.safetensors.index.json;"
          " a Hugging Face checkpoint directory needs its safetensors weights"
          " (PyTorch .bin files are not read)")
    self.used: set[str] = set()

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    f = self.where.get(name)
    if f is None:
      raise ValueError(f"{self.directory}: tensor {name} is missing; the weights"
                       " do not match config.json")
    if f.shape(name) != tuple(shape):
      raise ValueError(
          f"{f.path}: tensor {name} has shape {f.shape(name)}, config.json implies"
          f" {tuple(shape)}; the weights do not match config.json")
    if f.dtype(name) not in ("F32", "F16", "BF16", "F64"):
      raise ValueError(f"{f.path}: tensor {name} has dtype {f.dtype(name)}, expected"
                       " a float type (F32, F16, BF16)")
    self.used.add(name)
    return f.get(name)


def _prefix(names: Iterable[str], family: Family) -> str:
  """The prefix of the text model's tensor names (the family's first by default)."""
  names = set(names)
  for p in family.hf_tensor_prefixes:
    if p + "embed_tokens.weight" in names:
      return p
  return family.hf_tensor_prefixes[0]


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = "float32",
    scan_layers: bool = False,
    remat: bool = False,
    loss_chunk: int = 0,
    max_seq_len: int | None = None,
    sharding: Any = None,
) -> tuple[LlamaConfig, Llama, dict[str, Any]]:
  """Reads a Hugging Face checkpoint directory into a :class:`Llama`.

  Args:
    path: Directory with ``config.json`` and ``model.safetensors`` (or a
      sharded set with ``model.safetensors.index.json``).
    dtype: Parameter dtype, ``"float32"`` or ``"bfloat16"``.
    scan_layers: Build the stacked layout.
    remat: Checkpoint every layer.
    loss_chunk: Chunk size of the cross-entropy (0 = unchunked).
    max_seq_len: Override of ``max_position_embeddings``.
    sharding: Where each parameter goes (see
      :func:`absign_jax.llm.weights.model_from_arrays`).

  Returns:
    ``(config, model, info)``; ``info["config"]`` is the ``config.json`` dict.

  Raises:
    FileNotFoundError: No directory, no ``config.json``, or missing weights.
    ValueError: Unsupported architecture, missing/extra tensors, shapes that
      disagree with the config, a truncated file.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"{path}: no config.json; pass a Hugging Face checkpoint directory"
        " (config.json, model*.safetensors, tokenizer.json) or a .gguf file")
  config = _read_json(config_path)
  overrides = dict(dtype=dtype, scan_layers=scan_layers, remat=remat,
                   loss_chunk=loss_chunk)
  if max_seq_len is not None:
    overrides["max_seq_len"] = max_seq_len
  cfg = config_from_hf(config, source=config_path, **overrides)
  family = families.family(cfg.arch)
  tensors = _Tensors(path)
  prefix = _prefix(tensors.where, family)
  if cfg.tie_embeddings and "lm_head.weight" in tensors.where:
    # Some exporters store the tied head anyway; it must equal the embedding.
    tensors.used.add("lm_head.weight")

  def get(p, layer, shape):
    name = hf_tensor_name(p, layer, prefix)
    if _transposed(p):
      return tensors.get(name, tuple(reversed(shape))).T
    return tensors.get(name, shape)

  model = weights.model_from_arrays(cfg, get, sharding=sharding)
  extra = sorted(n for n in tensors.where if n not in tensors.used
                 and not n.startswith(family.hf_ignored_prefixes))
  if extra:
    raise ValueError(
        f"{path}: tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} are not"
        f" part of a {cfg.arch} model with this config.json; the weights do not"
        " match config.json")
  return cfg, model, {"config": config, "path": path}


# What a Hugging Face model folder holds (an export of ours, a downloaded model): a
# folder of only these is replaced whole by save_hf; any other entry stops it.
_MODEL_FOLDER_FILE = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
    r"|tokenizer\.model|vocab\.json|merges\.txt")


def check_replaceable(out_dir: str | os.PathLike) -> None:
  """Raises ``ValueError`` unless :func:`save_hf` may write ``out_dir``.

  It may when ``out_dir`` is absent, or a folder holding only the files of a
  Hugging Face model folder (:data:`_MODEL_FOLDER_FILE`), which the export replaces
  whole; not when it is a file, a link, or a folder with anything else in it.
  """
  out_dir = os.fspath(out_dir)
  if not os.path.lexists(out_dir):
    return
  if os.path.islink(out_dir) or not os.path.isdir(out_dir):
    kind = "a symbolic link" if os.path.islink(out_dir) else "a file"
    raise ValueError(f"{out_dir} is {kind}, not a model folder; move it away or "
                     "export elsewhere")
  other = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(out_dir)
                 if not (e.is_file(follow_symlinks=False)
                         and _MODEL_FOLDER_FILE.fullmatch(e.name)))
  if other:
    shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5
                                    else "")
    raise ValueError(f"{out_dir} holds files that are no part of a model folder "
                     f"({shown}); an export replaces the folder whole, so move them "
                     "away or export elsewhere")


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # another user's process
    return True
  return True


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    with contextlib.suppress(OSError):
      os.remove(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """A temporary path next to ``path`` that takes its place when the block ends.

  Write the file or folder at the yielded path (in ``path``'s folder, so on its file
  system); when the block ends without an exception it is renamed to ``path``,
  replacing what was there whole. On any exception, Ctrl-C included, it is removed
  and ``path`` is left as it was (a folder being replaced is moved aside and back,
  so an interruption at that moment can leave no folder, never a partial one).
  The next call for ``path`` tidies up after a killed process: it removes its
  ``.NAME.tmp-PID-*`` and puts a ``.NAME.old-PID-*`` it moved aside back in place.
  """
  path = os.path.abspath(os.fspath(path))
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  stale = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)-[0-9a-f]+")
  for entry in sorted(os.listdir(parent)):
    m = stale.fullmatch(entry)
    if m and not _process_alive(int(m.group(2))):
      if m.group(1) == "old" and not os.path.lexists(path):  # killed mid-swap
        os.rename(os.path.join(parent, entry), path)
      else:
        _remove(os.path.join(parent, entry))
  tag = f"{os.getpid()}-{secrets.token_hex(4)}"
  tmp = os.path.join(parent, f".{base}.tmp-{tag}")
  try:
    yield tmp
    if os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
      old = os.path.join(parent, f".{base}.old-{tag}")
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        if not os.path.lexists(path):
          os.rename(old, path)
        raise
      _remove(old)
    else:  # (the OS refuses a file over a folder and a folder over a file)
      os.replace(tmp, path)
  finally:
    _remove(tmp)


def save_hf(model: Llama, out_dir: str | os.PathLike, *, dtype: Any = None,
            tokenizer: Any = None, max_shard_bytes: int = 4 << 30) -> str:
  """Writes ``model`` (and ``tokenizer``) as a Hugging Face checkpoint directory.

  The folder is written next to ``out_dir`` and then moved into place
  (:func:`atomic_output`): an earlier model folder at ``out_dir`` is replaced
  whole (no shard or index of it stays), and an interrupted write leaves the
  earlier folder, never a partial one.

  Args:
    model: The model (either layout).
    out_dir: Directory to create or replace (see :func:`check_replaceable`).
    dtype: Weight dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
      ``None`` keeps the model's.
    tokenizer: A :class:`absign_jax.llm.tokenizer.Tokenizer`; writes
      ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template).
    max_shard_bytes: Above this, weights are split into shards with an index.

  Returns:
    ``out_dir``.

  Raises:
    ValueError: ``out_dir`` is a file, a link, or a folder with other files.
  """
  out_dir = os.fspath(out_dir)
  check_replaceable(out_dir)
  with atomic_output(out_dir) as tmp:
    os.mkdir(tmp)
    _write_hf_dir(model, tmp, dtype=dtype, tokenizer=tokenizer,
                  max_shard_bytes=max_shard_bytes)
  return out_dir


def _write_hf_dir(model: Llama, out_dir: str, *, dtype: Any, tokenizer: Any,
                  max_shard_bytes: int) -> None:
  """The files of :func:`save_hf`, written into the existing folder ``out_dir``."""
  cfg = model.config
  np_dtype = np.dtype(ml_dtypes.bfloat16 if str(dtype or cfg.dtype) == "bfloat16"
                      else (dtype or cfg.dtype))
  tensors: dict[str, np.ndarray] = {}

  def add(p, layer, x):
    if p[-1] == "sliding":
      return
    x = np.asarray(x)
    if _transposed(p):
      x = x.T
    tensors[hf_tensor_name(p, layer)] = np.ascontiguousarray(x.astype(np_dtype))

  for key, layer, x in weights.named_tensors(model):
    add(key, layer, x)
  total = sum(x.nbytes for x in tensors.values())
  meta = {"format": "pt"}
  if total <= max_shard_bytes:
    save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, meta)
  else:
    shards, cur, size = [], {}, 0
    for name, x in tensors.items():
      if cur and size + x.nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[name] = x
      size += x.nbytes
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      save_safetensors(os.path.join(out_dir, fname), shard, meta)
      weight_map.update({name: fname for name in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                indent=2)
  config = hf_config(cfg, torch_dtype=np_dtype.name,
                     bos_id=getattr(tokenizer, "bos_id", None),
                     eos_id=getattr(tokenizer, "eos_id", None))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_hf(out_dir)
