"""RoPE in Hugging Face configs: every form transformers 4.x and 5.x write.

``fixtures/hf_configs/v4`` and ``v5`` hold ``config.json`` files that
transformers 4.57.6 and 5.25.0 wrote (``generate.py`` there remakes them);
reading them needs neither torch nor transformers. Where both are installed,
tiny random models built by transformers itself load here to its logits, and
our exports load back in transformers to the same logits.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from absign_jax.llm import hf as H
from absign_jax.llm import model as M

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_configs")
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
LINEAR8 = dict(rope_type="linear", factor=8.0)

# fixture -> (rope_theta, rope_local_theta, rope_scaling)
EXPECTED = {
    "llama_theta5e5": (5e5, None, None),
    "llama3_scaling": (5e5, None, LLAMA3),
    "llama_linear2": (1e4, None, dict(rope_type="linear", factor=2.0)),
    "llama_yarn": (1e4, None, dict(rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=4096)),
    "mistral_theta1e6": (1e6, None, None),
    "qwen2_theta1e6": (1e6, None, None),
    "qwen2_yarn": (1e6, None, dict(rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=32768)),
    "qwen3_theta1e6": (1e6, None, None),
    "gemma3_4b_rope": (1e6, 1e4, LINEAR8),
    "gemma3_thetas": (5e5, 2e4, None),
    "gemma3_multimodal": (5e5, 2e4, LINEAR8),
}


def read_fixture(version: str, name: str) -> dict:
  with open(os.path.join(FIXTURES, version, name + ".json")) as f:
    return json.load(f)


@pytest.mark.parametrize("version", ["v4", "v5"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rope_of_configs_transformers_wrote(version, name):
  config = read_fixture(version, name)
  assert config["transformers_version"].startswith(version[1:] + ".")
  cfg = H.config_from_hf(config)
  theta, local, scaling = EXPECTED[name]
  assert cfg.rope_theta == theta
  assert cfg.rope_local_theta == local
  assert (dict(cfg.rope_scaling) if cfg.rope_scaling else None) == scaling
  # What we export reads back the same, in both forms.
  out = H.hf_config(cfg)
  back = H.config_from_hf(out)
  assert (back.rope_theta, back.rope_local_theta, back.rope_scaling) == (
      cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling)
  params = out["rope_parameters"]
  if cfg.arch == "gemma3":
    assert params["sliding_attention"] == {"rope_type": "default", "rope_theta": local}
    params = params["full_attention"]
    assert out["rope_local_base_freq"] == local
  assert params == {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
  assert out["rope_theta"] == theta and out["rope_scaling"] == scaling


def test_rope_parameters_override_gemma3_defaults():
  """A 5.x Gemma 3 config that names one layer type keeps the other's default."""
  c = read_fixture("v5", "gemma3_thetas")
  del c["rope_parameters"]["sliding_attention"]
  cfg = H.config_from_hf(c)
  assert (cfg.rope_theta, cfg.rope_local_theta) == (5e5, 1e4)


def test_yarn_defaults_follow_transformers():
  """YaRN without original_max_position_embeddings or factor: the model's context
  is the original one, and the factor is the growth over it."""
  c = read_fixture("v5", "llama_yarn")
  c["rope_parameters"]["factor"] = None
  cfg = H.config_from_hf(c)
  assert dict(cfg.rope_scaling)["factor"] == 16384 / 4096
  del c["rope_parameters"]["original_max_position_embeddings"]
  c["rope_parameters"]["factor"] = 2.0
  assert dict(H.config_from_hf(c).rope_scaling)["original_max_position_embeddings"] == 16384


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "proportional"])
def test_unsupported_rope_types_are_named(kind):
  c = read_fixture("v5", "llama_linear2")
  c["rope_parameters"]["rope_type"] = kind
  with pytest.raises(ValueError, match=f"rope_parameters rope_type '{kind}' is not supported;"
                     " supported: default, linear, llama3, yarn"):
    H.config_from_hf(c)
  c = read_fixture("v4", "llama_linear2")
  c["rope_scaling"] = {"type": kind, "factor": 2.0}
  with pytest.raises(ValueError, match=f"rope_scaling rope_type '{kind}' is not supported"):
    H.config_from_hf(c)


def test_conflicting_forms_are_refused():
  c = read_fixture("v5", "llama_theta5e5")
  c["rope_theta"] = 10000.0
  with pytest.raises(ValueError, match=r"rope_theta \(10000.0\) and rope_parameters.rope_theta"
                     r" \(500000.0\) disagree; remove one of them or make them equal"):
    H.config_from_hf(c)
  c = read_fixture("v5", "llama3_scaling")
  c["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
  with pytest.raises(ValueError, match="rope_scaling .* and rope_parameters .* disagree"):
    H.config_from_hf(c)
  c = read_fixture("v5", "gemma3_thetas")
  c["rope_local_base_freq"] = 10000.0
  with pytest.raises(ValueError, match=r"rope_local_base_freq \(10000.0\) and"
                     r" rope_parameters.sliding_attention.rope_theta \(20000.0\) disagree"):
    H.config_from_hf(c)
  # Agreeing forms (what hf_config writes) are fine.
  c = read_fixture("v5", "llama3_scaling")
  c.update(rope_theta=5e5, rope_scaling=dict(LLAMA3, type="llama3"))
  assert H.config_from_hf(c).rope_theta == 5e5


def test_rope_forms_the_model_cannot_run_are_refused():
  c = read_fixture("v5", "gemma3_thetas")
  c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0)
  with pytest.raises(ValueError, match="rope_parameters.sliding_attention rope_type 'linear'"
                     " is not supported on sliding layers; only default RoPE is"):
    H.config_from_hf(c)
  c = read_fixture("v5", "gemma3_thetas")
  c["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
  with pytest.raises(ValueError, match="gemma3 rope_parameters must be keyed by layer type"):
    H.config_from_hf(c)
  c = read_fixture("v5", "qwen3_theta1e6")
  c["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
  with pytest.raises(ValueError, match="rope_parameters keyed by layer type is not supported"
                     " for qwen3"):
    H.config_from_hf(c)
  c = read_fixture("v5", "llama_theta5e5")
  c["rope_parameters"]["partial_rotary_factor"] = 0.5
  with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
    H.config_from_hf(c)


def test_llama_config_checks_scaling_keys():
  kwargs = dict(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=8)
  with pytest.raises(ValueError, match="rope_scaling rope_type 'yarn' needs"
                     " original_max_position_embeddings; add them to rope_scaling"):
    M.LlamaConfig(**kwargs, rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
    M.LlamaConfig(**kwargs, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


# -- against transformers ----------------------------------------------------------------


def transformers_or_skip():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("these checks build models with transformers 5.x")
  return torch, transformers


YARN = [dict(factor=4.0, original_max_position_embeddings=32),
        dict(factor=8.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2,
             truncate=False),
        dict(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.5),
        dict(factor=2.0, original_max_position_embeddings=32, attention_factor=1.3),
        dict(factor=16.0, original_max_position_embeddings=4096)]


@pytest.mark.parametrize("i", range(len(YARN)))
@pytest.mark.parametrize("head_dim,theta", [(16, 1e4), (64, 1e6)])
def test_yarn_matches_transformers(i, head_dim, theta):
  torch, transformers = transformers_or_skip()
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  params = dict(YARN[i], rope_type="yarn", rope_theta=theta)
  config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                    head_dim=head_dim, max_position_embeddings=16384,
                                    rope_parameters=copy.deepcopy(params))
  inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
  scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  np.testing.assert_allclose(M.rope_inv_freq(head_dim, theta, scaling), inv_freq.numpy(),
                             rtol=1e-6)
  pos = np.arange(40)
  cos, sin = M.rope_tables(pos, head_dim, theta, scaling)
  emb = np.concatenate([pos[:, None] * inv_freq.numpy()[None]] * 2, -1)
  np.testing.assert_allclose(cos, np.cos(emb) * factor, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sin, np.sin(emb) * factor, rtol=1e-5, atol=1e-5)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, tie_word_embeddings=False)
GEMMA_TEXT = dict(TINY, tie_word_embeddings=True, query_pre_attn_scalar=16, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": dict(LINEAR8, rope_theta=5e5),
                                   "sliding_attention": dict(rope_type="default",
                                                             rope_theta=2e4)})
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)

# case -> (transformers config class, model class, config keyword arguments)
MODELS = {
    "llama_theta5e5": ("LlamaConfig", "LlamaForCausalLM",
                       dict(TINY, rope_parameters=dict(rope_type="default", rope_theta=5e5))),
    "llama3_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, rope_parameters=dict(
        LLAMA3, rope_theta=5e5, original_max_position_embeddings=32))),
    "llama_linear2": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=1e4))),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(TINY, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4),
        max_position_embeddings=128)),
    "mistral_theta1e6": ("MistralConfig", "MistralForCausalLM", dict(
        TINY, sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2_theta1e6": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(TINY, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3_theta1e6": ("Qwen3Config", "Qwen3ForCausalLM",
                       dict(TINY, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA_TEXT),
    "gemma3_multimodal": ("Gemma3Config", "Gemma3ForConditionalGeneration",
                          dict(text_config=GEMMA_TEXT, vision_config=VISION,
                               mm_tokens_per_image=4)),
}
IDS = np.random.default_rng(3).integers(0, 128, (1, 16))


def randomize(torch, model, gemma: bool) -> None:
  """Weights large enough that RoPE moves the logits by O(1)."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 2:
        std = 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5
        p.copy_(torch.randn(p.shape, generator=g) * std)
      else:  # norms (Gemma's scale by 1 + w) and biases
        base = 0.0 if gemma or name.endswith("bias") else 1.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def our_logits(path) -> np.ndarray:
  import jax.numpy as jnp

  _, model, _ = H.load_hf(path)
  return np.asarray(model(jnp.asarray(IDS, jnp.int32)))[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers(tmp_path, name):
  """Load what transformers 5.x saves; export it; transformers loads the export."""
  torch, transformers = transformers_or_skip()
  config_cls, model_cls, kwargs = MODELS[name]
  config = getattr(transformers, config_cls)(**copy.deepcopy(kwargs))
  theirs = getattr(transformers, model_cls)(config).eval()
  randomize(torch, theirs, gemma=name.startswith("gemma"))
  theirs.save_pretrained(tmp_path / "hf")
  with torch.no_grad():
    want = theirs(torch.tensor(IDS)).logits[0].float().numpy()
  got = our_logits(tmp_path / "hf")
  assert np.abs(got - want).max() < 1e-4

  # Not vacuous: the same weights with the default RoPE give other logits.
  with open(tmp_path / "hf" / "config.json") as f:
    c = json.load(f)
  (c.get("text_config") or c).pop("rope_parameters")
  plain = tmp_path / "plain"
  plain.mkdir()
  os.link(tmp_path / "hf" / "model.safetensors", plain / "model.safetensors")
  with open(plain / "config.json", "w") as f:
    json.dump(c, f)
  assert np.abs(our_logits(plain) - want).max() > 0.05

  _, model, _ = H.load_hf(tmp_path / "hf")
  out = H.save_hf(model, tmp_path / "export")
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  text = getattr(theirs.config, "text_config", theirs.config)
  assert back.config.rope_parameters == text.rope_parameters
  with torch.no_grad():
    again = back(torch.tensor(IDS)).logits[0].numpy()
  assert np.abs(again - want).max() < 1e-4
