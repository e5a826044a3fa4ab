"""Options of the wrong type are one-line errors that name the option and the value.

Checked when the optimizer is built, before any NumPy or JAX call sees the value.
Python ints pass where a float is accepted; bools never pass for a number.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import absign_jax
from absign_jax.blocks import selection


def one_line(excinfo) -> str:
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


@pytest.mark.parametrize("make, kind, match", [
    (lambda: absign_jax.absignsgd(1e-3, depth_bias="10"), TypeError,
     r"^absignsgd: depth_bias must be a finite number >= 0, got '10' \(str\)\.$"),
    (lambda: absign_jax.absignsgd(1e-3, seed="x"), TypeError,
     r"^absignsgd: seed must be an int in \[0, 4294967295\], got 'x' \(str\)\.$"),
    (lambda: absign_jax.absignsgd(1e-3, seed=True), TypeError,
     r"absignsgd: seed must be an int .* got True \(bool\)"),
    (lambda: absign_jax.absignsgd(1e-3, seed=1.0), TypeError, r"seed must be an int"),
    (lambda: absign_jax.absignsgd(1e-3, seed=-1), ValueError,
     r"absignsgd: seed must be an int in \[0, 4294967295\], got -1\."),
    (lambda: absign_jax.absignsgd(1e-3, seed=2**33), ValueError, r"got 8589934592"),
    (lambda: absign_jax.absignsgd(True), TypeError,
     r"absignsgd: learning_rate must be a number > 0 or an optax schedule .* got True"),
    (lambda: absign_jax.absignsgd(np.ones(2)), TypeError, r"learning_rate .*ndarray"),
    (lambda: absign_jax.absignsgd(1e-3, weight_decay="0"), TypeError,
     r"absignsgd: weight_decay must be a finite number >= 0, got '0' \(str\)"),
    (lambda: absign_jax.absignsgd(1e-3, weight_decay=None), TypeError, r"weight_decay"),
    (lambda: absign_jax.absignsgd(1e-3, relative=1), TypeError,
     r"absignsgd: relative must be True or False, got 1 \(int\)"),
    (lambda: absign_jax.absignsgd(1e-3, relative=True, min_scale="small"), TypeError,
     r"absignsgd: min_scale must be a finite number in \(0, inf\)"),
    (lambda: absign_jax.absignsgd(1e-3, min_scale=0.0), ValueError,
     r"absignsgd: min_scale must be finite and in \(0, inf\), got 0"),
    (lambda: absign_jax.absignsgd(1e-3, momentum="0.9", steps_per_block=4), TypeError,
     r"absignsgd: momentum must be a number in \[0, 1\) or None, got '0.9'"),
    (lambda: absign_jax.absignsgd(1e-3, steps_per_block=2.0), TypeError,
     r"absignsgd: steps_per_block must be an int >= 1, got 2.0 \(float\)"),
    (lambda: absign_jax.absignsgd(1e-3, steps_per_block=True), TypeError,
     r"steps_per_block must be an int >= 1, got True \(bool\)"),
    (lambda: absign_jax.absignsgd(1e-3, selection=3), TypeError,
     r"absignsgd: selection must be a scheme name \(one of .*\) or a BlockSelection, "
     r"got 3 \(int\)"),
    (lambda: absign_jax.absignsgd(1e-3, include_embedding=1), TypeError,
     r"include_embedding must be True or False, got 1 \(int\)"),
    (lambda: absign_jax.absignsgd(1e-3, include_head="yes"), TypeError,
     r"include_head must be True or False"),
    (lambda: absign_jax.absignsgd(1e-3, partition="layers"), TypeError,
     r"absignsgd: partition must be None, a callable .* got 'layers' \(str\)"),
    (lambda: absign_jax.block_adam(1e-3, b1="0.9"), TypeError,
     r"block_adam: b1 must be a finite number in \[0, 1\), got '0.9' \(str\)"),
    (lambda: absign_jax.block_adam(1e-3, b2=None), TypeError, r"block_adam: b2 must be"),
    (lambda: absign_jax.block_adam(1e-3, eps=[1e-8]), TypeError, r"block_adam: eps must"),
    (lambda: absign_jax.block_adam(1e-3, steps_per_block="50"), TypeError,
     r"block_adam: steps_per_block must be an int >= 1, got '50'"),
    (lambda: absign_jax.block_adam(1e-3, seed="x"), TypeError, r"block_adam: seed must"),
    (lambda: absign_jax.sign_sgd("1e-3"), TypeError, r"sign_sgd: learning_rate must be"),
    (lambda: absign_jax.sign_sgd(1e-3, weight_decay=False), TypeError,
     r"sign_sgd: weight_decay must be a finite number >= 0, got False \(bool\)"),
    (lambda: absign_jax.scale_by_param_rms("x"), TypeError,
     r"scale_by_param_rms: min_scale must be a finite number"),
    (lambda: absign_jax.block_coordinate(optax.scale_by_sign(), steps_per_block="2"),
     TypeError, r"block_coordinate: steps_per_block must be an int >= 1"),
    (lambda: absign_jax.block_coordinate(optax.scale_by_sign(), reset_on_switch=0),
     TypeError, r"block_coordinate: reset_on_switch must be True or False"),
    (lambda: absign_jax.block_coordinate("sign"), TypeError,
     r"block_coordinate: inner must be an optax GradientTransformation"),
    (lambda: absign_jax.block_coordinate(optax.scale_by_sign(), depth_bias="1"),
     TypeError, r"block_coordinate: depth_bias must be a finite number >= 0"),
    (lambda: absign_jax.alias_absignsgd(d0="1e-8"), TypeError,
     r"alias_absignsgd: d0 must be a finite number > 0, got '1e-8' \(str\)"),
    (lambda: absign_jax.alias_absignsgd(l0=0.0), ValueError,
     r"alias_absignsgd: l0 must be a finite number > 0, got 0"),
    (lambda: absign_jax.alias_absignsgd(f_low="0"), TypeError,
     r"f_low must be a finite number or None"),
    (lambda: absign_jax.alias_absignsgd(clamp=True), TypeError, r"clamp must be"),
    (lambda: absign_jax.alias_absignsgd(update_gap=1.5), TypeError,
     r"update_gap must be an int >= 1, got 1.5"),
    (lambda: absign_jax.alias_absignsgd(warmup_steps="3"), TypeError,
     r"warmup_steps must be an int >= 0"),
    (lambda: absign_jax.alias_absignsgd(warmup_steps=3, warmup_learning_rate="1e-3"),
     TypeError, r"warmup_learning_rate must be a finite number >= 0 or None"),
    (lambda: absign_jax.alias_absignsgd(momentum="0.5"), TypeError, r"momentum must be"),
    (lambda: absign_jax.alias_absignsgd(weight_decay=[0.1]), TypeError,
     r"weight_decay must be"),
    (lambda: absign_jax.alias_absignsgd(seed="x"), TypeError,
     r"alias_absignsgd: seed must be an int"),
])
def test_wrong_type_is_one_line(make, kind, match):
  with pytest.raises(kind, match=match) as excinfo:
    make()
  one_line(excinfo)


@pytest.mark.parametrize("make", [
    lambda: absign_jax.absignsgd(1, weight_decay=0, depth_bias=10, seed=np.int64(3)),
    lambda: absign_jax.absignsgd(np.float32(1e-3), momentum=0, steps_per_block=np.int32(2)),
    lambda: absign_jax.absignsgd(optax.cosine_decay_schedule(1e-3, 100), relative=True,
                                 min_scale=1),
    lambda: absign_jax.absignsgd(jnp.asarray(1e-3), include_head=np.bool_(True)),
    lambda: absign_jax.block_adam(1e-3, b1=0, b2=0, eps=0, selection="cyclic"),
    lambda: absign_jax.sign_sgd(1, weight_decay=np.float16(0.1)),
    lambda: absign_jax.alias_absignsgd(d0=1, l0=2, clamp=1, warmup_steps=2,
                                       warmup_learning_rate=optax.constant_schedule(1e-3)),
    lambda: absign_jax.absignsgd(1e-3, selection=selection.costs([1, 2.5, 3])),
])
def test_accepted_values(make):
  make()
