"""ABSignSGD's one-program fast step on a Flax model the library has never seen.

Run: python any_flax_model.py [--steps 60] [--layers 4] [--dim 64]

The model is a GPT written the way Flax NNX's own examples write one: token and
position embeddings, an ``nnx.List`` of transformer blocks (``nnx.MultiHeadAttention``,
``nnx.LayerNorm``, a GELU MLP) and an output layer. Nothing in it knows about
absign_jax. ``absign_jax.cut_nnx`` cuts it at its blocks (where they live, the part
before them and the part after them), and ``absign_jax.BlockTrainStep`` trains it with
partial backprop: each step backpropagates from the loss down to the one block it
updates, and every block runs through the same compiled program.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import absign_jax


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab: int = 64
  max_len: int = 64
  dim: int = 64
  heads: int = 4
  ff: int = 128
  layers: int = 4
  dtype: str = "float32"

  def num_params(self) -> int:
    block = 4 * self.dim * self.dim + 4 * self.dim + 2 * self.dim * self.ff \
        + self.ff + self.dim + 4 * self.dim
    return (self.vocab + self.max_len) * self.dim + self.layers * block \
        + self.dim * self.vocab


class TransformerBlock(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
    self.layer_norm1 = nnx.LayerNorm(cfg.dim, **kw)
    self.mha = nnx.MultiHeadAttention(num_heads=cfg.heads, in_features=cfg.dim,
                                      decode=False, **kw)
    self.layer_norm2 = nnx.LayerNorm(cfg.dim, **kw)
    self.linear1 = nnx.Linear(cfg.dim, cfg.ff, **kw)
    self.linear2 = nnx.Linear(cfg.ff, cfg.dim, **kw)

  def __call__(self, x):
    mask = nnx.make_causal_mask(x[..., 0])
    x = x + self.mha(self.layer_norm1(x), mask=mask)
    return x + self.linear2(nnx.gelu(self.linear1(self.layer_norm2(x))))


class MiniGPT(nnx.Module):
  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
    self.token_emb = nnx.Embed(cfg.vocab, cfg.dim, **kw)
    self.pos_emb = nnx.Embed(cfg.max_len, cfg.dim, **kw)
    self.transformer_blocks = nnx.List(
        [TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.output_layer = nnx.Linear(cfg.dim, cfg.vocab, use_bias=False, **kw)

  def embed(self, inputs):
    return self.token_emb(inputs) + self.pos_emb(jnp.arange(inputs.shape[-1]))

  def __call__(self, inputs):
    h = self.embed(inputs)
    for block in self.transformer_blocks:
      h = block(h)
    return self.output_layer(h)


def cross_entropy(logits, targets):
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, targets[..., None], -1)[..., 0]
  return jnp.mean(nll)


def cut(model: MiniGPT) -> absign_jax.NnxParts:
  """The model cut at its blocks: everything the fast step needs to know about it."""
  return absign_jax.cut_nnx(
      model, layers="transformer_blocks",
      embed=lambda m, batch: m.embed(batch["inputs"]),
      head_loss=lambda m, h, batch: cross_entropy(m.output_layer(h), batch["targets"]))


def batch_for(rng: np.random.Generator, cfg: GPTConfig, batch: int = 8,
              seq: int = 32) -> dict:
  """Sequences that repeat their first half: the second half is learnable."""
  half = rng.integers(0, cfg.vocab, (batch, seq // 2 + 1))
  x = np.concatenate([half, half], axis=1)[:, :seq + 1].astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--dim", type=int, default=64)
  args = parser.parse_args()

  cfg = GPTConfig(layers=args.layers, dim=args.dim, ff=2 * args.dim)
  parts = cut(MiniGPT(cfg, rngs=nnx.Rngs(0)))
  step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(3e-3),
                                   layered=parts.layered)
  state = step.init(parts.params)
  print(f"{cfg.layers} blocks, {cfg.num_params():,} parameters")

  rng = np.random.default_rng(0)
  held_out = batch_for(np.random.default_rng(1), cfg)
  loss_fn = jax.jit(parts.loss_fn)
  first = float(loss_fn(state.params, held_out))
  for i in range(args.steps):
    block = int(absign_jax.active_block(state.opt_state))
    state, metrics = step(state, batch_for(rng, cfg))
    if i % max(1, args.steps // 6) == 0:
      print(f"step {i:3d}  block {block}  loss {float(metrics['loss']):.4f}")
  last = float(loss_fn(state.params, held_out))
  print(f"held-out loss fell from {first:.4f} to {last:.4f}")
  print(f"compiled step programs: {step.compiled_programs}")

  model = parts.merge(state.params)  # the trained model, in its own layout
  print(f"trained model: {type(model).__name__} with "
        f"{len(model.transformer_blocks)} blocks in an nnx.List")


if __name__ == "__main__":
  main()
