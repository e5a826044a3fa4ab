"""LoRA, GaLore and block_adam's knobs as the fine-tuning program builds them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import absign_jax
from absign_jax.llm import finetune, peers, registry
from absign_jax.llm import model as model_lib
from absign_jax.llm import weights


def _tiny(scan=True, seed=0):
  cfg = model_lib.LlamaConfig.preset("tiny", scan_layers=scan)
  return model_lib.Llama(cfg, rngs=nnx.Rngs(seed))


def _batch(seed=0, b=4, t=16):
  ids = np.random.default_rng(seed).integers(0, 256, (b, t + 1))
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
          "mask": jnp.ones((b, t), jnp.float32)}


@pytest.mark.parametrize("scan", [False, True])
def test_lora_starts_as_the_base_model(scan):
  model = _tiny(scan)
  batch = _batch()
  base_logits = np.asarray(model(batch["inputs"]))
  parts = peers.lora_parts(model, rank=4, alpha=8.0, seed=1)
  lora_model = parts.merge(parts.params)
  np.testing.assert_array_equal(np.asarray(lora_model(batch["inputs"])), base_logits)
  # Only the adapters are trained: 7 projections x 2 matrices, with a layer axis when stacked.
  leaves = jax.tree.leaves(parts.params)
  assert len(leaves) == (14 if scan else 14 * 4)
  assert all(x.shape[0] == 4 for x in leaves) if scan else True
  np.testing.assert_allclose(float(parts.loss_fn(parts.params, parts.wrap(batch))),
                             float(model_lib.Llama.loss(model, batch)), rtol=1e-6)


def test_lora_targets_and_bad_options():
  parts = peers.lora_parts(_tiny(), rank=2, targets=("q_proj", "v_proj"))
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      parts.params)[0]}
  assert all("q_proj" in n or "v_proj" in n for n in names) and len(names) == 4
  with pytest.raises(ValueError, match="LoRA targets"):
    peers.lora_parts(_tiny(), targets=("qkv",))
  with pytest.raises(SystemExit):
    finetune.parse_args(["--lora-targets", "q_proj,nope"])
  with pytest.raises(SystemExit):
    finetune.parse_args(["--task", "math", "--data", "x.txt"])


def _train(parts, tx, steps=15, batch=None):
  step = absign_jax.FullTrainStep(parts.loss_fn, tx, donate=False)
  state = step.init(parts.params)
  batch = parts.wrap(_batch() if batch is None else batch)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state.params, losses


def test_lora_steps_reduce_the_loss_and_leave_the_base_alone():
  model = _tiny()
  parts = peers.lora_parts(model, rank=4, seed=1)
  frozen_before = jax.tree.map(np.asarray, parts.frozen)
  args = finetune.parse_args(["--optimizer", "lora", "--lr", "3e-2"])
  tx = registry.make_optimizer(args, "lora")
  ids = np.tile(np.arange(17) % 5, (4, 1))  # a pattern the adapters can pick up
  batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
           "mask": jnp.ones((4, 16), jnp.float32)}
  _, losses = _train(parts, tx, batch=batch)
  assert losses[-1] < 0.9 * losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, parts.frozen))


def test_galore_steps_reduce_the_loss_on_the_layers_only():
  model = _tiny()
  parts = peers.layer_parts(model)
  assert set(parts.params.keys()) == {"layers"}  # embedding and final norm frozen
  args = finetune.parse_args(["--optimizer", "galore", "--galore-rank", "8", "--lr", "1e-2"])
  tx = registry.make_optimizer(args, "galore")
  params, losses = _train(parts, tx)
  assert losses[-1] < 0.92 * losses[0]
  # The optimizer state holds rank-8 moments, not full ones: per layer, the 64 x 128
  # gate kernel keeps a [64, 8] projector and [8, 128] moments.
  state = tx.init(parts.params)
  sizes = absign_jax.profiling.tree_bytes(state)
  assert sizes < 0.5 * 2 * absign_jax.profiling.tree_bytes(parts.params)


def test_per_layer_equals_the_transform_on_each_layer():
  """GaLore on the stacked leaves equals GaLore run on each layer's own matrices."""
  rng = np.random.default_rng(0)
  stacked = {"w": jnp.asarray(rng.normal(size=(3, 12, 5))),
             "s": jnp.asarray(rng.normal(size=(3, 5)))}
  grads = [{"w": jnp.asarray(rng.normal(size=(3, 12, 5))),
            "s": jnp.asarray(rng.normal(size=(3, 5)))} for _ in range(3)]
  inner = lambda: optax.contrib.scale_by_galore(rank=2, update_proj_gap=2)
  tx = peers.per_layer(inner())
  state = tx.init(stacked)
  outs = []
  for g in grads:
    u, state = tx.update(g, state, stacked)
    outs.append(u)
  for layer in range(3):
    ref = inner()
    params = jax.tree.map(lambda x: x[layer], stacked)
    rstate = ref.init(params)
    for k, g in enumerate(grads):
      u, rstate = ref.update(jax.tree.map(lambda x: x[layer], g), rstate, params)
      for name in ("w", "s"):
        np.testing.assert_allclose(outs[k][name][layer], u[name], rtol=1e-5, atol=1e-6)
  assert outs[0]["w"].shape == (3, 12, 5)


@pytest.mark.parametrize("order, expected", [
    ("ascending", [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0]),
    ("descending", [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0, 3]),
])
def test_block_adam_switch_interval_and_order(order, expected):
  args = finetune.parse_args(["--optimizer", "block_adam", "--switch-every", "3",
                              "--block-order", order])
  tx = registry.make_optimizer(args, "block_adam")
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(4)]}
  state = tx.init(params)
  active = []
  for _ in range(13):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    active.append([i for i, u in enumerate(updates["layers"]) if np.any(u["w"])][0])
  assert active == expected


def test_block_adam_random_order_is_a_permutation_per_pass():
  args = finetune.parse_args(["--optimizer", "block_adam", "--switch-every", "2",
                              "--block-order", "random"])
  tx = registry.make_optimizer(args, "block_adam")
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(4)]}
  state = tx.init(params)
  active = []
  for _ in range(16):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    active.append([i for i, u in enumerate(updates["layers"]) if np.any(u["w"])][0])
  pairs = active[::2]
  assert active[1::2] == pairs  # two steps per block
  assert sorted(pairs[:4]) == [0, 1, 2, 3] and sorted(pairs[4:]) == [0, 1, 2, 3]
  assert pairs != [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("scan", [False, True])
def test_fold_lora_gives_the_base_architecture_with_the_same_function(scan):
  """Folding ``W + (alpha / r) A B`` into the kernels: the model's logits are those of
  the adapted model (float32 rounding of the sum), with no adapter left, and the
  folded kernel equals a float64 sum computed here."""
  model = _tiny(scan)
  parts = peers.lora_parts(model, rank=4, alpha=8.0, seed=1)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype),
                        parts.params)
  adapted = parts.merge(params)
  inputs = _batch()["inputs"]
  want = np.asarray(adapted(inputs))
  q = adapted.layers.self_attn.q_proj if scan else adapted.layers[0].self_attn.q_proj
  w, a, b = (np.asarray(v[...], np.float64) for v in (q.kernel, q.lora_a, q.lora_b))
  folded = peers.fold_lora(adapted)
  assert not jax.tree.leaves(nnx.state(folded, peers.LoRAParam))
  q = folded.layers.self_attn.q_proj if scan else folded.layers[0].self_attn.q_proj
  assert isinstance(q, nnx.Linear)
  np.testing.assert_allclose(np.asarray(q.kernel[...], np.float64), w + 2.0 * a @ b,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(folded(inputs)), want, rtol=2e-4, atol=2e-5)
  # Same parameter paths as the base model: a checkpoint writer sees the base layout.
  base_paths = {p for p, _, _ in weights.named_tensors(_tiny(scan))}
  assert {p for p, _, _ in weights.named_tensors(folded)} == base_paths
