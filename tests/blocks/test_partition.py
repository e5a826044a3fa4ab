"""Block partition on real Flax modules and on plain parameter dicts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import absign_jax
from absign_jax.blocks import partition


def blocks_by_path(spec) -> dict[str, int | None]:
  return {p: lb.block for p, lb in zip(spec.leaf_paths, spec.leaf_blocks)}


def layer_index_from_path(path: str, container: str) -> int:
  """The integer right after ``container.`` in a dotted path."""
  rest = path[len(container) + 1:]
  return int(rest.split(".")[0])


# ---------------------------------------------------------------------------------
# Real Flax NNX modules
# ---------------------------------------------------------------------------------


class NNXBlock(nnx.Module):
  def __init__(self, d, rngs):
    self.attn = nnx.Linear(d, d, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)


class NNXListModel(nnx.Module):
  def __init__(self, n, rngs, d=4):
    self.embed = nnx.Embed(10, d, rngs=rngs)
    self.layers = nnx.List([NNXBlock(d, rngs) for _ in range(n)])
    self.final_norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, 10, rngs=rngs)


def test_nnx_list_layers():
  model = NNXListModel(12, nnx.Rngs(0))
  for tree in (model, nnx.state(model, nnx.Param)):
    spec = absign_jax.block_spec(tree)
    assert spec.num_blocks == 12
    assert spec.layout == "list"
    assert spec.names[3] == "layers.3"
    by_path = blocks_by_path(spec)
    for path, block in by_path.items():
      if path.startswith("layers."):
        assert block == layer_index_from_path(path, "layers"), path
      else:
        assert block is None, path  # embedding, final norm, head: frozen
    # Layer 1 is never confused with layer 11.
    assert by_path["layers.1.attn.kernel"] == 1
    assert by_path["layers.11.attn.kernel"] == 11
    assert by_path["layers.10.norm.scale"] == 10
    assert all(len(m) == 4 for m in spec.members)


class NNXDictModel(nnx.Module):
  """GPT-2 style: transformer.{wte, wpe, h, ln_f} with h an nnx.List or nnx.Dict."""

  def __init__(self, n, rngs, as_dict=False, d=4):
    layers = [NNXBlock(d, rngs) for _ in range(n)]
    h = nnx.Dict({str(i): l for i, l in enumerate(layers)}) if as_dict else nnx.List(layers)
    self.transformer = nnx.Dict(
        wte=nnx.Embed(10, d, rngs=rngs), wpe=nnx.Embed(8, d, rngs=rngs), h=h,
        ln_f=nnx.LayerNorm(d, rngs=rngs))
    self.lm_head = nnx.Linear(d, 10, rngs=rngs)


@pytest.mark.parametrize("as_dict", [False, True])
def test_nnx_dict_children(as_dict):
  model = NNXDictModel(12, nnx.Rngs(0), as_dict=as_dict)
  spec = absign_jax.block_spec(model)
  assert spec.num_blocks == 12
  assert spec.names[0] == "transformer.h.0"
  by_path = blocks_by_path(spec)
  for path, block in by_path.items():
    if path.startswith("transformer.h."):
      assert block == layer_index_from_path(path, "transformer.h"), path
    else:
      assert block is None, path
  assert by_path["transformer.h.1.attn.bias"] == 1
  assert by_path["transformer.h.11.attn.bias"] == 11


class NNXStackedModel(nnx.Module):
  def __init__(self, n, rngs, d=4):
    self.embed = nnx.Embed(10, d, rngs=rngs)

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NNXBlock(d, rngs)

    self.layers = make(rngs)
    self.head = nnx.Linear(d, 10, rngs=rngs)


def test_nnx_vmap_stacked_layers():
  n = 5
  model = NNXStackedModel(n, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  spec = absign_jax.block_spec(params)
  assert spec.layout == "stacked"
  assert spec.num_blocks == n
  assert spec.stacked_range() == (0, n)
  paths, leaves = partition.leaf_paths(params)
  for keys, leaf, lb in zip(paths, leaves, spec.leaf_blocks):
    if keys[0] == "layers":
      assert lb.stacked and lb.block == 0
      assert leaf.shape[0] == n  # one leaf with a leading layer axis
    else:
      assert lb.block is None and not lb.stacked
  # Block k is slice k of every stacked leaf.
  stacked_idx = [i for i, lb in enumerate(spec.leaf_blocks) if lb.stacked]
  for k in range(n):
    assert spec.members[k] == tuple((i, k) for i in stacked_idx)
    got = partition.gather_block(spec, leaves, k)
    for (i, _), arr in zip(spec.members[k], got):
      np.testing.assert_array_equal(arr, leaves[i][k])
  # Sizes: each block has the size of one layer.
  one_layer = sum(int(np.prod(leaves[i].shape[1:])) for i in stacked_idx)
  assert spec.block_sizes(leaves) == (one_layer,) * n


def test_stacked_with_embedding_and_head_blocks():
  model = NNXStackedModel(3, nnx.Rngs(0))
  spec = absign_jax.block_spec(model, include_embedding=True, include_head=True)
  assert spec.num_blocks == 5
  assert spec.names[0] == "embedding" and spec.names[-1] == "head"
  by_path = blocks_by_path(spec)
  assert by_path["embed.embedding"] == 0
  assert by_path["head.kernel"] == 4 and by_path["head.bias"] == 4
  assert spec.block_of("layers.attn.kernel") == partition.LeafBlock(1, stacked=True)
  assert spec.members[1][0][1] == 0 and spec.members[3][0][1] == 2


# ---------------------------------------------------------------------------------
# Real Flax linen modules
# ---------------------------------------------------------------------------------


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(nn.Dense(4)(x))


class LinenSetupList(nn.Module):
  n: int

  def setup(self):
    self.embed = nn.Embed(10, 4)
    self.layers = [LinenBlock() for _ in range(self.n)]
    self.head = nn.Dense(10)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


class LinenCompact(nn.Module):
  n: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 4)(tokens)
    for _ in range(self.n):
      x = LinenBlock()(x)
    return nn.Dense(10)(x)


class LinenScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.LayerNorm()(nn.Dense(4)(x)), None


class LinenScanned(nn.Module):
  n: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(10, 4)(tokens)
    x, _ = nn.scan(LinenScanBlock, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=self.n)(name="layers")(x, None)
    return nn.Dense(10)(x)


def _linen_init(module):
  return module.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_linen_setup_list():
  variables = _linen_init(LinenSetupList(12))
  spec = absign_jax.block_spec(variables)
  assert spec.num_blocks == 12
  assert spec.layout == "linen"
  assert spec.names[:2] == ("params.layers_0", "params.layers_1")
  by_path = blocks_by_path(spec)
  assert by_path["params.layers_1.Dense_0.kernel"] == 1
  assert by_path["params.layers_11.Dense_0.kernel"] == 11
  assert by_path["params.layers_10.LayerNorm_0.scale"] == 10
  assert by_path["params.embed.embedding"] is None
  assert by_path["params.head.kernel"] is None
  # Works on the inner params dict, too.
  assert absign_jax.block_spec(variables["params"]).names[0] == "layers_0"


def test_linen_compact_auto_names():
  variables = _linen_init(LinenCompact(12))
  spec = absign_jax.block_spec(variables)
  assert spec.num_blocks == 12
  by_path = blocks_by_path(spec)
  assert by_path["params.LinenBlock_0.Dense_0.bias"] == 0
  assert by_path["params.LinenBlock_1.Dense_0.bias"] == 1
  assert by_path["params.LinenBlock_11.Dense_0.bias"] == 11
  # The head Dense_0 and Embed_0 are not layers.
  assert by_path["params.Dense_0.kernel"] is None
  assert by_path["params.Embed_0.embedding"] is None
  # The head is found as the non-embedding rest.
  spec = absign_jax.block_spec(variables, include_head=True)
  assert blocks_by_path(spec)["params.Dense_0.kernel"] == 12


def test_linen_scan_stacked():
  variables = _linen_init(LinenScanned(6))
  spec = absign_jax.block_spec(variables)
  assert spec.layout == "stacked"
  assert spec.num_blocks == 6
  for path, lb in zip(spec.leaf_paths, spec.leaf_blocks):
    if path.startswith("params.layers."):
      assert lb.stacked and lb.block == 0
    else:
      assert lb.block is None


# ---------------------------------------------------------------------------------
# Plain dicts with the Hugging Face style names
# ---------------------------------------------------------------------------------


def _layer(seed):
  k = jax.random.key(seed)
  return {"attn": {"q": jax.random.normal(k, (4, 4))}, "mlp": {"w": jnp.ones((4, 8))},
          "norm": {"scale": jnp.ones(4)}}


def _nest(container: str, layers, extra):
  """``{"a": {"b": layers}}`` for container "a.b", merged with ``extra`` at the top."""
  keys = container.split(".")
  tree = layers
  for k in reversed(keys):
    tree = {k: tree}
  top = dict(extra)
  if keys[0] in top:
    top[keys[0]] = {**top[keys[0]], **tree[keys[0]]}
  else:
    top.update(tree)
  return top


@pytest.mark.parametrize("container", [
    "model.layers", "transformer.h", "gpt_neox.layers", "h", "decoder.layers", "blocks",
    "model.decoder.layers", "transformer.blocks", "transformer.layers", "layers"])
@pytest.mark.parametrize("as_dict", [False, True])
def test_named_containers(container, as_dict):
  n = 12
  layers = [_layer(i) for i in range(n)]
  if as_dict:  # string keys: flattened in lexicographic order "0", "1", "10", ...
    layers = {str(i): l for i, l in enumerate(layers)}
  root = container.split(".")[0]
  extra = {"lm_head": {"kernel": jnp.ones((4, 10))}}
  if root != container:
    extra[root] = {"embed_tokens": {"embedding": jnp.ones((10, 4))},
                   "final_norm": {"scale": jnp.ones(4)}}
  else:
    extra["embed_tokens"] = {"embedding": jnp.ones((10, 4))}
  params = _nest(container, layers, extra)
  spec = absign_jax.block_spec(params)
  assert spec.num_blocks == n
  assert spec.names == tuple(f"{container}.{i}" for i in range(n))
  by_path = blocks_by_path(spec)
  n_layer_leaves = 0
  for path, block in by_path.items():
    if path.startswith(container + "."):
      assert block == layer_index_from_path(path, container), path
      n_layer_leaves += 1
    else:
      assert block is None, path
  assert n_layer_leaves == 3 * n
  assert by_path[f"{container}.1.attn.q"] == 1
  assert by_path[f"{container}.11.attn.q"] == 11
  # Block members hold exactly the leaves of that layer.
  _, leaves = partition.leaf_paths(params)
  for k in (1, 11):
    got = partition.gather_block(spec, leaves, k)
    np.testing.assert_array_equal(got[0], layers[k if not as_dict else str(k)]["attn"]["q"])


def test_include_embedding_and_head():
  params = {
      "model": {"embed_tokens": {"embedding": jnp.ones((10, 4))},
                "layers": [_layer(i) for i in range(3)],
                "norm": {"scale": jnp.ones(4)}},
      "lm_head": {"kernel": jnp.ones((4, 10))},
  }
  plain = absign_jax.block_spec(params)
  assert plain.num_blocks == 3

  emb = absign_jax.block_spec(params, include_embedding=True)
  assert emb.num_blocks == 4 and emb.names[0] == "embedding"
  by_path = blocks_by_path(emb)
  assert by_path["model.embed_tokens.embedding"] == 0
  assert by_path["model.layers.0.attn.q"] == 1
  assert by_path["model.layers.2.attn.q"] == 3
  assert by_path["lm_head.kernel"] is None

  head = absign_jax.block_spec(params, include_head=True)
  assert head.num_blocks == 4 and head.names[-1] == "head"
  by_path = blocks_by_path(head)
  assert by_path["model.layers.0.attn.q"] == 0
  assert by_path["lm_head.kernel"] == 3 and by_path["model.norm.scale"] == 3
  assert by_path["model.embed_tokens.embedding"] is None

  both = absign_jax.block_spec(params, include_embedding=True, include_head=True)
  assert both.num_blocks == 5
  assert blocks_by_path(both)["lm_head.kernel"] == 4


def test_include_embedding_without_embedding_leaves():
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(2)]}
  with pytest.raises(ValueError, match="no parameters"):
    absign_jax.block_spec(params, include_embedding=True)


# ---------------------------------------------------------------------------------
# Explicit partitions
# ---------------------------------------------------------------------------------


def test_partition_callable_overrides_detection():
  params = {"layers": [_layer(i) for i in range(3)], "head": {"w": jnp.ones(3)}}

  def by_kind(path, leaf):  # group by sub-module kind instead of by layer
    if path.startswith("head"):
      return None
    return {"attn": 0, "mlp": 1, "norm": 2}[path.split(".")[2]]

  spec = absign_jax.block_spec(params, partition=by_kind)
  assert spec.layout == "explicit"
  assert spec.num_blocks == 3
  by_path = blocks_by_path(spec)
  assert by_path["layers.2.attn.q"] == 0
  assert by_path["layers.0.mlp.w"] == 1
  assert by_path["layers.1.norm.scale"] == 2
  assert by_path["head.w"] is None


def test_partition_labels_tree():
  params = {"a": jnp.ones(2), "b": {"c": jnp.ones(3), "d": jnp.ones(1)}}
  labels = {"a": 1, "b": {"c": 0, "d": -1}}
  spec = absign_jax.block_spec(params, partition=labels)
  assert blocks_by_path(spec) == {"a": 1, "b.c": 0, "b.d": None}
  # Explicit labels win even when a layer list would be detected.
  params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
  labels = {"layers": [{"w": 0}, {"w": 0}, {"w": 1}]}
  spec = absign_jax.block_spec(params, partition=labels)
  assert spec.num_blocks == 2
  assert blocks_by_path(spec) == {"layers.0.w": 0, "layers.1.w": 0, "layers.2.w": 1}


def test_bad_explicit_partitions():
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="without gaps"):
    absign_jax.block_spec(params, partition=lambda p, x: 0 if p == "a" else 2)
  with pytest.raises(ValueError, match="froze every leaf"):
    absign_jax.block_spec(params, partition=lambda p, x: None)
  with pytest.raises(ValueError, match="no label for"):
    absign_jax.block_spec(params, partition={"a": 0})
  with pytest.raises(ValueError, match="expected a block id"):
    absign_jax.block_spec(params, partition=lambda p, x: "x")


# ---------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------


def test_empty_tree():
  with pytest.raises(ValueError, match="no leaves"):
    absign_jax.block_spec({})


def test_undetectable_layout_lists_paths():
  params = {"encoder": {"dense": {"kernel": jnp.ones((3, 3))}},
            "classifier": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError) as err:
    absign_jax.block_spec(params)
  msg = str(err.value)
  assert "classifier.kernel" in msg and "encoder.dense" in msg
  assert "partition" in msg  # says how to pass an explicit partition


def test_optimizer_reports_undetectable_layout():
  params = {"w": jnp.ones(3)}
  tx = absign_jax.absignsgd(1e-3)
  with pytest.raises(ValueError, match="Top-level paths seen: w"):
    tx.init(params)
