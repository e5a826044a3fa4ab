"""ABSignSGD with Flax NNX: nnx.Optimizer, a learning-rate schedule, an nnx.jit step.

Run: python nnx_training_loop.py [--steps 300]

Each step updates one transformer-like layer of ``model.layers`` with sign descent;
the other layers, the embedding and the head are left bit-for-bit unchanged.
"""
import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import absign_jax


class Layer(nnx.Module):
  """A residual MLP layer: one block of the optimizer."""

  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(self.norm(x))))


class Model(nnx.Module):
  def __init__(self, num_layers: int, dim: int, rngs: nnx.Rngs):
    self.embed = nnx.Linear(4, dim, rngs=rngs)         # frozen by default
    self.layers = nnx.List([Layer(dim, rngs) for _ in range(num_layers)])
    self.head = nnx.Linear(dim, 1, rngs=rngs)          # frozen by default

  def __call__(self, x):
    h = self.embed(x)
    for layer in self.layers:
      h = layer(h)
    return self.head(h)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--layers", type=int, default=6)
  args = parser.parse_args()

  model = Model(args.layers, dim=16, rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=3e-3, warmup_steps=max(1, args.steps // 10),
      decay_steps=args.steps, end_value=3e-4)
  # inject_hyperparams keeps the current learning rate in the optimizer state.
  tx = optax.inject_hyperparams(absign_jax.absignsgd)(learning_rate=schedule,
                                                       weight_decay=1e-2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  spec = absign_jax.block_spec(model)
  print(spec.describe())

  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (256, 4))
  y = jnp.sin(x @ jax.random.normal(kw, (4, 1)))  # a smooth regression target

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = None
  for step in range(args.steps):
    block = int(absign_jax.active_block(optimizer))  # the layer this step trains
    loss = float(train_step(model, optimizer, x, y))
    first = loss if first is None else first
    if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
      lr = float(optimizer.opt_state.hyperparams["learning_rate"][...])
      print(f"step {step:4d}  block {block} ({spec.names[block]})  lr {lr:.2e}  "
            f"loss {loss:.4f}")
  visits = absign_jax.find_state(optimizer.opt_state).selection.visits[...]
  print("visits per layer (shallow -> deep):", [int(v) for v in visits])
  print(f"loss fell from {first:.4f} to {loss:.4f}")


if __name__ == "__main__":
  main()
