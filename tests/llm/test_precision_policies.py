"""Precision policies on the tiny Llama: the program's dtype mapping, and bf16 training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import absign_jax
from absign_jax.llm import loading
from absign_jax.llm.model import Llama, LlamaConfig


def test_policy_maps_to_the_model_dtype():
  policy = absign_jax.policy
  assert loading.model_dtype(policy("fp32")) == "float32"
  assert loading.model_dtype(policy("bf16-sr")) == "bfloat16"
  assert loading.model_dtype(policy("bf16-master")) == "bfloat16"
  # fp16: float16 weights in a model that computes in float32.
  assert loading.model_dtype(policy("fp16")) == "float32"


def test_bf16_stochastic_rounding_follows_fp32_on_tiny_llama():
  """At lr 1e-5 bf16 rounding stalls; stochastic rounding tracks the fp32 loss."""
  cfg = LlamaConfig.preset("tiny", n_layers=2)
  init32 = absign_jax.split_nnx(Llama(cfg, rngs=nnx.Rngs(0))).params
  # The same start for all runs.
  start = absign_jax.train.precision.cast_floating(init32, jnp.bfloat16)
  r = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(r[:, :-1]), "targets": jnp.asarray(r[:, 1:]),
           "mask": jnp.ones((4, 16), jnp.float32)}
  drops = {}
  for name in ("fp32", "bf16", "bf16-sr"):
    pol = absign_jax.policy(name)
    model = Llama(cfg.replace(dtype=loading.model_dtype(pol)), rngs=nnx.Rngs(0))
    parts = absign_jax.split_nnx(model)
    step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(1e-5),
                                     dispatch="switch", **pol.step_options())
    state = step.init(jax.tree.map(jnp.copy, pol.cast_params(start)))  # donated
    losses = []
    for _ in range(30):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    drops[name] = losses[0] - losses[-1]
  assert drops["fp32"] > 0.01, drops
  assert abs(drops["bf16-sr"] - drops["fp32"]) < 0.25 * drops["fp32"], drops
  assert drops["bf16"] < 0.4 * drops["fp32"], drops
