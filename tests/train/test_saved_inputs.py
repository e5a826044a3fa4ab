"""``save_inputs_every``: the recomputed layers above the active one save every k-th
input only; the backward replays the segments between. Same result, less memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax

N, DIM, ROWS = 7, 64, 256


def model(seed: int = 0, n: int = N):
  rng = np.random.default_rng(seed)
  params = {"embed": jnp.asarray(rng.normal(size=(DIM,)), jnp.float32),
            "layers": [{"w": jnp.asarray(rng.normal(size=(DIM, DIM)) / np.sqrt(DIM),
                                         jnp.float32)} for _ in range(n)]}
  return absign_jax.cut(
      params, embed=lambda p, x: x * p["embed"],
      layer=lambda w, h: h + jnp.tanh(h @ w["w"]),
      head_loss=lambda p, h, x: jnp.mean(jnp.sum(h * h, -1)))


def batch():
  return jnp.asarray(np.random.default_rng(1).normal(size=(ROWS, DIM)), jnp.float32)


@pytest.mark.parametrize("keep", [0, 2])
def test_every_segment_length_gives_the_same_update(keep):
  cut = model()
  results = {}
  for every in (1, 2, 3, N):
    # Block-coordinate SGD (lr 1): the update is the gradient itself, for each block.
    tx = absign_jax.block_coordinate(optax.sgd(1.0),
                                     selection=absign_jax.fixed_order(list(range(N))))
    step = absign_jax.BlockTrainStep(cut.loss_fn, tx, layered=cut.layered,
                                     residuals=keep, save_inputs_every=every)
    state = step.init(cut.params)
    leaves = []
    for _ in range(N):
      state, _ = step(state, batch())
      leaves.append(np.asarray(state.params["layers"]["w"]))
    results[every] = leaves
  # Against an independent float64 reference: jax.grad of the whole model, block by
  # block (each step starts from the float32 weights the step itself had).
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), t)
    previous = np.asarray(cut.params["layers"]["w"])
    for b in range(N):
      params = f64({**cut.params, "layers": {"w": previous}})
      grad = jax.grad(cut.loss_fn)(params, f64(batch()))["layers"]["w"][b]
      want = previous.astype(np.float64)
      want[b] -= np.asarray(grad)
      np.testing.assert_allclose(results[1][b], want, rtol=1e-4, atol=1e-5)
      previous = results[1][b]
  for every in (2, 3, N):
    for a, b in zip(results[every], results[1]):
      np.testing.assert_array_equal(a, b)


def test_fewer_saved_inputs_take_less_memory():
  n = 24
  cut = model(n=n)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cut.params)
  x = jax.ShapeDtypeStruct((ROWS, DIM), jnp.float32)

  def temp(every):
    step = absign_jax.BlockTrainStep(cut.loss_fn, absign_jax.absignsgd(1e-3),
                                     layered=cut.layered, residuals=0,
                                     save_inputs_every=every)
    state = jax.eval_shape(step.init, params)
    return absign_jax.profiling.program_memory(
        step.lower(state, x, block=0).compile())["temp"]

  one_input = ROWS * DIM * 4
  # 24 inputs saved, against 6 (every 4: 6 segments) plus 4 replayed at a time.
  saved = temp(1) - temp(4)
  assert saved >= (n - n // 4 - 4) * one_input * 0.9, (temp(1), temp(4))


def test_bad_values_are_refused():
  cut = model()
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="save_inputs_every must be an int >= 1"):
      absign_jax.BlockTrainStep(cut.loss_fn, absign_jax.absignsgd(1e-3),
                                layered=cut.layered, save_inputs_every=bad)
