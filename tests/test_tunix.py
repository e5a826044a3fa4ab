"""absign_jax inside Google Tunix (``google-tunix``; skipped where it is absent).

Two ways in, on a tiny random-init Tunix Llama 3:

* ``absignsgd`` as the optimizer of Tunix's ``PeftTrainer``: it trains, one decoder
  layer per step, the embedding and head untouched.
* ``cut_nnx`` of the Tunix model with its positions and attention mask in the cut's
  ``context``: ``BlockTrainStep`` gives the loss and the active layer's gradient of
  Tunix's own forward on a left-padded batch, and leaves the caller's model intact.

examples/tunix_drop_in.py names the install that keeps jax/flax/optax as they are.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.sft import hooks, peft_trainer  # noqa: E402
from tunix.sft import utils as sft_utils  # noqa: E402

import absign_jax  # noqa: E402
from tests.block_steps import sgd_block_steps  # noqa: E402

N, VOCAB, PAD = 3, 48, 0
CONFIG = llama3.ModelConfig(num_layers=N, vocab_size=VOCAB, embed_dim=16, hidden_dim=32,
                            num_heads=4, head_dim=4, num_kv_heads=2, rope_theta=10_000,
                            norm_eps=1e-5)
_LAYER = re.compile(r"\['layers'\]\[(\d+)\]")


def build_model(seed: int) -> llama3.Llama3:
  """Tunix's Llama 3, its layers re-initialised: Tunix starts the MLP kernels at zero
  (where every MLP gradient is zero) and the attention at a scale (0.01) where the
  scores hardly depend on positions or mask, which would leave them untested."""
  model = llama3.Llama3(CONFIG, rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 100)
  for layer in model.layers:
    attn, mlp = layer.attn, layer.mlp
    for w in (attn.q_proj.w, attn.k_proj.w, attn.v_proj.w, attn.o_proj.w,
              mlp.gate_proj.kernel, mlp.up_proj.kernel, mlp.down_proj.kernel):
      key, sub = jax.random.split(key)
      w[...] = 0.5 * jax.random.normal(sub, w.shape)
  return model


def left_padded_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths, width = [12, 7, 10, 5], 12
  tokens = np.full((len(lengths), width), PAD, np.int32)
  for r, n in enumerate(lengths):
    tokens[r, width - n:] = rng.integers(1, VOCAB, n)
  return {"input_tokens": tokens, "input_mask": tokens != PAD}


def positions_and_mask(input_mask) -> dict:
  """Tunix's positions and causal attention mask of a padded batch."""
  return {"positions": sft_utils.build_positions_from_mask(input_mask),
          "attention_mask": sft_utils.make_causal_attn_mask(input_mask)}


def token_loss(logits, tokens, mask):
  """PeftTrainer's default next-token loss, from logits."""
  weight = mask[:, 1:].astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None],
                             -1)[..., 0]
  return jnp.sum(nll * weight) / (jnp.sum(weight) + 1e-8)


def head_loss(model, h, batch):
  logits = model.lm_head(model.final_norm(h))
  return token_loss(logits, batch["input_tokens"], batch["input_mask"])


def cut_tunix(model) -> absign_jax.NnxParts:
  return absign_jax.cut_nnx(
      model, layers="layers",
      embed=lambda m, batch: m.embedder.encode(batch["input_tokens"]),
      head_loss=head_loss,
      layer=lambda layer, h, ctx: layer(h, ctx["positions"], None,
                                        ctx["attention_mask"])[1],
      context=lambda m, batch: positions_and_mask(batch["input_mask"]))


def tunix_loss(model, batch):
  """Through Tunix's own forward (``Llama3.__call__``): no cut."""
  ctx = positions_and_mask(batch["input_mask"])
  logits, _ = model(batch["input_tokens"], ctx["positions"], None, ctx["attention_mask"])
  return token_loss(logits, batch["input_tokens"], batch["input_mask"])


def param_arrays(model) -> dict[str, np.ndarray]:
  """Every parameter of ``model`` as a host copy, by path."""
  return {jax.tree_util.keystr(path): np.array(x) for path, x in
          jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


class Snapshots(hooks.TrainingHooks):
  """The parameters and the optimizer's active layer before every step."""

  def __init__(self):
    self.params: list[dict[str, np.ndarray]] = []
    self.active: list[int] = []

  def on_train_step_start(self, train_ctx) -> None:
    self.params.append(param_arrays(train_ctx.model))
    self.active.append(int(absign_jax.active_block(train_ctx.optimizer.opt_state)))

  def on_train_start(self, train_ctx) -> None:
    pass

  def on_train_end(self, train_ctx) -> None:
    self.params.append(param_arrays(train_ctx.model))

  def on_train_step_end(self, train_ctx, train_step, train_loss) -> None:
    pass

  def on_eval_step_start(self, train_ctx) -> None:
    pass

  def on_eval_step_end(self, train_ctx, eval_loss) -> None:
    pass


def test_absignsgd_trains_inside_the_peft_trainer():
  steps = 6
  model = build_model(0)
  trainer = peft_trainer.PeftTrainer(
      model, absign_jax.absignsgd(1e-2),
      peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=steps,
                                  pbar_description=None))
  trainer = trainer.with_gen_model_input_fn(
      lambda x: {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                 **positions_and_mask(x.input_mask)})
  snapshots = Snapshots()
  trainer.with_training_hooks(snapshots)
  trainer.train([peft_trainer.TrainingInput(**left_padded_batch())] * steps)

  losses = trainer.metrics_logger.get_metric_history("", "loss", "train")
  assert len(losses) == steps
  assert losses[-1] < losses[0] - 0.02
  assert len(snapshots.params) == steps + 1
  for i, (before, after) in enumerate(zip(snapshots.params, snapshots.params[1:])):
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    layers = {int(m.group(1)) for p in changed if (m := _LAYER.search(p))}
    assert all(_LAYER.search(p) for p in changed), changed  # embedding, head frozen
    assert layers == {snapshots.active[i]}, (i, layers, snapshots.active[i])
  assert len(set(snapshots.active)) > 1  # the selection moved on
  first, last = snapshots.params[0], snapshots.params[-1]
  for p in first:
    if "embedder" in p or "final_norm" in p or "lm_head" in p:
      np.testing.assert_array_equal(first[p], last[p])


def test_the_fast_step_on_the_cut_model_matches_tunix_forward_and_grad():
  model = build_model(1)
  batch = jax.tree.map(jnp.asarray, left_padded_batch(1))
  ctx = positions_and_mask(batch["input_mask"])
  # The loss here is the objective PeftTrainer trains by default.
  default = peft_trainer._default_loss_fn(  # pylint: disable=protected-access
      model, batch["input_tokens"], batch["input_mask"], ctx["positions"],
      ctx["attention_mask"])
  reference_loss, reference = nnx.jit(nnx.value_and_grad(tunix_loss))(model, batch)
  assert float(reference_loss) == pytest.approx(float(default), rel=1e-6)

  parts = cut_tunix(model)
  assert parts.layers.num_layers == N and parts.layered.context is not None
  for b, step in enumerate(sgd_block_steps(parts, batch, range(N))):
    np.testing.assert_allclose(step.loss, float(reference_loss), rtol=1e-5)
    want = jax.tree.leaves(nnx.state(reference.layers[b], nnx.Param))
    before, after = step.before, step.after
    assert len(before) == len(want) == 9
    for x, y, w in zip(before, after, want):
      x, y, w = np.asarray(x[b]), np.asarray(y[b]), np.asarray(w)
      # x - (x - g) carries the rounding of x (RMSNorm weights are 1, their
      # gradients 1e-5): allow a few ulp of the weight on top of rtol.
      atol = 4 * float(np.spacing(np.max(np.abs(x))))
      np.testing.assert_allclose(x - y, w, rtol=1e-4, atol=atol)
    others = np.array([i for i in range(N) if i != b])
    for x, y in zip(before, after):
      np.testing.assert_array_equal(np.asarray(x)[others], np.asarray(y)[others])


def test_the_callers_tunix_model_survives_the_donating_step():
  model = build_model(2)
  original = param_arrays(model)
  batch = jax.tree.map(jnp.asarray, left_padded_batch(2))
  parts = cut_tunix(model)
  step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(1e-2),
                                   layered=parts.layered)  # donates its state
  state = step.init(parts.params)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  now = param_arrays(model)  # readable: no buffer of the model was donated
  assert now.keys() == original.keys()
  for p in original:
    np.testing.assert_array_equal(now[p], original[p])
  trained = parts.merge(state.params)
  assert isinstance(trained, llama3.Llama3) and len(trained.layers) == N
  assert float(tunix_loss(trained, batch)) < float(tunix_loss(model, batch))
