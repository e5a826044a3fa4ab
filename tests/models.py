"""Small models for the core tests (the library's core never sees the LLM package).

``TinyLM`` is a pre-norm residual language model in Flax NNX: an embedding, ``n_layers``
MLP layers (in an ``nnx.List``, or stacked by ``nnx.vmap``), a final norm and a head.
It has ``loss(batch)`` and no ``layer_cut()``, so :func:`absign_jax.split_nnx` gives
it the plain loss (the steps' program per block); :func:`cut` cuts it at its layers
with :func:`absign_jax.cut_nnx` (the one-program step). Batches are ``{"inputs",
"targets", "mask"}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import absign_jax


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 256
  dim: int = 64
  hidden: int = 128
  n_layers: int = 4
  stacked: bool = False
  dtype: Any = jnp.float32

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
    return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Layer(nnx.Module):
  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)
    self.norm = RMSNorm(cfg.dim, cfg.dtype)
    self.up = nnx.Linear(cfg.dim, cfg.hidden, **kw)
    self.down = nnx.Linear(cfg.hidden, cfg.dim, **kw)

  def __call__(self, h):
    return h + self.down(jax.nn.gelu(self.up(self.norm(h))))


class TinyLM(nnx.Module):
  def __init__(self, cfg: Config = Config(), *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.dim, dtype=cfg.dtype, param_dtype=cfg.dtype,
                           rngs=rngs)
    if cfg.stacked:
      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.n_layers)
      def make(r):
        return Layer(cfg, rngs=r)
      self.layers = make(rngs)
    else:
      self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.dim, cfg.dtype)
    self.head = nnx.Linear(cfg.dim, cfg.vocab, use_bias=False, dtype=cfg.dtype,
                           param_dtype=cfg.dtype, rngs=rngs)

  def head_loss(self, h, targets, mask=None):
    logits = self.head(self.norm(h)).astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    mask = jnp.ones(nll.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1e-9)

  def loss(self, batch):
    h = self.embed(batch["inputs"])
    if self.cfg.stacked:
      graphdef, state = nnx.split(self.layers)
      h, _ = jax.lax.scan(lambda h, s: (nnx.merge(graphdef, s)(h), None), h, state)
    else:
      for layer in self.layers:
        h = layer(h)
    return self.head_loss(h, batch["targets"], batch.get("mask"))


def cut(model: TinyLM) -> absign_jax.NnxParts:
  """``model`` cut at its layers (stacked for training when they are a list)."""
  return absign_jax.cut_nnx(
      model, embed=lambda m, batch: m.embed(batch["inputs"]),
      head_loss=lambda m, h, batch: m.head_loss(h, batch["targets"], batch.get("mask")))


def make_batch(i: int, vocab: int = 256, batch: int = 2, seq: int = 16) -> dict:
  r = np.random.default_rng(1000 + i)
  x = r.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
          "mask": jnp.ones((batch, seq), jnp.float32)}


class Batches:
  """A resumable stream of batches drawn from ``num_sequences`` random token sequences
  (``state()`` / ``restore()``, like the LLM package's data iterator)."""

  def __init__(self, vocab: int = 256, batch: int = 2, seq: int = 8, seed: int = 0,
               num_sequences: int = 10):
    self.batch, self.seed, self.step = batch, seed, 0
    pool = np.random.default_rng(seed).integers(0, vocab, (num_sequences, seq + 1))
    self.pool = pool.astype(np.int32)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = np.random.default_rng([self.seed, self.step]).choice(
        len(self.pool), self.batch, replace=False)
    self.step += 1
    x = self.pool[rows]
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "mask": jnp.ones(x[:, 1:].shape, jnp.float32)}

  def state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "num_sequences": len(self.pool)}

  def restore(self, state: dict) -> "Batches":
    if int(state["seed"]) != self.seed or int(state["num_sequences"]) != len(self.pool):
      raise ValueError(f"batch state {state} does not match this iterator")
    self.step = int(state["step"])
    return self
