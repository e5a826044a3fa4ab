"""Precision: loss scaling, stochastic rounding, master copy, clear errors.

The tests use a toy three-layer tree (compiles in a fraction of a second); the policies
on a language model are tested with the LLM package (tests/llm).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax
from absign_jax import BlockTrainStep, FullTrainStep, LayeredLoss, block_coordinate
from absign_jax.train import precision


def toy_params(dtype=jnp.float32, n=3, value=None):
  keys = jax.random.split(jax.random.key(0), n)
  make = (lambda k: jax.random.normal(k, (4,), jnp.float32)) if value is None else (
      lambda k: jnp.full((4,), value, jnp.float32))
  return {"layers": [{"w": make(k).astype(dtype)} for k in keys]}


def toy_loss(coef):
  """``coef * sum_l <w_l, x>``: block gradient ``coef * x``, whatever the weights."""
  def loss(params, x):
    return coef * sum(jnp.sum(l["w"].astype(jnp.float32) * x) for l in params["layers"])
  return loss


def bits(x):
  x = np.asarray(x)
  return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(bits(x) if np.asarray(x).dtype.kind == "f" else x,
                                  bits(y) if np.asarray(y).dtype.kind == "f" else y)


X = jnp.asarray([1.0, -2.0, 3.0, -4.0])


# ---------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased(dtype):
  x = jax.random.normal(jax.random.key(1), (256,), jnp.float32) * 0.02
  keys = jax.random.split(jax.random.key(2), 2048)
  draws = jax.vmap(lambda k: precision.stochastic_round(x, dtype, k))(keys)
  draws = np.asarray(draws.astype(jnp.float32), np.float64)
  # Every draw is one of the two neighbours of x in `dtype`.
  lo = np.asarray(x.astype(dtype).astype(jnp.float32), np.float64)
  ulp = np.abs(np.asarray(jnp.nextafter(x.astype(dtype), jnp.asarray(jnp.inf, dtype))
                          .astype(jnp.float32), np.float64) - lo)
  assert np.all(np.abs(draws - np.asarray(x, np.float64)[None]) <= ulp[None] * 2.01)
  # Unbiased: the mean over draws is x within a few standard errors (<= ulp/2/sqrt(n)).
  err = np.abs(draws.mean(0) - np.asarray(x, np.float64))
  assert np.all(err <= 5 * ulp / 2 / math.sqrt(len(keys)) + 1e-12), err.max()
  # Nearest rounding is biased on these values; stochastic rounding is not.
  assert np.mean(err) < 0.2 * np.mean(np.abs(lo - np.asarray(x, np.float64)))


def test_stochastic_rounding_exact_values_and_specials():
  x = jnp.asarray([0.0, -0.0, 1.0, 0.5, -3.0, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  for seed in range(4):
    out = precision.stochastic_round(x, jnp.bfloat16, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(x))
    assert out.dtype == jnp.bfloat16
  y = jnp.asarray([1.0 + 2.0**-9], jnp.float32)  # a quarter ulp above 1 in bf16
  a = precision.stochastic_round(y, jnp.bfloat16, jax.random.key(0))
  b = precision.stochastic_round(y, jnp.bfloat16, jax.random.key(0))
  assert_same(a, b)  # keyed: reproducible


def test_nearest_bf16_rounding_loses_small_sign_steps():
  """Weights ~N(0, 0.02), lr 1e-5: a plain cast moves only ~16% of them."""
  w = (jax.random.normal(jax.random.key(0), (100_000,)) * 0.02).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), w.shape)
  target = w.astype(jnp.float32) - 1e-5 * jnp.sign(g)
  nearest = target.astype(jnp.bfloat16)
  moved = float(jnp.mean(nearest != w))
  assert 0.10 < moved < 0.25, moved
  # Weight decay at lr * wd = 1e-7 moves none of them.
  assert not bool(jnp.any((w.astype(jnp.float32) * (1 - 1e-7)).astype(jnp.bfloat16) != w))
  # Stochastic rounding moves each weight by the exact step in expectation.
  keys = jax.random.split(jax.random.key(3), 64)
  mean = jnp.mean(jax.vmap(lambda k: precision.stochastic_round(
      target[:2000], jnp.bfloat16, k).astype(jnp.float32))(keys), 0)
  step = mean - w[:2000].astype(jnp.float32)
  assert abs(float(jnp.mean(step * -jnp.sign(g[:2000]))) - 1e-5) < 2e-6


# ---------------------------------------------------------------------------------
# The step's state
# ---------------------------------------------------------------------------------


def test_fp32_step_matches_the_plain_optax_path():
  """In fp32 the float32 update arithmetic is the plain ``tx.update`` + apply."""
  params = toy_params()
  tx = absign_jax.absignsgd(0.1, weight_decay=0.5)
  step = BlockTrainStep(toy_loss(1.0), tx, donate=False)

  @jax.jit
  def plain(p, s):
    updates, s = tx.update(jax.grad(toy_loss(1.0))(p, X), s, p)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  state = step.init(params)
  for _ in range(4):
    block = int(absign_jax.active_block(s))
    p, s = plain(p, s)
    state, m = step(state, X)
    assert int(m["block"]) == block
  assert_same((p, s), (state.params, state.opt_state))
  assert int(state.precision.count) == 4 and int(state.precision.skipped_total) == 0


def test_the_step_has_one_calling_form():
  params = toy_params()
  tx = absign_jax.absignsgd(0.1)
  for step in (BlockTrainStep(toy_loss(1.0), tx, rounding="stochastic"),
               FullTrainStep(toy_loss(1.0), tx)):
    with pytest.raises(TypeError, match="state, metrics = step\\(state, batch\\)"):
      step(params, tx.init(params), X)
    with pytest.raises(TypeError, match="step\\(state, batch\\)"):
      step(params, X)


def test_fp16_overflow_skips_shrinks_scale_and_keeps_the_block():
  params = toy_params(jnp.float16)
  tx = absign_jax.absignsgd(1e-2)
  # Block gradient 8 * x, |x| <= 4: scaled by s it overflows float16 (> 65504) for
  # s >= 2^11 and is finite from s = 2^10 on: five skips, 2^15 ... 2^11.
  step = BlockTrainStep(toy_loss(8.0), tx, loss_scale="dynamic", donate=False)
  state = step.init(params)
  assert float(state.precision.loss_scale.scale) == 2.0**15
  first_block = int(absign_jax.active_block(state.opt_state))
  skipped = 0
  while True:
    before = state
    state, m = step(state, X)
    if not int(m["skipped"]):
      break
    skipped += 1
    assert int(m["block"]) == first_block
    assert_same(state.params, before.params)
    assert_same(state.opt_state, before.opt_state)  # selection not advanced
    assert float(state.precision.loss_scale.scale) == float(
        before.precision.loss_scale.scale) / 2
    assert int(m["consecutive_skips"]) == skipped == int(m["skipped_total"])
  assert skipped == 5 and float(state.precision.loss_scale.scale) == 2.0**10
  assert int(m["block"]) == first_block and int(m["consecutive_skips"]) == 0
  assert int(state.precision.skipped_total) == 5
  # The update used the unscaled gradient's sign: w - lr * sign(8 x).
  w0 = np.asarray(params["layers"][first_block]["w"], np.float32)
  expect = (w0 - 1e-2 * np.sign(np.asarray(X))).astype(np.float16)
  np.testing.assert_array_equal(np.asarray(state.params["layers"][first_block]["w"]),
                                expect)
  assert abs(float(m["loss"]) - float(toy_loss(8.0)(params, X))) < 1e-2


def test_loss_scale_grows_after_interval():
  params = toy_params(jnp.float16)
  tx = absign_jax.absignsgd(1e-3)
  cfg = precision.DynamicLossScale(init_scale=4.0, growth_interval=3)
  step = BlockTrainStep(toy_loss(1.0), tx, loss_scale=cfg, donate=False)
  state = step.init(params)
  scales = []
  for _ in range(7):
    state, m = step(state, X)
    scales.append(float(state.precision.loss_scale.scale))
  assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_adam_sees_the_unscaled_gradient():
  """block_adam is not scale invariant (eps): the step must unscale, in float32."""
  params = toy_params()
  tx = absign_jax.block_adam(1e-2, eps=1e-3, steps_per_block=2)
  ref = BlockTrainStep(toy_loss(1e-3), tx, donate=False)
  scaled = BlockTrainStep(toy_loss(1e-3), tx, loss_scale=2.0**12, donate=False)
  a, b = ref.init(params), scaled.init(params)
  for _ in range(3):
    a, _ = ref(a, X)
    b, _ = scaled(b, X)
  assert_same(a.params, b.params)  # power-of-two scaling and unscaling are exact
  assert_same(a.opt_state, b.opt_state)


def test_nan_steps_are_skipped_counted_and_eventually_raise():
  params = toy_params(jnp.bfloat16)
  tx = absign_jax.absignsgd(1e-3)
  step = BlockTrainStep(toy_loss(1.0), tx, max_consecutive_skips=3, donate=False)
  state = step.init(params)
  state, m = step(state, X)
  assert int(m["skipped"]) == 0
  bad = X.at[0].set(jnp.nan)
  for k in range(3):
    before = state
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(m["consecutive_skips"]) == k + 1
    assert_same(state.params, before.params)
    assert_same(state.opt_state, before.opt_state)
  with pytest.raises(FloatingPointError, match="3 training steps in a row"):
    step(state, X)
  assert int(state.precision.skipped_total) == 3  # the state passed in is intact
  # Without a skip limit the step reports the skip of a step too.
  unlimited = BlockTrainStep(toy_loss(1.0), tx, max_consecutive_skips=None, donate=False)
  s, m = unlimited(unlimited.init(params), bad)
  assert int(m["skipped"]) == 1
  assert_same(s.params, params)


def test_full_step_skips_non_finite_steps_and_has_the_same_limit():
  """FullTrainStep: a non-finite step changes nothing, and the limit raises."""
  params = toy_params()
  tx = optax.adam(1e-2)
  step = FullTrainStep(toy_loss(1.0), tx, max_consecutive_skips=2, donate=False)
  state = step.init(params)
  state, m = step(state, X)
  assert int(m["skipped"]) == 0 and int(state.precision.count) == 1
  # The finite step is the plain optax step.
  updates, ref_state = tx.update(jax.grad(toy_loss(1.0))(params, X), tx.init(params),
                                 params)
  assert_same(state.params, optax.apply_updates(params, updates))
  assert_same(state.opt_state, ref_state)
  bad = X.at[0].set(jnp.nan)
  for k in range(2):
    before = state
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(m["consecutive_skips"]) == k + 1
    assert_same(state.params, before.params)
    assert_same(state.opt_state, before.opt_state)
  with pytest.raises(FloatingPointError, match="2 training steps in a row"):
    step(state, X)


def test_loss_scale_underflow_raises():
  params = toy_params(jnp.float16)
  tx = absign_jax.absignsgd(1e-3)
  cfg = precision.DynamicLossScale(init_scale=4.0, min_scale=1.0)
  step = BlockTrainStep(toy_loss(jnp.inf), tx, loss_scale=cfg, donate=False)
  state = step.init(params)
  for _ in range(3):
    state, _ = step(state, X)
  with pytest.raises(FloatingPointError, match="loss scale underflowed"):
    step(state, X)


def test_stochastic_rounding_in_the_step_is_keyed_and_unbiased():
  params = toy_params(jnp.bfloat16, n=1, value=1.0)  # bf16 ulp at 1 is 2^-7
  tx = absign_jax.absignsgd(2.0**-10)  # a quarter ulp below 1: nearest never moves
  runs = {}
  for rounding, seed in [("nearest", 0), ("stochastic", 0), ("stochastic", 0),
                         ("stochastic", 1)]:
    step = BlockTrainStep(toy_loss(1.0), tx, rounding=rounding, seed=seed, donate=False)
    state = step.init(params)
    for _ in range(64):
      state, _ = step(state, jnp.ones(4))
    runs.setdefault((rounding, seed), []).append(state.params)
  w = lambda p: np.asarray(p["layers"][0]["w"], np.float32)
  np.testing.assert_array_equal(w(runs["nearest", 0][0]), np.ones(4))
  assert_same(*runs["stochastic", 0])  # same seed, same result
  assert not np.array_equal(w(runs["stochastic", 0][0]), w(runs["stochastic", 1][0]))
  moved = 1.0 - np.concatenate([w(runs["stochastic", s][0]) for s in (0, 1)])
  assert abs(moved.mean() - 64 * 2.0**-10) < 0.03, moved  # expected: 0.0625


def test_master_copy_accumulates_within_a_block_turn():
  """With K steps per block the fp32 copy keeps sub-ulp progress; plain bf16 does not."""
  params = toy_params(jnp.bfloat16, n=2, value=1.0)
  lr, k = 2.0**-10, 16
  tx = optax.chain(block_coordinate(optax.scale_by_sign(), selection="cyclic_descending",
                                    steps_per_block=k),
                   optax.scale_by_learning_rate(lr))
  w = lambda s, i: np.asarray(s.params["layers"][i]["w"], np.float32)
  nearest = BlockTrainStep(toy_loss(1.0), tx, donate=False)
  master = BlockTrainStep(toy_loss(1.0), tx, master_copy=True, donate=False)
  a, b = nearest.init(params), master.init(params)
  # One float32 buffer of one layer: both layers form one group.
  assert absign_jax.profiling.master_bytes(b.precision) == 4 * 4
  assert int(b.precision.master_block[0]) == -1
  for _ in range(k):
    a, _ = nearest(a, jnp.ones(4))
    b, _ = master(b, jnp.ones(4))
  np.testing.assert_array_equal(w(a, 1), np.ones(4))  # rounded away every step
  # The bf16 weights are the nearest value to the master copy, 1 - 16 * 2^-10.
  np.testing.assert_array_equal(w(b, 1), np.full(4, 1 - 2.0**-6, np.float32))
  np.testing.assert_array_equal(np.asarray(b.precision.master[0][0]),
                                np.full(4, 1 - 16 * 2.0**-10, np.float32))
  assert int(b.precision.master_block[0]) == 1
  # Block switch: the copy is re-initialised from the new block's bf16 weights.
  b, _ = master(b, jnp.ones(4))
  assert int(b.precision.master_block[0]) == 0
  np.testing.assert_array_equal(np.asarray(b.precision.master[0][0]),
                                np.full(4, 1 - 2.0**-10, np.float32))
  np.testing.assert_array_equal(w(b, 1), np.full(4, 1 - 2.0**-6, np.float32))


def test_skipped_step_leaves_master_copy_alone():
  params = toy_params(jnp.bfloat16)
  tx = absign_jax.absignsgd(1e-3)
  step = BlockTrainStep(toy_loss(1.0), tx, master_copy=True, donate=False)
  state = step.init(params)
  state, _ = step(state, X)
  before = state
  state, m = step(state, X.at[1].set(jnp.inf))
  assert int(m["skipped"]) == 1
  assert_same(state.precision.master, before.precision.master)
  assert_same(state.precision.master_block, before.precision.master_block)


def test_stacked_layers_match_the_layer_list():
  """The stacked program (dynamic block index) carries the same precision state."""
  layer = lambda w, h: jnp.tanh(h * w["w"].astype(jnp.float32) + 0.5)
  head = lambda p, h, x: 40.0 * jnp.sum(h * x)

  def list_loss(params, x):
    h = x
    for l in params["layers"]:
      h = layer(l, h)
    return head(params, h, x)

  layered = LayeredLoss(embed=lambda p, x: x, layer=layer, head_loss=head,
                        stack_path=("layers",))
  listed = toy_params(jnp.float16)
  stacked = {"layers": {"w": jnp.stack([l["w"] for l in listed["layers"]])}}
  opts = dict(loss_scale=precision.DynamicLossScale(init_scale=2.0**14, growth_interval=2),
              rounding="stochastic", master_copy=True, donate=False)
  tx = absign_jax.absignsgd(1e-2, selection="uniform")
  a_step = BlockTrainStep(list_loss, tx, dispatch="switch", **opts)
  b_step = BlockTrainStep(layered.loss, tx, layered=layered, **opts)
  a, b = a_step.init(listed), b_step.init(stacked)
  skipped = 0
  for _ in range(8):
    a, ma = a_step(a, X)
    b, mb = b_step(b, X)
    assert int(ma["block"]) == int(mb["block"]) and int(ma["skipped"]) == int(mb["skipped"])
    skipped += int(ma["skipped"])
  assert 0 < skipped < 8
  assert_same([l["w"] for l in a.params["layers"]], list(b.params["layers"]["w"]))
  assert_same(a.precision, b.precision)


# ---------------------------------------------------------------------------------
# Policies and clear errors
# ---------------------------------------------------------------------------------


def test_policies():
  assert precision.policy("fp32").param_dtype == jnp.float32
  sr = precision.policy("bf16-sr")
  assert sr.param_dtype == jnp.bfloat16
  assert sr.step_options() == {"rounding": "stochastic", "master_copy": False,
                               "loss_scale": None}
  assert precision.policy("bf16-master").step_options()["master_copy"]
  fp16 = precision.policy("fp16")
  assert fp16.param_dtype == jnp.float16
  assert fp16.loss_scale == precision.DynamicLossScale()
  assert fp16.loss_scale.init_scale == 2.0**15 and fp16.loss_scale.growth_interval == 2000
  cast = fp16.cast_params({"w": jnp.ones(2), "i": jnp.arange(2)})
  assert cast["w"].dtype == jnp.float16 and cast["i"].dtype == jnp.int32
  with pytest.raises(ValueError, match="unknown precision 'bf16sr'"):
    precision.policy("bf16sr")
  with pytest.raises(ValueError, match="'fp16' only"):
    precision.policy("bf16", loss_scale=precision.DynamicLossScale())


@pytest.mark.parametrize("kwargs, match", [
    ({"rounding": "stochastik"}, "rounding must be one of"),
    ({"dispatch": "fast"}, "dispatch must be"),
    ({"loss_scale": "dynamc"}, "loss_scale must be"),
    ({"loss_scale": -1.0}, "init_scale must be a finite number > 0"),
    ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
])
def test_bad_step_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BlockTrainStep(toy_loss(1.0), absign_jax.absignsgd(0.1), **kwargs)


def test_unknown_keywords_are_errors():
  with pytest.raises(TypeError, match="roundin"):
    BlockTrainStep(toy_loss(1.0), absign_jax.absignsgd(0.1), roundin="stochastic")
  with pytest.raises(TypeError, match="depth_bais"):
    absign_jax.absignsgd(1e-3, depth_bais=2.0)
  with pytest.raises(TypeError, match="learning_rat"):
    absign_jax.block_adam(learning_rat=1e-3)
  with pytest.raises(TypeError, match="wd"):
    absign_jax.sign_sgd(1e-3, wd=0.1)
  with pytest.raises(TypeError, match="growth"):
    precision.DynamicLossScale(growth=2.0)
  with pytest.raises(TypeError, match="max_keep"):
    from absign_jax.train.checkpoint import Checkpointer
    Checkpointer("/nonexistent", max_keep=2)


@pytest.mark.parametrize("factory", [absign_jax.absignsgd, absign_jax.block_adam,
                                     absign_jax.sign_sgd])
@pytest.mark.parametrize("lr", [0.0, -1e-4, float("nan")])
def test_bad_learning_rates(factory, lr):
  with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
    factory(lr)


@pytest.mark.parametrize("factory", [absign_jax.absignsgd, absign_jax.block_adam,
                                     absign_jax.sign_sgd])
def test_weight_decay_that_flips_signs(factory):
  with pytest.raises(ValueError, match="flip the sign"):
    factory(0.5, weight_decay=2.0)
  factory(0.5, weight_decay=1.9)  # lr * wd = 0.95 < 1 is allowed


def test_negative_depth_bias():
  with pytest.raises(ValueError, match="depth_bias must be finite and >= 0"):
    absign_jax.absignsgd(1e-3, depth_bias=-0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"backoff_factor": 1.5}, "backoff_factor must be <= 1"),
    ({"growth_factor": 0.5}, "growth_factor must be >= 1"),
    ({"growth_interval": 0}, "growth_interval"),
    ({"init_scale": float("nan")}, "init_scale"),
    ({"init_scale": 2.0**30}, "min_scale <= init_scale <= max_scale"),
])
def test_bad_loss_scale_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    precision.DynamicLossScale(**kwargs)
