"""Packed and padded batches of the Llama model: each example computes what it would
alone, through the model's own forward and through the one-program block step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import absign_jax
from tests.block_steps import sgd_block_steps
from absign_jax.llm import model as M
from absign_jax.llm import tasks

TINY = M.LlamaConfig.preset("tiny")


def packed_batch(vocab: int, seq_len: int = 16) -> dict:
  rng = np.random.default_rng(0)
  examples = [(rng.integers(1, vocab, n).tolist(), [1.0] * n) for n in (7, 6, 11, 4)]
  data = tasks.pack_examples(examples, seq_len, pad_id=0)
  assert data.segment_ids is not None
  return data.batch(np.arange(len(data)))


def test_pack_examples_marks_each_example_and_scores_within_it():
  examples = [([5, 6, 7], [0.0, 1.0, 1.0]), ([8, 9], [0.0, 1.0]), ([3, 4, 5, 6], [1.0] * 4)]
  data = tasks.pack_examples(examples, seq_len=5, pad_id=0)
  np.testing.assert_array_equal(data.tokens, [[5, 6, 7, 8, 9, 0], [3, 4, 5, 6, 0, 0]])
  np.testing.assert_array_equal(data.segment_ids, [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
  # Target 8 (the second example's first token, predicted from the first one's
  # last token) is not scored; padding is not either.
  np.testing.assert_array_equal(data.mask, [[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]])
  assert set(data.batch([0])) == {"inputs", "targets", "mask", "segment_ids"}


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4, "layer_types": (
    "sliding_attention", "full_attention", "sliding_attention", "full_attention"),
    "rope_local_theta": 1e4, "rope_theta": 1e6}], ids=["llama", "mixed-window"])
def test_each_packed_example_computes_what_it_would_alone(overrides):
  cfg = TINY.replace(**overrides)
  model = M.Llama(cfg, rngs=nnx.Rngs(0))
  batch = packed_batch(cfg.vocab_size)
  ctx = model.batch_context(batch)
  logits = model.logits(model.run_layers(model.embed(jnp.asarray(batch["inputs"])),
                                         ctx=ctx))
  for r, seg in enumerate(batch["segment_ids"]):
    for s in set(seg.tolist()) - {0}:
      where = np.flatnonzero(seg == s)
      alone = model(jnp.asarray(batch["inputs"][r:r + 1, where]))
      np.testing.assert_allclose(np.asarray(logits[r, where]), np.asarray(alone[0]),
                                 atol=2e-5)


def test_the_block_step_on_a_packed_batch_matches_the_models_own_gradient():
  model = M.Llama(TINY, rngs=nnx.Rngs(1))
  batch = {k: jnp.asarray(v) for k, v in packed_batch(TINY.vocab_size).items()}
  parts = absign_jax.split_nnx(model)
  reference = jax.grad(lambda m: m.loss(batch))(model)
  blocks = (TINY.n_layers - 1, 0)
  for block, step in zip(blocks, sgd_block_steps(parts, batch, blocks)):
    np.testing.assert_allclose(step.loss, float(model.loss(batch)), rtol=1e-5)
    want = jax.tree.leaves(nnx.state(reference.layers[block], nnx.Param))
    got = [a[block] - b[block] for a, b in zip(step.before, step.after)]
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-6)


def test_segment_ids_of_the_wrong_shape_are_refused():
  model = M.Llama(TINY, rngs=nnx.Rngs(0))
  batch = packed_batch(TINY.vocab_size)
  batch["segment_ids"] = batch["segment_ids"][:, :-1]
  with pytest.raises(ValueError, match="one segment id per input token"):
    model.loss(batch)
