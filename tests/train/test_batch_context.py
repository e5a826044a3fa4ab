"""The cut protocol's batch context: padded and packed batches through one program.

A model whose layers read positions and an attention mask derived from the batch's
padding hands them over as ``context``; the step computes it once per step and every
layer gets it. The fast step must then give the loss and the gradient of the model's
own forward on that batch (computed here with ``jax.grad`` of ``model.loss``), and
padding must change nothing for the real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import absign_jax
from tests.block_steps import sgd_block_steps

PAD, VOCAB, DIM, MAX_LEN, N = 0, 48, 16, 16, 3


def padding_context(inputs: jax.Array) -> dict:
  """Positions counted from each row's first real token; causal mask over real keys
  (a padding query attends to itself, so no row of the mask is empty)."""
  real = inputs != PAD
  positions = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
  t = inputs.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = causal & (real[:, None, :] | jnp.eye(t, dtype=bool))
  return {"positions": positions, "mask": mask[:, None]}  # [B, 1, T, S]


class Layer(nnx.Module):
  """Attention and an MLP; reads its own learned position table at ``positions``."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.pos = nnx.Embed(MAX_LEN, DIM, rngs=rngs)
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=DIM, decode=False,
                                       rngs=rngs)
    self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)

  def __call__(self, h, ctx):
    h = h + self.pos(ctx["positions"])
    h = h + self.attn(self.norm(h), mask=ctx["mask"])
    return h + self.mlp(nnx.gelu(h))


class PaddedLM(nnx.Module):
  """A model that derives its positions and mask from the padding of its inputs."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.layers = nnx.List([Layer(rngs=rngs) for _ in range(N)])
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def head_loss(self, h, batch):
    logits = self.head(h).astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, batch["targets"][..., None], -1)[..., 0]
    # A token is scored when it and its input are real (not the first real token,
    # predicted from padding).
    weight = ((batch["targets"] != PAD) & (batch["inputs"] != PAD)).astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.sum(weight)

  def loss(self, batch):
    """The model's own forward: no cut, no step."""
    ctx = padding_context(batch["inputs"])
    h = self.embed(batch["inputs"])
    for layer in self.layers:
      h = layer(h, ctx)
    return self.head_loss(h, batch)

  def layer_cut(self) -> absign_jax.LayerCut:
    return absign_jax.LayerCut(
        embed=lambda m, batch: m.embed(batch["inputs"]),
        head_loss=lambda m, h, batch: m.head_loss(h, batch),
        layers="layers",
        context=lambda m, batch: padding_context(batch["inputs"]))


def left_padded_batch() -> dict:
  rng = np.random.default_rng(0)
  lengths = [9, 5, 12]
  width = max(lengths)
  rows = np.full((len(lengths), width + 1), PAD, np.int32)
  for r, n in enumerate(lengths):
    rows[r, width + 1 - n:] = rng.integers(1, VOCAB, n)
  return {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}


def test_padding_changes_nothing_for_the_real_tokens():
  model = PaddedLM(rngs=nnx.Rngs(0))
  batch = left_padded_batch()
  for r in range(3):
    inputs, targets = batch["inputs"][r], batch["targets"][r]
    start = int(np.argmax(np.asarray(inputs) != PAD))
    alone = {"inputs": inputs[None, start:], "targets": targets[None, start:]}
    padded = {"inputs": inputs[None], "targets": targets[None]}
    np.testing.assert_allclose(float(model.loss(padded)), float(model.loss(alone)),
                               rtol=1e-5)


def test_a_padded_batch_trains_through_the_fast_step_as_through_the_model():
  model = PaddedLM(rngs=nnx.Rngs(1))
  batch = left_padded_batch()
  parts = absign_jax.split_nnx(model)
  assert parts.layered.context is not None
  reference_loss = model.loss(batch)
  reference = jax.grad(lambda m: m.loss(batch))(model)  # the model's own forward
  want = [jax.tree.leaves(nnx.state(reference.layers[b], nnx.Param)) for b in range(N)]
  for b, step in enumerate(sgd_block_steps(parts, batch, range(N))):
    np.testing.assert_allclose(step.loss, float(reference_loss), rtol=1e-5)
    got = [x[b] - y[b] for x, y in zip(step.before, step.after)]
    assert len(got) == len(want[b])
    for g, w in zip(got, want[b]):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=1e-6)


def test_every_residual_policy_reads_the_context():
  model = PaddedLM(rngs=nnx.Rngs(2))
  batch = left_padded_batch()
  parts = absign_jax.split_nnx(model)
  results = []
  for residuals in (0, N - 1):
    tx = absign_jax.absignsgd(1e-2, selection=absign_jax.fixed_order([0]))
    step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                     residuals=residuals, donate=False)
    state, metrics = step(step.init(parts.params), batch)
    results.append((float(metrics["grad_norm"]),
                    jax.tree.leaves(state.params["layers"])))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for a, b in zip(results[0][1], results[1][1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_pure_cut_with_context_and_a_bad_context():
  params = {"layers": [{"w": jnp.full((2,), 0.5)} for _ in range(2)]}
  c = absign_jax.cut(params, embed=lambda p, x: x["h"],
                     layer=lambda w, h, ctx: h * w["w"] * ctx,
                     head_loss=lambda p, h, x: jnp.sum(h),
                     context=lambda p, x: x["scale"])
  batch = {"h": jnp.ones(2), "scale": jnp.float32(2.0)}
  assert float(c.loss_fn(c.params, batch)) == pytest.approx(2 * 0.5 * 2 * 0.5 * 2)
  with pytest.raises(TypeError, match="context must be a function"):
    absign_jax.cut(params, embed=lambda p, x: x, layer=lambda w, h: h,
                   head_loss=lambda p, h, x: h, context="positions")
