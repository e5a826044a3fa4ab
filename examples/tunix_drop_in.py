"""absign_jax in Google Tunix: ABSignSGD in Tunix's trainer, then the fast step.

Run: python tunix_drop_in.py [--steps 8] [--layers 4]

Two ways in, on a tiny random-init Tunix Llama 3 (``tunix.models.llama3``):

(a) ``absign_jax.absignsgd`` is an optax optimizer, so it is the ``optimizer`` of
    Tunix's ``PeftTrainer`` (``tunix.sft``) as it stands: Tunix computes the full
    gradient, the optimizer updates one decoder layer per step.
(b) ``absign_jax.cut_nnx`` cuts the same Tunix model at ``model.layers`` and
    ``absign_jax.BlockTrainStep`` trains it with partial backprop (one compiled program
    for every layer). The batch is left-padded as Tunix pads: its positions and
    attention mask come from the padding, computed once per step by the cut's
    ``context`` with Tunix's own helpers, and every decoder layer is handed them.

Install: google-tunix 0.1.7 pins ``safetensors<0.8``, so a plain ``pip install
google-tunix`` downgrades safetensors, transformers and tokenizers (not jax, flax,
optax or orbax). In an environment that must keep them, install it beside them::

  python -m venv /tmp/tunix-venv --system-site-packages
  /tmp/tunix-venv/bin/pip install --no-deps google-tunix==0.1.7
  /tmp/tunix-venv/bin/pip install google-metrax jaxtyping sentencepiece perfetto pandas
  /tmp/tunix-venv/bin/python examples/tunix_drop_in.py
"""
from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import hooks, peft_trainer
from tunix.sft import utils as sft_utils

import absign_jax

PAD = 0


def tiny_config(layers: int = 4) -> llama3.ModelConfig:
  """A Llama 3 small enough to compile and train in seconds on a CPU."""
  return llama3.ModelConfig(num_layers=layers, vocab_size=64, embed_dim=32,
                            hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
                            rope_theta=10_000, norm_eps=1e-5)


def build_model(config: llama3.ModelConfig, seed: int = 0) -> llama3.Llama3:
  """Tunix's Llama 3 with random weights throughout.

  Tunix initialises the MLP kernels to zero (its weights are meant to be loaded).
  With gate, up and down projections all zero, every MLP gradient is zero as well,
  so a model trained from scratch needs them random.
  """
  model = llama3.Llama3(config, rngs=nnx.Rngs(seed))
  init = nnx.initializers.lecun_normal()
  key = jax.random.key(seed + 1)
  for layer in model.layers:
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
      key, sub = jax.random.split(key)
      proj.kernel[...] = init(sub, proj.kernel.shape)
  return model


def counting_batch(rng: np.random.Generator, vocab: int, rows: int = 4,
                   width: int = 16) -> dict[str, np.ndarray]:
  """Left-padded rows of varied length that count up in a stride of 1-3 (mod vocab)."""
  tokens = np.full((rows, width), PAD, np.int32)
  for r in range(rows):
    n = int(rng.integers(width // 2, width + 1))
    start, stride = rng.integers(0, vocab - 1), rng.integers(1, 4)
    tokens[r, width - n:] = 1 + (start + stride * np.arange(n)) % (vocab - 1)
  return {"input_tokens": tokens, "input_mask": tokens != PAD}


# -- The pieces of the cut --------------------------------------------------------


def positions_and_mask(input_mask: jax.Array) -> dict[str, jax.Array]:
  """Positions and causal attention mask of a padded batch, as Tunix derives them."""
  return {"positions": sft_utils.build_positions_from_mask(input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(input_mask)}


def padding_context(model: llama3.Llama3, batch: dict) -> dict[str, jax.Array]:
  """The cut's ``context``: computed once per step, handed to every layer."""
  return positions_and_mask(batch["input_mask"])


def embed(model: llama3.Llama3, batch: dict) -> jax.Array:
  return model.embedder.encode(batch["input_tokens"])


def decoder_layer(layer: llama3.DecoderLayer, h: jax.Array, ctx: dict) -> jax.Array:
  """One Tunix decoder layer, without a KV cache (it returns ``(cache, h)``)."""
  _, h = layer(h, ctx["positions"], None, ctx["attention_mask"])
  return h


def token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Next-token cross entropy over the real targets, as PeftTrainer's default loss."""
  logits = logits[:, :-1]
  weight = mask[:, 1:].astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  return jnp.sum(nll * weight) / (jnp.sum(weight) + 1e-8)


def head_loss(model: llama3.Llama3, h: jax.Array, batch: dict) -> jax.Array:
  h = model.final_norm(h)
  logits = model.embedder.decode(h) if model.config.weight_tying else model.lm_head(h)
  return token_loss(logits, batch["input_tokens"], batch["input_mask"])


def cut_tunix(model: llama3.Llama3) -> absign_jax.NnxParts:
  """The Tunix model cut at its decoder layers (stacked once, for training)."""
  return absign_jax.cut_nnx(model, layers="layers", embed=embed, head_loss=head_loss,
                            layer=decoder_layer, context=padding_context)


def tunix_loss(model: llama3.Llama3, batch: dict) -> jax.Array:
  """The loss through Tunix's own forward (``Llama3.__call__``), no cut."""
  ctx = positions_and_mask(batch["input_mask"])
  logits, _ = model(batch["input_tokens"], ctx["positions"], None,
                    ctx["attention_mask"])
  return token_loss(logits, batch["input_tokens"], batch["input_mask"])


# -- (a) absignsgd as PeftTrainer's optimizer ---------------------------------------


def model_inputs(x: peft_trainer.TrainingInput) -> dict[str, Any]:
  """What PeftTrainer's default loss takes, from a padded ``TrainingInput``."""
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          **positions_and_mask(x.input_mask)}


class ActiveLayerLog(hooks.TrainingHooks):
  """Records the layer each step trains (the optimizer's active block)."""

  def __init__(self):
    self.layers: list[int] = []

  def on_train_step_start(self, train_ctx: peft_trainer.PeftTrainer) -> None:
    self.layers.append(int(absign_jax.active_block(train_ctx.optimizer.opt_state)))

  # The rest of the hooks Tunix declares abstract: nothing to do.
  def on_train_start(self, train_ctx: peft_trainer.PeftTrainer) -> None:
    pass

  def on_train_end(self, train_ctx: peft_trainer.PeftTrainer) -> None:
    pass

  def on_train_step_end(self, train_ctx: peft_trainer.PeftTrainer, train_step: int,
                        train_loss: float) -> None:
    pass

  def on_eval_step_start(self, train_ctx: peft_trainer.PeftTrainer) -> None:
    pass

  def on_eval_step_end(self, train_ctx: peft_trainer.PeftTrainer,
                       eval_loss: float) -> None:
    pass


def train_with_peft_trainer(config: llama3.ModelConfig, batches: list[dict],
                            lr: float) -> tuple[list[float], list[int]]:
  """``absignsgd`` as Tunix PeftTrainer's optimizer; the loss and layer of each step."""
  model = build_model(config)
  trainer = peft_trainer.PeftTrainer(
      model, absign_jax.absignsgd(lr),
      peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=len(batches),
                                  pbar_description=None))
  trainer = trainer.with_gen_model_input_fn(model_inputs)
  log = ActiveLayerLog()
  trainer.with_training_hooks(log)
  trainer.train([peft_trainer.TrainingInput(**b) for b in batches])
  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  return [float(x) for x in losses], log.layers


# -- (b) the fast step on the cut Tunix model ---------------------------------------


def train_with_block_step(config: llama3.ModelConfig, batches: list[dict],
                          lr: float) -> tuple[list[float], list[int], llama3.Llama3,
                                              int]:
  """BlockTrainStep on the cut model; the losses, layers, trained model, programs."""
  parts = cut_tunix(build_model(config))
  step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(lr),
                                   layered=parts.layered)
  state = step.init(parts.params)
  losses, layers = [], []
  for batch in batches:
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    losses.append(float(metrics["loss"]))
    layers.append(int(metrics["block"]))
  return losses, layers, parts.merge(state.params), step.compiled_programs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-2)
  args = parser.parse_args()
  config = tiny_config(args.layers)
  rng = np.random.default_rng(0)
  pool = [counting_batch(rng, config.vocab_size) for _ in range(2)]
  batches = [pool[i % len(pool)] for i in range(args.steps)]

  print(f"(a) Tunix PeftTrainer, optimizer absign_jax.absignsgd({args.lr:g}), "
        f"Llama3 with {args.layers} layers")
  losses, layers = train_with_peft_trainer(config, batches, args.lr)
  trainer_losses = losses
  for i, (loss, layer) in enumerate(zip(losses, layers)):
    print(f"  step {i:2d}  layer {layer}  loss {loss:.4f}")
  print(f"  loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")

  print(f"(b) absign_jax.BlockTrainStep on the Tunix Llama3 cut at model.layers "
        f"(left-padded batches, positions and mask from the cut's context)")
  losses, layers, trained, programs = train_with_block_step(config, batches, args.lr)
  for i, (loss, layer) in enumerate(zip(losses, layers)):
    print(f"  step {i:2d}  layer {layer}  loss {loss:.4f}")
  print(f"  loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")
  gap = max(abs(a - b) for a, b in zip(losses, trainer_losses))
  print(f"  compiled step programs: {programs}; largest loss difference from (a), "
        f"same model, optimizer and batches: {gap:.1e}")
  after = float(tunix_loss(trained, jax.tree.map(jnp.asarray, batches[0])))
  print(f"  merged back: {type(trained).__name__} with {len(trained.layers)} layers "
        f"in {type(trained.layers).__name__}; Tunix's own forward on the first batch: "
        f"loss {after:.4f}")


if __name__ == "__main__":
  main()
