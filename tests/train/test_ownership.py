"""The steps donate their state's buffers, never the caller's.

``init`` gives the state its own copies of what the caller handed in, so the caller's
model stays readable and unchanged however many steps run; a state that a step
consumed is refused with an error that says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import absign_jax

VOCAB, DIM, N = 32, 16, 3


class Block(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)

  def __call__(self, h):
    return h + self.mlp(nnx.gelu(self.norm(h)))


class Model(nnx.Module):
  def __init__(self, stacked: bool, *, rngs: nnx.Rngs):
    self.embedding = nnx.Embed(VOCAB, DIM, rngs=rngs)
    if stacked:
      @nnx.split_rngs(splits=N)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(r):
        return Block(rngs=r)
      self.blocks = make(rngs)
    else:
      self.blocks = nnx.List([Block(rngs=rngs) for _ in range(N)])
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)


def head_loss(model, h, batch):
  logits = model.head(h)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def batch(i: int) -> dict:
  x = np.random.default_rng(i).integers(0, VOCAB, (2, 9)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:])}


def snapshot(model) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "vmap"])
def test_the_callers_model_stays_readable_and_unchanged(stacked):
  model = Model(stacked, rngs=nnx.Rngs(0))
  before = snapshot(model)
  parts = absign_jax.cut_nnx(model, layers="blocks",
                             embed=lambda m, b: m.embedding(b["inputs"]),
                             head_loss=head_loss)
  step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(1e-2))
  state = step.init(parts.params)
  for i in range(3):
    state, _ = step(state, batch(i))
  after = snapshot(model)  # raised "Array has been deleted" when init donated these
  assert len(after) == len(before)
  for a, b in zip(after, before):
    np.testing.assert_array_equal(a, b)
  trained = jax.tree.leaves(parts.model_params(state.params))
  assert any(not np.array_equal(np.asarray(t), b) for t, b in zip(trained, before))
  # The caller's parameters start a second step of another kind too.
  full = absign_jax.FullTrainStep(parts.loss_fn, optax.adam(1e-3))
  full_state, metrics = full(full.init(parts.params), batch(0))
  assert np.isfinite(float(metrics["loss"]))


def test_a_consumed_state_is_refused_with_an_error_that_says_so():
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
  loss = lambda p, x: sum(jnp.sum(l["w"] * x) for l in p["layers"])
  step = absign_jax.BlockTrainStep(loss, absign_jax.absignsgd(0.5))
  state = step.init(params)
  new, _ = step(state, jnp.ones(2))
  with pytest.raises(ValueError, match="consumed by an earlier step"):
    step(state, jnp.ones(2))
  step(new, jnp.ones(2))  # the returned state goes on
  np.testing.assert_array_equal(np.asarray(params["layers"][2]["w"]), np.ones(2))


def test_without_donation_every_state_stays_readable():
  params = {"w": [jnp.ones(2) for _ in range(2)]}
  step = absign_jax.FullTrainStep(lambda p, x: jnp.sum(p["w"][0] * p["w"][1] * x),
                                  optax.sgd(0.1), donate=False)
  state = step.init(params)
  assert state.params["w"][0] is params["w"][0]  # no copy when nothing is donated
  step(state, jnp.ones(2))
  step(state, jnp.ones(2))


def test_the_training_plan_names_the_blocks_and_what_stays_frozen():
  model = Model(stacked=False, rngs=nnx.Rngs(0))
  parts = absign_jax.cut_nnx(model, layers="blocks",
                             embed=lambda m, b: m.embedding(b["inputs"]),
                             head_loss=head_loss)
  per_layer = DIM * DIM + DIM + 2 * DIM  # mlp kernel and bias, norm scale and bias
  embed, head = VOCAB * DIM, DIM * VOCAB + VOCAB
  plan = absign_jax.training_plan(absign_jax.absignsgd().init(parts.params),
                                  parts.params)
  assert [n for _, n in plan.blocks] == [per_layer] * N
  assert plan.trained_params == N * per_layer
  assert plan.frozen_params == embed + head
  text = str(plan)
  assert "frozen by default" in text and "include_embedding=True" in text
  cli = plan.describe({"embedding": "--train-embedding", "head": "--train-head"})
  assert cli.endswith("pass --train-embedding / --train-head to train them as blocks.")
  assert cli.splitlines()[:-1] == text.splitlines()[:-1]
  with_both = absign_jax.absignsgd(include_embedding=True, include_head=True)
  plan = absign_jax.training_plan(with_both.init(parts.params), parts.params)
  assert plan.frozen_params == 0 and len(plan.blocks) == N + 2
  assert "frozen" not in str(plan)
