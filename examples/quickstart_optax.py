"""Quickstart: ABSignSGD is an optax transformation. Run: python quickstart_optax.py [steps]

The "model" is a plain pytree with a ``layers`` list; each step trains one layer with
sign descent (the deepest layers, cheapest to reach by backprop, most often).
"""
import sys

import jax
import jax.numpy as jnp
import optax

import absign_jax

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
k_x, k_t, *k_layers = jax.random.split(jax.random.key(0), 6)
params = {"layers": [{"w": 0.1 * jax.random.normal(k, (8, 8))} for k in k_layers]}
x = jax.random.normal(k_x, (128, 8))
y = jnp.tanh(x @ jax.random.normal(k_t, (8, 8)))  # a target the 4 layers can fit


def loss_fn(params):
  h = x
  for layer in params["layers"]:
    h = h + jnp.tanh(h @ layer["w"])  # residual layers
  return jnp.mean((h - y) ** 2)


# zero_nans: a NaN gradient coordinate becomes 0, and sign(0) = 0 leaves it alone.
tx = optax.chain(optax.zero_nans(), absign_jax.absignsgd(learning_rate=3e-3))
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state):
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


first = None
for step in range(steps):
  block = int(absign_jax.active_block(opt_state))  # the layer this step trains
  params, opt_state, loss = train_step(params, opt_state)
  first = float(loss) if first is None else first
  if step % max(1, steps // 10) == 0 or step == steps - 1:
    print(f"step {step:4d}  layer {block}  loss {float(loss):.4f}")
print(f"loss fell from {first:.4f} to {float(loss_fn(params)):.4f}")
