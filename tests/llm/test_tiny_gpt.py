"""A tiny GPT (the Llama NNX model at its `tiny` preset) learns with ABSignSGD."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import absign_jax
from absign_jax.llm.model import Llama, LlamaConfig


def _batches(cfg, steps, batch=8, seq=32, seed=0):
  """Learnable data: each sequence counts upward by a random stride mod 16."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    start = rng.integers(0, 16, (batch, 1))
    stride = rng.integers(1, 4, (batch, 1))
    toks = (start + stride * np.arange(seq + 1)[None]) % 16
    yield {"inputs": jnp.asarray(toks[:, :-1], jnp.int32),
           "targets": jnp.asarray(toks[:, 1:], jnp.int32),
           "mask": jnp.ones((batch, seq), jnp.float32)}


def test_nnx_loop_lowers_loss():
  cfg = LlamaConfig.preset("tiny")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, 300, 3e-4)
  # The tiny model's random head bounds its logits: train it (and the embedding) too.
  tx = absign_jax.absignsgd(schedule, include_embedding=True, include_head=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, b)) for b in _batches(cfg, 300)]
  start, end = np.mean(losses[:10]), np.mean(losses[-10:])
  assert end < 0.4 * start, (start, end)
  # Every layer got its turns, the deepest most often.
  visits = np.asarray(absign_jax.find_state(optimizer.opt_state).selection.visits[...])
  assert visits.min() > 0 and visits[-1] > visits[0]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_partial_backprop_step_lowers_loss(scan_layers):
  cfg = LlamaConfig.preset("tiny", scan_layers=scan_layers)
  parts = absign_jax.split_nnx(Llama(cfg, rngs=nnx.Rngs(0)))
  tx = absign_jax.absignsgd(optax.cosine_decay_schedule(3e-3, 300, 0.1),
                            include_embedding=True, include_head=True)
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered)
  state = step.init(parts.params)
  losses = []
  for batch in _batches(cfg, 300):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:10])
