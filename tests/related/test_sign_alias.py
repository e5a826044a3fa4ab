"""Tests for absign_jax.related.sign_alias: ALIAS step sizes and the SOS search."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from absign_jax.related.sign_alias import (
    alias_sign_sgd,
    sign_sgd_estimates,
    sos_step_size,
)


SHAPES = {"b": (4,), "s": (1,), "u": (), "w": (3, 4)}  # sorted: jax dict order


def _trees(seed, n, zero_step=None):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  grads = []
  for t in range(n):
    # Gradients shrink and partly flip sign, as near a minimum.
    g = {k: rng.normal(loc=0.5, size=s) / (1.0 + t) for k, s in SHAPES.items()}
    if t == zero_step:
      g = {k: np.zeros(s) for k, s in SHAPES.items()}
    grads.append(g)
  return params, grads


def _flat(tree):
  return np.concatenate([np.ravel(tree[k]) for k in sorted(SHAPES)])


def _unflat(vec):
  out, i = {}, 0
  for k in sorted(SHAPES):
    n = int(np.prod(SHAPES[k], dtype=int))
    out[k] = vec[i:i + n].reshape(SHAPES[k])
    i += n
  return out


def _reference(params, grads, *, values=None, d0=1e-8, l0=1.0, f_low=None,
               clamp=None, gap_k=1, warmup=0, warmup_lr=None, mu=0.0, wd=0.0,
               decay=None):
  """The ALIAS formulas written out in NumPy float64 on the flattened parameters."""
  x = _flat(params)
  mask = np.ones_like(x) if decay is None else _flat(
      {k: np.full(SHAPES[k], float(decay[k])) for k in SHAPES})
  s_sum, d_sum, d, pairs = l0, 0.0, d0, 0
  g_prev, m, gam_prev, f0 = None, np.zeros_like(x), 0.0, None
  xs, gammas = [], []
  for t, gt in enumerate(grads):
    g = _flat(gt)
    if t > 0:
      prev_sign = np.sign(m if mu > 0 else g_prev)
      dist = gam_prev if np.any(prev_sign != 0) else 0.0
      if dist > 0:
        s_sum += np.sum(np.abs(g - g_prev)) / dist
      d_sum += gam_prev * np.dot(g, prev_sign)
      d = max(d, d_sum)
      pairs += 1
    if t == 0 and f_low is not None:
      f0 = values[0]
    num = d if (f_low is None or pairs == 0) else max(f0 - f_low, 0.0)
    fresh = math.sqrt(num / s_sum)
    if clamp is not None:
      fresh = min(clamp, fresh)
    if t < warmup:
      gam = warmup_lr(t) if callable(warmup_lr) else warmup_lr
    elif t % gap_k == 0 or t == warmup:
      gam = fresh
    else:
      gam = gam_prev
    m = mu * m + (1 - mu) * g
    direction = np.sign(m if mu > 0 else g)
    x = x - gam * (direction + wd * mask * x)
    g_prev, gam_prev = g, gam
    xs.append(_unflat(x.copy()))
    gammas.append(gam)
  return xs, gammas


def _run(tx, params, grads, values=None, jit=True):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  xs, states = [], []
  for t, g in enumerate(grads):
    extra = {} if values is None else {"value": values[t]}
    u, state = update(jax.tree.map(jnp.asarray, g), state, params, **extra)
    params = optax.apply_updates(params, u)
    xs.append(params)
    states.append(state)
  return xs, states


def _close(got, want, tol=1e-12):
  for g_t, w_t in zip(got, want):
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(g_t[k]), w_t[k], rtol=tol, atol=tol)


CASES = {
    "plain": {},
    "momentum": {"mu": 0.7},
    "gap3": {"gap_k": 3},
    "clamp": {"clamp": 0.02, "d0": 1e-2},
    "warmup": {"warmup": 2, "warmup_lr": 0.003},
    "warmup_gap": {"warmup": 3, "warmup_lr": 0.003, "gap_k": 2},
    "decay": {"wd": 0.1, "decay": {"b": False, "s": True, "u": False,
                                   "w": True}},
}


def _alias_kwargs(case):
  kw = dict(d0=case.get("d0", 1e-8), l0=case.get("l0", 1.0),
            clamp=case.get("clamp"), update_gap=case.get("gap_k", 1),
            warmup_steps=case.get("warmup", 0),
            warmup_learning_rate=case.get("warmup_lr"),
            momentum=case.get("mu", 0.0), weight_decay=case.get("wd", 0.0))
  if "decay" in case:
    kw["weight_decay_mask"] = case["decay"]
  return kw


@pytest.mark.parametrize("name", sorted(CASES))
def test_d_form_matches_float64_reference(x64, name):
  case = CASES[name]
  params, grads = _trees(0, 7)
  want, gammas = _reference(params, grads, **case)
  got, states = _run(alias_sign_sgd(**_alias_kwargs(case)), params, grads)
  _close(got, want)
  np.testing.assert_allclose([float(s[0].step_size) for s in states], gammas,
                             rtol=1e-12)
  assert got[-1]["w"].dtype == jnp.float64


def test_float32_matches_reference_to_tolerance():
  params, grads = _trees(1, 6)
  want, _ = _reference(params, grads, mu=0.5)
  got, _ = _run(alias_sign_sgd(momentum=0.5), params, grads)
  assert got[-1]["w"].dtype == jnp.float32
  _close(got, want, tol=1e-5)


def test_lower_bound_form_matches_reference(x64):
  params, grads = _trees(2, 6)
  values = [3.0, 2.5, 2.0, 1.0, 0.7, 0.5]  # only values[0] = f(x_0) matters
  want, gammas = _reference(params, grads, values=values, f_low=0.2)
  got, states = _run(alias_sign_sgd(f_low=0.2), params, grads, values=values)
  _close(got, want)
  # t = 0 is the probe step sqrt(d0 / L0); later steps use f(x_0) - f_low.
  assert gammas[0] == pytest.approx(1e-4)
  assert float(states[-1][0].initial_value) == 3.0


def test_lower_bound_form_requires_value():
  tx = alias_sign_sgd(f_low=0.0)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="value="):
    tx.update({"w": jnp.ones(3)}, tx.init(params), params)


def test_zero_gradient_step_does_not_divide_by_zero(x64):
  params, grads = _trees(3, 5, zero_step=2)
  want, _ = _reference(params, grads)
  got, states = _run(alias_sign_sgd(), params, grads)
  _close(got, want)
  assert np.isfinite(float(states[-1][0].smoothness_sum))


def test_clamp_is_respected():
  params, grads = _trees(4, 8)
  # A huge gap estimate would give steps far above the clamp.
  _, states = _run(alias_sign_sgd(d0=100.0, l0=1e-3, clamp=0.05), params, grads)
  steps = [float(s[0].step_size) for s in states]
  assert max(steps) <= 0.05 + 1e-9
  assert steps[0] == pytest.approx(0.05)  # sqrt(100 / 1e-3) is clamped


def test_update_gap_holds_step_between_recomputes(x64):
  params, grads = _trees(5, 10)
  _, states = _run(alias_sign_sgd(update_gap=4), params, grads)
  steps = [float(s[0].step_size) for s in states]
  for t in range(10):
    if t % 4:
      assert steps[t] == steps[t - 1]
  assert steps[4] != steps[3] and steps[8] != steps[7]
  # The estimates themselves advance at every step.
  sums = [float(s[0].smoothness_sum) for s in states]
  assert all(b > a for a, b in zip(sums, sums[1:]))


def test_warmup_uses_given_learning_rate():
  params, grads = _trees(6, 6)
  sched = lambda t: 0.01 * (t + 1)
  for lr, want in ((0.02, [0.02] * 3), (sched, [0.01, 0.02, 0.03])):
    tx = alias_sign_sgd(warmup_steps=3, warmup_learning_rate=lr)
    xs, states = _run(tx, params, grads)
    steps = [float(s[0].step_size) for s in states]
    np.testing.assert_allclose(steps[:3], want, rtol=1e-6)
    # |update| of every coordinate is exactly the warm-up step.
    moved = np.abs(np.asarray(xs[1]["w"]) - np.asarray(xs[0]["w"]))
    np.testing.assert_allclose(moved, want[1], rtol=1e-5)
    # The estimates were gathered during warm-up.
    assert int(states[2][0].num_pairs) == 2
    assert steps[3] != want[-1]


def test_momentum_zero_stores_no_buffer():
  params, _ = _trees(7, 1)
  assert alias_sign_sgd().init(params)[0].momentum is None
  assert alias_sign_sgd(momentum=0.9).init(params)[0].momentum is not None


def test_inject_hyperparams_under_jit(x64):
  params, grads = _trees(8, 5)
  values = [2.0, 1.5, 1.0, 0.8, 0.6]
  want, _ = _reference(params, grads, values=values, f_low=0.0, mu=0.5)
  tx = optax.inject_hyperparams(alias_sign_sgd)(f_low=0.0, momentum=0.5)
  got, _ = _run(tx, params, grads, values=values)
  _close(got, want)


# ----------------------------------------------------------------------------
# Convergence with no learning rate (the ALIAS paper's problems).


def _least_squares(seed=0, n=200, dim=20):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, dim))
  b = a @ rng.normal(size=dim) + 0.1 * rng.normal(size=n)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return lambda x, batch=None: 0.5 * jnp.mean((a @ x - b) ** 2), dim


def _logistic(seed=1, n=200, dim=20):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, dim))
  y = np.where(a @ rng.normal(size=dim) + 0.5 * rng.normal(size=n) > 0, 1, -1)
  a, y = jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32)
  return lambda x, batch=None: jnp.mean(jnp.logaddexp(0.0, -y * (a @ x))), dim


def _train(loss, dim, tx, steps):
  x0 = jnp.zeros(dim, jnp.float32)

  @jax.jit
  def run(x):
    def body(carry, _):
      x, state = carry
      f, g = jax.value_and_grad(loss)(x)
      u, state = tx.update(g, state, x, value=f)
      return (optax.apply_updates(x, u), state), f
    (x, _), fs = jax.lax.scan(body, (x, tx.init(x)), None, length=steps)
    return loss(x), fs

  final, _ = run(x0)
  return float(loss(x0)), float(final)


@pytest.mark.parametrize("problem, frac", [("ls", 0.01), ("logreg", 0.15)])
@pytest.mark.parametrize("form", ["d", "lower_bound", "momentum"])
def test_converges_without_learning_rate(problem, frac, form):
  loss, dim = _least_squares() if problem == "ls" else _logistic()
  tx = {"d": alias_sign_sgd(),
        "lower_bound": alias_sign_sgd(f_low=0.0),
        "momentum": alias_sign_sgd(momentum=0.5)}[form]
  start, final = _train(loss, dim, tx, 200)
  assert final < frac * start, (start, final)


# ----------------------------------------------------------------------------
# SOS.


def test_sos_step_makes_sign_sgd_converge_on_least_squares():
  loss, dim = _least_squares()
  steps = 100
  batches = [jnp.zeros(())] * steps  # full-batch: the batch is ignored
  gamma = sos_step_size(loss, jnp.zeros(dim), batches)
  assert 1e-4 < gamma < 1.0
  # The returned step passes the test phi(gamma) >= gamma.
  est = sign_sgd_estimates(loss, jnp.zeros(dim), batches, gamma)
  assert float(est.suggested) >= gamma
  start, final = _train(loss, dim, optax.sign_sgd(gamma), steps)
  assert final < 0.05 * start, (gamma, start, final)
  # Much larger or smaller constant steps do worse.
  _, big = _train(loss, dim, optax.sign_sgd(30 * gamma), steps)
  _, small = _train(loss, dim, optax.sign_sgd(gamma / 30), steps)
  assert final < big and final < small


def test_sos_stochastic_batches_and_lower_bound_form():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(40, 64, 8)).astype(np.float32)
  b = (a @ rng.normal(size=8)).astype(np.float32)
  loss = lambda x, batch: 0.5 * jnp.mean((batch[0] @ x - batch[1]) ** 2)
  batches = (jnp.asarray(a), jnp.asarray(b))  # one stacked pytree, T = 40
  grad = jax.jit(jax.grad(loss))
  for f_low in (None, 0.0):
    gamma = sos_step_size(loss, jnp.zeros(8), batches, f_low=f_low)
    x = jnp.zeros(8)
    for t in range(40):
      x = x - gamma * jnp.sign(grad(x, (a[t], b[t])))
    full = lambda x: 0.5 * jnp.mean((a.reshape(-1, 8) @ x - b.ravel()) ** 2)
    assert float(full(x)) < 0.1 * float(full(jnp.zeros(8)))


def test_sos_bracket_and_argument_errors():
  loss, dim = _least_squares()
  batches = [jnp.zeros(())] * 20
  with pytest.raises(ValueError, match="lower"):
    sos_step_size(loss, jnp.zeros(dim), batches, lower=0.5, upper=5.0)
  with pytest.raises(ValueError, match="upper"):
    sos_step_size(loss, jnp.zeros(dim), batches, lower=1e-3, upper=1e-4)
  with pytest.raises(ValueError, match="at least 2"):
    sos_step_size(loss, jnp.zeros(dim), [jnp.zeros(())])
  # An upper end that still passes is returned as is (it acts as a clamp).
  assert sos_step_size(loss, jnp.zeros(dim), batches, upper=1e-3) == 1e-3


# ----------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup_steps": 2, "warmup_learning_rate": -0.1},
         "warmup_learning_rate"),
        ({"warmup_steps": 2, "warmup_learning_rate": float("nan")},
         "warmup_learning_rate"),
        ({"warmup_steps": 2}, "warmup_learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.5}, "momentum"),
        ({"clamp": 0.0}, "clamp"),
        ({"clamp": -1.0}, "clamp"),
        ({"update_gap": 0}, "update_gap"),
        ({"update_gap": 1.5}, "update_gap"),
        ({"d0": 0.0}, "d0"),
        ({"l0": -1.0}, "l0"),
        ({"f_low": float("nan")}, "f_low"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    alias_sign_sgd(**kwargs)


def test_inject_hyperparams_weight_decay_with_mask(x64):
  params, grads = _trees(9, 4)
  mask = {"b": False, "s": True, "u": False, "w": True}
  want, _ = _reference(params, grads, wd=0.1, decay=mask)
  tx = optax.inject_hyperparams(alias_sign_sgd, static_args="weight_decay_mask")(
      weight_decay=0.1, weight_decay_mask=mask)
  got, _ = _run(tx, params, grads)
  _close(got, want)
  # Built with zero decay (no decay state), with a mask: still runs.
  tx = optax.inject_hyperparams(alias_sign_sgd, static_args="weight_decay_mask")(
      weight_decay=0.0, weight_decay_mask=mask)
  got, _ = _run(tx, params, grads)
  _close(got, _reference(params, grads)[0])
