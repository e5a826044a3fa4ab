"""Models cut at their layers: NNX (list, dict, vmap-stacked), linen (scan, layers_N).

Every model runs through the one dynamic-index program of ``BlockTrainStep`` and must
give the loss and the updated parameters that plain full backprop of the model's own
loss gives for the active block (sign descent: ``p - lr * sign(g)``), computed here
independently with ``jax.grad``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import absign_jax

LR = 1e-2
VOCAB, DIM, HEADS, FF, N = 64, 32, 2, 64, 3


def batch_for(i: int, batch: int = 2, seq: int = 8) -> dict:
  x = np.random.default_rng(i).integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:])}


def cross_entropy(logits, targets):
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, targets[..., None], -1)[..., 0]
  return jnp.mean(nll)


# ---------------------------------------------------------------------------------
# A transformer as Flax NNX's examples write one (MiniGPT: nnx.List of blocks)
# ---------------------------------------------------------------------------------


class TransformerBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, ff: int, *, rngs: nnx.Rngs):
    self.layer_norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False,
                                      rngs=rngs)
    self.layer_norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.linear1 = nnx.Linear(dim, ff, rngs=rngs)
    self.linear2 = nnx.Linear(ff, dim, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(x[..., 0])
    x = x + self.mha(self.layer_norm1(x), mask=mask)
    return x + self.linear2(nnx.gelu(self.linear1(self.layer_norm2(x))))


class MiniGPT(nnx.Module):
  """``layout``: "list" (nnx.List), "dict" (nnx.Dict) or "stacked" (nnx.vmap)."""

  def __init__(self, layout: str = "list", n: int = N, dim: int = DIM, ff: int = FF,
               *, rngs: nnx.Rngs):
    self.layout, self.n = layout, n
    self.token_emb = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.pos_emb = nnx.Embed(64, dim, rngs=rngs)
    if layout == "stacked":
      @nnx.split_rngs(splits=n)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n)
      def make(r):
        return TransformerBlock(dim, HEADS, ff, rngs=r)
      self.transformer_blocks = make(rngs)
    else:
      blocks = [TransformerBlock(dim, HEADS, ff, rngs=rngs) for _ in range(n)]
      self.transformer_blocks = (
          nnx.List(blocks) if layout == "list" else
          # Names whose natural order is not their string order (block_10 < block_2).
          nnx.Dict({f"block_{10 * i}": b for i, b in enumerate(blocks)}))
    self.output_layer = nnx.Linear(dim, VOCAB, use_bias=False, rngs=rngs)

  def embed(self, inputs):
    return self.token_emb(inputs) + self.pos_emb(jnp.arange(inputs.shape[-1]))

  def logits(self, h):
    return self.output_layer(h)

  def loss(self, batch):
    h = self.embed(batch["inputs"])
    if self.layout == "stacked":
      graphdef, state = nnx.split(self.transformer_blocks)
      h, _ = jax.lax.scan(lambda h, s: (nnx.merge(graphdef, s)(h), None), h, state)
    elif self.layout == "dict":
      for i in range(self.n):
        h = self.transformer_blocks[f"block_{10 * i}"](h)
    else:
      for block in self.transformer_blocks:
        h = block(h)
    return cross_entropy(self.logits(h), batch["targets"])


def cut_minigpt(model):
  return absign_jax.cut_nnx(
      model, layers="transformer_blocks",
      embed=lambda m, batch: m.embed(batch["inputs"]),
      head_loss=lambda m, h, batch: cross_entropy(m.logits(h), batch["targets"]))


def sign_reference(loss, params, blocks, batches, update):
  """Full-backprop sign descent on the given blocks: per step ``(params, grads,
  loss)``; ``update(params, grads, block)`` is the sign step on ``block``'s leaves."""
  grad = jax.jit(jax.value_and_grad(loss))
  out = []
  for b, batch in zip(blocks, batches):
    value, g = grad(params, batch)
    params = update(params, g, b)
    out.append((params, g, float(value)))
  return out


def assert_same_signs(got, want, grads, what):
  """Bitwise equal, except where the reference gradient is zero up to float32
  rounding: there the sign is arbitrary (e.g. an attention key bias, which cancels
  in the softmax, gets a gradient of pure rounding noise)."""
  gs = [np.abs(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)]
  noise = 1e-5 * max(float(g.max()) for g in gs)
  la, lb = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(la) == len(lb) == len(gs), what
  for i, (x, y, g) in enumerate(zip(la, lb, gs)):
    differ = np.asarray(x) != np.asarray(y)
    assert not np.any(differ & (g > noise)), (
        f"{what}, leaf {i}: {int(differ.sum())} entries differ, largest reference "
        f"|g| there {float(g[differ].max())} (noise level {noise})")


def run_fast(parts, steps, residuals=None, selection="cyclic"):
  tx = absign_jax.absignsgd(LR, selection=selection)
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                   residuals=residuals, donate=False)
  state = step.init(parts.params)
  records = []
  for i in range(steps):
    state, m = step(state, batch_for(i))
    records.append((int(m["block"]), float(m["loss"]), state.params))
  return step, records


def assert_leaves_equal(a, b, what):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  for i, (x, y) in enumerate(zip(la, lb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}, leaf {i}")


# ---------------------------------------------------------------------------------
# NNX: list, dict and nnx.vmap-stacked layers, one program, same updates
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["list", "dict", "stacked"])
def test_nnx_cut_equals_full_backprop_of_the_active_block(layout):
  model = MiniGPT(layout, rngs=nnx.Rngs(0))
  parts = cut_minigpt(model)
  # The training view holds the layers stacked, whatever the model's layout.
  assert parts.layered.stack_path == ("transformer_blocks",)
  assert absign_jax.block_spec(parts.params).stacked_range() == (0, N)
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  own_loss = lambda p, batch: nnx.merge(graphdef, p, rest).loss(batch)
  np.testing.assert_allclose(float(parts.loss_fn(parts.params, batch_for(0))),
                             float(own_loss(params0, batch_for(0))), rtol=1e-6)

  steps = 2 * N
  step, fast = run_fast(parts, steps)
  blocks = [b for b, _, _ in fast]
  assert sorted(set(blocks)) == list(range(N))
  assert step.compiled_programs == 1  # one program for every block

  def update(p, g, b):
    # p - lr * sign(g) on layer b's leaves only, found by their paths in the model.
    def leaf(path, w, d):
      keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
      if keys[0] != "transformer_blocks":
        return w
      if layout == "stacked":
        return w.at[b].set(w[b] - LR * jnp.sign(d[b]))
      return w - LR * jnp.sign(d) if keys[1] == (
          b if layout == "list" else f"block_{10 * b}") else w
    return jax.tree_util.tree_map_with_path(leaf, p, g)

  ref = sign_reference(own_loss, params0, blocks,
                       [batch_for(i) for i in range(steps)], update)
  for k, ((b, loss, p), (want, grads, want_loss)) in enumerate(zip(fast, ref)):
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6, err_msg=f"loss, step {k}")
    got = nnx.state(parts.merge(p), nnx.Param)
    assert_same_signs(got, want, grads, f"{layout} params after step {k} (block {b})")
  # merge gives the model back in its own layout.
  back = parts.merge(fast[-1][2])
  assert type(back.transformer_blocks) is type(model.transformer_blocks)


def test_residual_policy_changes_nothing_but_cost():
  """Keeping 0, some or all layers' activations gives identical results."""
  parts = cut_minigpt(MiniGPT("list", n=4, rngs=nnx.Rngs(1)))
  results = {}
  for k in (0, 1, 3, absign_jax.ResidualBudget(max_bytes=10**9)):
    step, rec = run_fast(parts, 6, residuals=k, selection="uniform")
    results[str(k)] = rec
    if not isinstance(k, int):  # a budget that holds every layer keeps n - 1
      assert step.kept_layers(parts.params["transformer_blocks"],
                              jnp.zeros((2, 8, DIM))) == 3
  first = results["0"]
  assert len({b for b, _, _ in first}) > 1
  for name, rec in results.items():
    for (b0, l0, p0), (b1, l1, p1) in zip(first, rec):
      assert b0 == b1
      np.testing.assert_allclose(l1, l0, rtol=1e-6)
      assert_leaves_equal(p1, p0, f"residuals={name}")


def test_residual_policy_bad_input():
  parts = cut_minigpt(MiniGPT("list", rngs=nnx.Rngs(0)))
  tx = absign_jax.absignsgd(LR)
  with pytest.raises(ValueError, match=">= 0"):
    absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered, residuals=-1)
  with pytest.raises(TypeError, match="ResidualBudget"):
    absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered, residuals="all")


def test_list_layers_compile_without_a_copy_of_the_weights():
  """The one program of a list-layer model indexes the stack: its temporaries stay far
  below the layers' bytes, and the parameters are updated in place."""
  model = nnx.eval_shape(lambda: MiniGPT("list", n=12, dim=128, ff=512, rngs=nnx.Rngs(0)))
  parts = cut_minigpt(model)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), parts.params)
  step = absign_jax.BlockTrainStep(parts.loss_fn, absign_jax.absignsgd(LR),
                                   layered=parts.layered, residuals=0)
  batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("inputs", "targets")}
  mem = absign_jax.profiling.program_memory(
      step.lower(jax.eval_shape(step.init, params), batch).compile())
  stack = absign_jax.profiling.tree_bytes(params["transformer_blocks"])
  # What remains is the active layer's weights, gradient and update and the
  # per-layer inputs: about 4 layers' bytes, under half of the 12-layer stack.
  assert mem["temp"] < stack // 2, (mem, stack)
  assert mem["alias"] >= absign_jax.profiling.tree_bytes(params)


def test_cut_nnx_errors_name_the_fix():
  model = MiniGPT("list", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no layers at 'blocks'"):
    absign_jax.cut_nnx(model, layers="blocks", embed=lambda m, b: 0,
                       head_loss=lambda m, h, b: 0)
  with pytest.raises(TypeError, match="layer_cut"):
    absign_jax.cut_nnx(model)
  model.transformer_blocks.append(TransformerBlock(DIM, HEADS, 2 * FF,
                                                   rngs=nnx.Rngs(2)))
  with pytest.raises(ValueError, match="identical"):
    cut_minigpt(model)


# ---------------------------------------------------------------------------------
# linen: layers_0 .. layers_N, and an nn.scan stack
# ---------------------------------------------------------------------------------


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    h = nn.SelfAttention(num_heads=HEADS)(h, mask=nn.make_causal_mask(x[..., 0]))
    x = x + h
    x = x + nn.Dense(DIM)(nn.gelu(nn.Dense(FF)(nn.LayerNorm()(x))))
    return x, None


class LinenGPT(nn.Module):
  scan: bool = False

  def setup(self):
    self.embedding = nn.Embed(VOCAB, DIM)
    if self.scan:
      self.layers = nn.scan(LinenBlock, variable_axes={"params": 0},
                            split_rngs={"params": True}, length=N)()
    else:
      self.layers = [LinenBlock() for _ in range(N)]  # params layers_0 .. layers_2
    self.head = nn.Dense(VOCAB, use_bias=False)

  def embed(self, batch):
    return self.embedding(batch["inputs"])

  def head_loss(self, h, batch):
    return cross_entropy(self.head(h), batch["targets"])

  def __call__(self, batch):
    h = self.embed(batch)
    if self.scan:
      h, _ = self.layers(h, None)
    else:
      for layer in self.layers:
        h, _ = layer(h)
    return self.head_loss(h, batch)


@pytest.mark.parametrize("scan", [False, True])
def test_linen_cut_equals_full_backprop_of_the_active_block(scan):
  module = LinenGPT(scan=scan)
  variables = module.init(jax.random.key(0), batch_for(0))
  parts = absign_jax.cut_linen(
      module, variables, layers="layers", layer=LinenBlock(),
      embed=LinenGPT.embed, head_loss=LinenGPT.head_loss)
  assert parts.layers.layout == ("stacked" if scan else "siblings")
  own_loss = lambda p, batch: module.apply({"params": p}, batch)

  steps = 2 * N
  step, fast = run_fast(parts, steps)
  blocks = [b for b, _, _ in fast]
  assert sorted(set(blocks)) == list(range(N)) and step.compiled_programs == 1

  def update(p, g, b):
    if scan:
      return {**p, "layers": jax.tree.map(
          lambda w, d: w.at[b].set(w[b] - LR * jnp.sign(d[b])), p["layers"],
          g["layers"])}
    name = f"layers_{b}"
    return {**p, name: jax.tree.map(lambda w, d: w - LR * jnp.sign(d), p[name],
                                    g[name])}

  ref = sign_reference(own_loss, variables["params"], blocks,
                       [batch_for(i) for i in range(steps)], update)
  for k, ((b, loss, p), (want, grads, want_loss)) in enumerate(zip(fast, ref)):
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6, err_msg=f"loss, step {k}")
    restored = parts.restore(p)
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    assert_same_signs(restored, want, grads, f"linen params after step {k} (block {b})")


def test_cut_of_a_pure_tree_with_a_dict_of_layers_in_a_given_order():
  params = {"emb": jnp.full((3,), 0.5),
            "layers": {"first": {"w": jnp.full((3, 3), 0.2)},
                       "second": {"w": jnp.eye(3)}}}
  c = absign_jax.cut(params, embed=lambda p, x: x * p["emb"],
                     layer=lambda w, h: jnp.tanh(h @ w["w"]),
                     head_loss=lambda p, h, x: jnp.sum(h ** 2),
                     layers="layers", order=["second", "first"])
  x = jnp.arange(3.0)
  want = jnp.sum(jnp.tanh(jnp.tanh(x * 0.5 @ jnp.eye(3)) @ jnp.full((3, 3), 0.2)) ** 2)
  np.testing.assert_allclose(float(c.loss_fn(c.params, x)), float(want), rtol=1e-6)
  assert_leaves_equal(c.restore(c.params), params, "restore")
  with pytest.raises(ValueError, match="exactly once"):
    absign_jax.cut(params, embed=lambda p, x: x, layer=lambda w, h: h,
                   head_loss=lambda p, h, x: 0.0, order=["first"])
