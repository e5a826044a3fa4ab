"""Llama NNX model (absign_jax.llm.model) on the tiny preset: layouts, remat, chunked
loss, bf16, the training cut and KV-cache generation (absign_jax.llm.generate)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import absign_jax
from absign_jax.llm import generate as GEN
from absign_jax.llm import model as M
from absign_jax.llm import weights as W

TINY = M.LlamaConfig.preset("tiny")


def make(cfg=TINY, seed=0) -> M.Llama:
  """A model with numpy-drawn weights: no per-op XLA compiles, unlike eager init."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: M.Llama(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":  # norms: near one, so they matter
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    else:
      x = 0.05 * rng.standard_normal(leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  nnx.replace_by_pure_dict(
      state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def batch_for(cfg=TINY, b=2, t=None, seed=0, mask=None):
  t = cfg.max_seq_len if t is None else t
  x = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t + 1))
  m = np.ones((b, t), np.float32) if mask is None else mask
  return {"inputs": jnp.asarray(x[:, :-1], jnp.int32),
          "targets": jnp.asarray(x[:, 1:], jnp.int32), "mask": jnp.asarray(m)}


@nnx.jit
def loss_and_grads(model, batch):
  return nnx.value_and_grad(lambda m: m.loss(batch))(model)


@nnx.jit
def loss_of(model, batch):
  return model.loss(batch)


@nnx.jit
def logits_of(model, inputs):
  return model(inputs)


def layer_grads(grads, model, i):
  """Gradient of layer i as a pure dict, whatever the layout."""
  g = nnx.to_pure_dict(grads)["layers"]
  return jax.tree.map(lambda x: x[i], g) if model.stacked else g[i]


def max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))), a, b)))


def test_parameter_layout_names():
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(make()))}
  assert "embed_tokens/embedding" in paths
  assert "layers/0/self_attn/q_proj/kernel" in paths
  assert "layers/3/mlp/down_proj/kernel" in paths
  assert "norm/scale" in paths and "lm_head/kernel" in paths
  tied = make(TINY.replace(tie_embeddings=True))
  assert tied.lm_head is None
  assert not any(p[0] == "lm_head" for p, _ in nnx.to_flat_state(nnx.state(tied)))


def test_stacked_layout_has_leading_layer_axis():
  m = make(TINY.replace(scan_layers=True))
  assert m.stacked and not make().stacked
  for leaf in jax.tree.leaves(nnx.state(m.layers)):
    assert leaf.shape[0] == TINY.n_layers
  assert nnx.state(m.layers)["self_attn"]["q_proj"]["kernel"].shape == (4, 64, 64)


def test_list_and_stacked_layouts_give_same_loss_and_grads():
  m = make()
  ms = W.convert_layout(m, scan_layers=True)
  assert ms.stacked
  batch = batch_for()
  l, g = loss_and_grads(m, batch)
  ls, gs = loss_and_grads(ms, batch)
  np.testing.assert_allclose(l, ls, rtol=1e-6)
  for i in (0, 3):
    assert max_abs_diff(layer_grads(g, m, i), layer_grads(gs, ms, i)) < 1e-6
  back = W.convert_layout(ms, scan_layers=False)
  assert max_abs_diff(nnx.state(back), nnx.state(m)) == 0


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_same_loss_and_grads(scan):
  m = make(TINY.replace(scan_layers=scan))
  mr = make(TINY.replace(scan_layers=scan, remat=True))
  batch = batch_for()
  l, g = loss_and_grads(m, batch)
  lr, gr = loss_and_grads(mr, batch)
  np.testing.assert_allclose(l, lr, rtol=1e-6)
  assert max_abs_diff(g, gr) < 1e-6


def test_chunked_loss_matches_unchunked_and_masks():
  batch = batch_for(mask=(np.random.default_rng(1).random((2, 64)) > 0.3).astype(np.float32))
  m = make()
  mc = make(TINY.replace(loss_chunk=48))  # 128 tokens: 3 chunks, the last padded
  l, g = loss_and_grads(m, batch)
  lc, gc = loss_and_grads(mc, batch)
  np.testing.assert_allclose(l, lc, rtol=1e-6)
  assert max_abs_diff(g, gc) < 1e-6
  # Reference: cross-entropy from the full logits, averaged over mask > 0.
  logits = logits_of(m, batch["inputs"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  ref = jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])
  np.testing.assert_allclose(l, ref, rtol=1e-5)


def test_masked_tokens_do_not_affect_loss():
  m = make()
  mask = np.ones((2, 64), np.float32)
  mask[:, :10] = 0
  b1 = batch_for(mask=mask)
  b2 = dict(b1, targets=b1["targets"].at[:, :10].set(7))
  np.testing.assert_allclose(loss_of(m, b1), loss_of(m, b2), rtol=1e-6)


def test_pieces_reproduce_loss():
  """embed, the layers (one at a time through ``layer_cut``'s functions, or
  ``run_layers`` over a split range) and head_loss give the loss, in both layouts."""
  batch = batch_for()
  m = make()
  ms = W.convert_layout(m, scan_layers=True)
  ref = loss_of(m, batch)
  cut = m.layer_cut()

  @nnx.jit
  def by_pieces(m, batch):
    h, ctx = cut.embed(m, batch), cut.context(m, batch)
    for i in range(m.n_layers):
      h = cut.layer(m.layers[i], h, ctx)
    split = m.run_layers(m.run_layers(m.embed(batch["inputs"]), 0, 1), 1)
    return cut.head_loss(m, h, batch), m.head_loss(split, batch["targets"])

  @nnx.jit
  def by_stacked_pieces(ms, batch):
    split = ms.run_layers(ms.run_layers(ms.embed(batch["inputs"]), 0, 1), 1, 4)
    return ms.head_loss(split, batch["targets"], batch["mask"])

  np.testing.assert_allclose(by_pieces(m, batch), [ref, ref], rtol=1e-6)
  np.testing.assert_allclose(by_stacked_pieces(ms, batch), ref, rtol=1e-5)


def test_layer_cut_is_the_training_steps_view_of_the_model():
  """``layer_cut()``: both layouts give the same stacked training view and loss,
  and ``merge`` puts trained parameters back in the model's own layout."""
  batch = batch_for()
  m = make()
  ms = W.convert_layout(m, scan_layers=True)
  parts, sparts = absign_jax.split_nnx(m), absign_jax.split_nnx(ms)
  for p in (parts, sparts):
    assert isinstance(p.layered, absign_jax.LayeredLoss)
    assert p.layered.stack_path == ("layers",)
    np.testing.assert_allclose(jax.jit(p.layered.loss)(p.params, batch),
                               loss_of(m, batch), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(p.loss_fn)(p.params, batch),
                               loss_of(m, batch), rtol=1e-5)
  # The list layout is stacked for training: the same leaves as the stacked model.
  for a, b in zip(jax.tree.leaves(parts.params), jax.tree.leaves(sparts.params)):
    np.testing.assert_array_equal(a, b)
  assert sparts.layers is None and parts.layers.layout == "list"
  back = parts.merge(parts.params)
  assert not back.stacked
  for a, b in zip(jax.tree.leaves(nnx.state(back, nnx.Param)),
                  jax.tree.leaves(nnx.state(m, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_stacked_layer_under_jit_with_traced_index():
  """The training view runs the layer a traced index picks out of the stack."""
  m = make()
  parts = absign_jax.split_nnx(m)
  h = m.embed(batch_for()["inputs"])

  @jax.jit
  def run(stack, i, h):
    return parts.layered.apply_layer(jax.tree.map(lambda x: x[i], stack), h)

  @nnx.jit
  def reference(m, h):
    return m.layers[2](h)

  np.testing.assert_allclose(run(parts.params["layers"], 2, h), reference(m, h),
                             rtol=1e-5, atol=1e-5)


def test_causal_and_logits_dtype():
  m = make()
  x = batch_for()["inputs"]
  logits = logits_of(m, x)
  assert logits.shape == (2, 64, 256) and logits.dtype == jnp.float32
  x2 = x.at[:, 40:].set(3)
  np.testing.assert_allclose(logits_of(m, x2)[:, :40], logits[:, :40], rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits_of(m, x2)[:, 40:], logits[:, 40:])


def test_rope_is_relative():
  """<rope(q, p), rope(k, s)> depends on p - s only (rotate-half convention)."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def dot(p, s):
    cq, sq = M.rope_tables(jnp.array([p]), 16, 10000.0)
    ck, sk = M.rope_tables(jnp.array([s]), 16, 10000.0)
    return float(jnp.sum(M.apply_rope(q, cq, sq) * M.apply_rope(k, ck, sk)))

  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)
  np.testing.assert_allclose(dot(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
  # Rotate-half pairs dimension j with j + d/2: position 1 rotates (x0, x8).
  c, s = M.rope_tables(jnp.array([1]), 16, 10000.0)
  e0 = jnp.zeros((1, 1, 1, 16)).at[..., 0].set(1.0)
  r = M.apply_rope(e0, c, s)[0, 0, 0]
  np.testing.assert_allclose([r[0], r[8]], [np.cos(1.0), np.sin(1.0)], rtol=1e-6)


def test_xla_attention_matches_einsum():
  m = make()
  mx = make(TINY.replace(attn_impl="xla"))
  x = batch_for()["inputs"]
  np.testing.assert_allclose(logits_of(m, x), logits_of(mx, x), rtol=1e-4, atol=1e-4)


def test_qk_norm_and_head_dim():
  cfg = TINY.replace(qk_norm=True, head_dim=8)
  m = make(cfg)
  assert nnx.state(m)["layers"][0]["self_attn"]["q_proj"]["kernel"].shape == (64, 32)
  assert np.isfinite(float(loss_of(m, batch_for())))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n == cfg.num_params()


def test_bf16_forward_and_grads_finite():
  cfg = TINY.replace(dtype=jnp.bfloat16)
  assert cfg.dtype == "bfloat16"
  m = make(cfg)
  assert nnx.state(m)["layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  batch = batch_for()
  logits, loss = nnx.jit(lambda m, b: (m(b["inputs"]), m.loss(b)))(m, batch)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  l, g = loss_and_grads(make(cfg.replace(scan_layers=True, remat=True, loss_chunk=32)), batch)
  assert l.dtype == jnp.float32 and np.isfinite(float(l))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  # bf16 loss is close to the f32 loss of the same (rounded) weights.
  m32 = make(TINY)
  nnx.update(m32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(m)))
  np.testing.assert_allclose(float(loss), float(loss_of(m32, batch)), rtol=2e-2)


def test_presets():
  assert set(M.PRESETS) >= {"tiny", "gpt2-small", "smollm2-135m", "qwen3-8b"}
  q = M.LlamaConfig.preset("qwen3-8b")
  assert (q.n_layers, q.dim, q.n_heads, q.n_kv_heads, q.head_size, q.hidden_dim,
          q.vocab_size, q.tie_embeddings, q.dtype, q.remat) == (
              36, 4096, 32, 8, 128, 12288, 151936, False, "bfloat16", True)
  assert q.loss_chunk > 0 and abs(q.num_params() / 1e9 - 8.19) < 0.01
  s = M.LlamaConfig.preset("smollm2-135m")
  assert abs(s.num_params() / 1e6 - 134.5) < 0.5 and s.tie_embeddings
  g = M.LlamaConfig.preset("gpt2-small", scan_layers=True)
  abstract = nnx.eval_shape(lambda: M.Llama(g, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == g.num_params()
  with pytest.raises(KeyError, match="unknown preset"):
    M.LlamaConfig.preset("gpt5")
  with pytest.raises(ValueError, match="n_kv_heads"):
    TINY.replace(n_kv_heads=3)


def test_tiny_train_step_is_fast():
  m = make()
  batch = batch_for(b=4)
  opt_state = nnx.state(m, nnx.Param)

  @jax.jit
  def step(params, batch):
    gd = nnx.graphdef(m)
    loss, g = jax.value_and_grad(lambda p: nnx.merge(gd, p).loss(batch))(params)
    return jax.tree.map(lambda p, g: p - 1e-3 * jnp.sign(g), params, g), loss

  params, l0 = step(opt_state, batch)
  jax.block_until_ready(params)
  t = time.perf_counter()
  for _ in range(5):
    params, loss = step(params, batch)
  jax.block_until_ready(loss)
  assert (time.perf_counter() - t) / 5 < 0.5
  assert float(loss) < float(l0)


PROMPT = np.random.default_rng(0).integers(0, 256, 9)
NEW = 12


@pytest.mark.parametrize("scan", [False, True])
def test_generate_matches_uncached_greedy(scan):
  m = make(TINY.replace(scan_layers=scan), seed=3)
  out = GEN.generate(m, PROMPT, NEW)
  # Uncached reference: full forward on a fixed-length buffer (causal, so the
  # zero padding after position n-1 cannot change its logits).
  buf = np.zeros((2, 64), np.int32)  # the shape other tests compiled already
  buf[0, :9] = PROMPT
  for n in range(9, 9 + NEW):
    buf[0, n] = int(jnp.argmax(logits_of(m, jnp.asarray(buf))[0, n - 1]))
  assert out.tolist() == buf[0, 9:9 + NEW].tolist()


def test_generate_batch_sampling_and_eos():
  m = make(seed=3)
  greedy = GEN.generate(m, PROMPT, NEW)
  prompts = np.stack([PROMPT, PROMPT[::-1]])
  batched = GEN.generate(m, prompts, NEW)
  assert batched.shape == (2, NEW) and (batched[0] == greedy).all()
  a = GEN.generate(m, prompts, NEW, temperature=1.0, seed=1)
  b = GEN.generate(m, prompts, NEW, temperature=1.0, seed=1)
  c = GEN.generate(m, prompts, NEW, temperature=1.0, seed=2)
  assert (a == b).all() and not (a == c).all() and a.min() >= 0 and a.max() < 256
  top1 = GEN.generate(m, prompts, NEW, temperature=1.0, top_k=1, seed=5)
  assert (top1 == batched).all()  # top-1 sampling is greedy
  cut = GEN.generate(m, PROMPT, NEW, eos_id=int(greedy[3]))
  assert cut.tolist() == greedy[: greedy.tolist().index(greedy[3]) + 1].tolist()
  with pytest.raises(ValueError, match="exceeds the model context"):
    GEN.generate(m, np.arange(60), 10)


GEMMA_LIKE = TINY.replace(
    mlp_act="gelu_tanh", qk_norm=True, sandwich_norm=True, norm_unit_offset=True,
    embed_scale=True, sliding_window=4, rope_local_theta=100.0,
    layer_types=("sliding_attention", "full_attention") * 2)


@pytest.mark.parametrize("cfg", [GEMMA_LIKE, TINY.replace(sliding_window=4)],
                         ids=["gemma3", "mistral"])
def test_generate_batch_matches_generate_with_windows_and_sandwich_norms(cfg):
  """Left-padded batches decode as single prompts do, sliding windows (mixed with
  full layers or on every layer) and Gemma's norms included."""
  m = make(cfg, seed=3)
  prompts = [PROMPT[:3].tolist(), PROMPT.tolist(), PROMPT[::-1][:6].tolist()]
  want = [GEN.generate(m, p, 8, eos_id=2).tolist() for p in prompts]
  assert GEN.generate_batch(m, prompts, 8, eos_id=2, batch_size=2) == want


def test_eval_loss_is_token_weighted():
  m = make()
  b1 = batch_for(seed=1)
  mask = np.zeros((2, 64), np.float32)
  mask[0, :16] = 1
  b2 = batch_for(seed=2, mask=mask)
  l1, l2 = float(loss_of(m, b1)), float(loss_of(m, b2))
  np.testing.assert_allclose(M.eval_loss(m, [b1, b2]), (l1 * 128 + l2 * 16) / 144, rtol=1e-5)
