"""Tests for absign_jax.related.sgd_sai, against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from absign_jax.related.sgd_sai import scale_by_sai, sgd_sai


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


SHAPES = {"w": (3, 4), "b": (4,), "s": (1,), "k": (2, 3, 2)}


def _random_trees(seed, n):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  grads = [
      {k: rng.normal(loc=0.3, size=s) * (1 + t) for k, s in SHAPES.items()}
      for t in range(n)
  ]
  return params, grads


def _reference(params, grads, lr, mu, eps, wd, decay, normalize):
  """SGD-SaI written out with NumPy float64, one leaf at a time."""
  p = {k: v.copy() for k, v in params.items()}
  gsnr, m, out = {}, {}, []
  for t, g in enumerate(grads):
    if t == 0:
      for k, gk in g.items():
        if gk.size < 2:
          gsnr[k] = 0.0
        else:
          gsnr[k] = np.linalg.norm(gk.ravel()) / (np.std(gk, ddof=1) + eps)
      if normalize:
        top = max(gsnr.values())
        gsnr = {k: v / top for k, v in gsnr.items()}
      m = {k: gk.copy() for k, gk in g.items()}
    else:
      m = {k: mu * m[k] + (1 - mu) * g[k] for k in g}
    for k in p:
      wd_k = wd if decay[k] else 0.0
      p[k] = p[k] - lr * wd_k * p[k] - lr * gsnr[k] * m[k]
    out.append({k: v.copy() for k, v in p.items()})
  return out, gsnr


def _run(tx, params, grads, jit=True):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out, state


def _assert_trees_close(a, b, **kw):
  for k in b:
    np.testing.assert_allclose(np.asarray(a[k]), b[k], **kw)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_matches_float64_reference(x64, normalize, mu):
  params, grads = _random_trees(0, 4)
  decay = {k: len(s) >= 2 for k, s in SHAPES.items()}
  want, _ = _reference(params, grads, 0.1, mu, 1e-8, 0.05, decay, normalize)
  tx = sgd_sai(0.1, momentum=mu, weight_decay=0.05, normalize=normalize)
  got, _ = _run(tx, params, grads)
  for g_t, w_t in zip(got, want):
    assert g_t["w"].dtype == jnp.float64
    _assert_trees_close(g_t, w_t, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference_to_tolerance():
  params, grads = _random_trees(1, 3)
  decay = {k: len(s) >= 2 for k, s in SHAPES.items()}
  want, _ = _reference(params, grads, 0.05, 0.9, 1e-8, 1e-2, decay, False)
  got, _ = _run(sgd_sai(0.05), params, grads)
  for g_t, w_t in zip(got, want):
    assert g_t["w"].dtype == jnp.float32
    _assert_trees_close(g_t, w_t, rtol=1e-5, atol=1e-5)


def test_gsnr_is_frozen_after_first_step(x64):
  params, grads = _random_trees(2, 1)
  tx = scale_by_sai(momentum=0.5)
  state = tx.init(params)
  _, state = tx.update(grads[0], state)
  first = jax.tree.map(float, state.gsnr)
  _, ref = _reference(
      params, grads, 1.0, 0.5, 1e-8, 0.0, dict.fromkeys(SHAPES, False), False
  )
  for k in SHAPES:
    np.testing.assert_allclose(first[k], ref[k], rtol=1e-12)
  assert first["s"] == 0.0  # one-element leaf: std(ddof=1) is NaN -> gsnr 0
  # Very different later gradients do not change it.
  rng = np.random.default_rng(3)
  for _ in range(3):
    g = {k: rng.standard_cauchy(size=s) * 100 for k, s in SHAPES.items()}
    _, state = jax.jit(tx.update)(g, state)
    assert jax.tree.map(float, state.gsnr) == first
  assert int(state.count) == 4


def test_constant_and_zero_gradients():
  tx = scale_by_sai(momentum=0.0, eps=1e-3)
  params = {"c": jnp.zeros(3), "z": jnp.zeros((2, 2)), "one": jnp.zeros(())}
  state = tx.init(params)
  g = {"c": jnp.full(3, 2.0), "z": jnp.zeros((2, 2)), "one": jnp.array(5.0)}
  u, state = tx.update(g, state)
  # std = 0: gsnr = ||g|| / eps, as specified; zero gradient: 0; scalar: 0.
  np.testing.assert_allclose(state.gsnr["c"], np.sqrt(12.0) / 1e-3, rtol=1e-6)
  assert float(state.gsnr["z"]) == 0.0 and float(state.gsnr["one"]) == 0.0
  assert not np.any(np.isnan(np.asarray(u["z"])))


def test_momentum_zero_stores_no_buffer(x64):
  params, grads = _random_trees(4, 3)
  tx = sgd_sai(0.1, momentum=0.0, weight_decay=0.0)
  got, state = _run(tx, params, grads)
  sai_state = state[0]
  assert sai_state.momentum is None
  # Update is exactly -lr * gsnr * g_t at every step.
  _, gsnr = _reference(
      params, grads, 0.1, 0.0, 1e-8, 0.0, dict.fromkeys(SHAPES, False), False
  )
  p = params
  for t, g in enumerate(grads):
    for k in SHAPES:
      np.testing.assert_allclose(
          got[t][k], p[k] - 0.1 * gsnr[k] * g[k], rtol=1e-12, atol=1e-12
      )
    p = {k: np.asarray(v) for k, v in got[t].items()}


def test_normalize_divides_by_max_gsnr(x64):
  params, grads = _random_trees(5, 1)
  plain, norm = scale_by_sai(normalize=False), scale_by_sai(normalize=True)
  _, s1 = plain.update(grads[0], plain.init(params))
  _, s2 = norm.update(grads[0], norm.init(params))
  top = max(float(v) for v in jax.tree.leaves(s1.gsnr))
  for k in SHAPES:
    np.testing.assert_allclose(s2.gsnr[k], s1.gsnr[k] / top, rtol=1e-12)
  assert max(float(v) for v in jax.tree.leaves(s2.gsnr)) == pytest.approx(1.0)


def _decay_only_step(mask=None):
  """One step with zero gradients: only weight decay moves parameters."""
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = sgd_sai(0.5, weight_decay=0.1, weight_decay_mask=mask)
  u, _ = tx.update(zeros, tx.init(params), params)
  return {k: float(jnp.max(jnp.abs(v))) for k, v in u.items()}


def test_weight_decay_default_mask_is_ndim_at_least_2():
  moved = _decay_only_step()
  assert moved["w"] == pytest.approx(0.05) and moved["k"] == pytest.approx(0.05)
  assert moved["b"] == 0.0 and moved["s"] == 0.0


def test_weight_decay_custom_mask_tree_and_callable():
  mask = {"w": False, "b": True, "s": True, "k": False}
  for m in (mask, lambda p: mask):
    moved = _decay_only_step(m)
    assert moved["b"] == pytest.approx(0.05) and moved["s"] == pytest.approx(0.05)
    assert moved["w"] == 0.0 and moved["k"] == 0.0


def test_decay_is_not_scaled_by_gsnr(x64):
  params = {"w": jnp.ones((2, 2))}
  g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  tx = sgd_sai(0.1, weight_decay=0.2)
  u, st = tx.update(g, tx.init(params), params)
  gsnr = float(st[0].gsnr["w"])
  np.testing.assert_allclose(
      u["w"], -0.1 * 0.2 * 1.0 - 0.1 * gsnr * g["w"], rtol=1e-12
  )


def test_schedule_and_inject_hyperparams_under_jit(x64):
  params, grads = _random_trees(6, 4)
  sched = optax.linear_schedule(0.2, 0.05, transition_steps=3)
  lrs = [float(sched(t)) for t in range(4)]
  decay = {k: len(s) >= 2 for k, s in SHAPES.items()}

  # Reference with a per-step learning rate.
  p = {k: v.copy() for k, v in params.items()}
  want = []
  _, gsnr = _reference(params, grads[:1], 1.0, 0.9, 1e-8, 1e-2, decay, False)
  m = None
  for t, g in enumerate(grads):
    m = g if m is None else {k: 0.9 * m[k] + 0.1 * g[k] for k in g}
    p = {
        k: p[k] - lrs[t] * (1e-2 if decay[k] else 0.0) * p[k]
        - lrs[t] * gsnr[k] * m[k]
        for k in p
    }
    want.append(p)

  for tx in (sgd_sai(sched), optax.inject_hyperparams(sgd_sai)(sched)):
    got, state = _run(tx, params, grads, jit=True)
    for g_t, w_t in zip(got, want):
      # Jitted optax schedules may return float32 values: 1e-7 tolerance.
      _assert_trees_close(g_t, w_t, rtol=1e-7, atol=1e-7)
  # inject_hyperparams exposes the current learning rate and momentum.
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(lrs[3])
  assert float(state.hyperparams["momentum"]) == pytest.approx(0.9)


def test_inject_hyperparams_momentum_zero():
  params, grads = _random_trees(7, 2)
  tx = optax.inject_hyperparams(sgd_sai)(learning_rate=0.1, momentum=0.0)
  got, state = _run(tx, params, grads, jit=True)
  assert state.inner_state[0].momentum is None
  assert np.all(np.isfinite(np.asarray(got[-1]["w"])))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sgd_sai(**kwargs)
