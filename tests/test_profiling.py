"""Measurement (absign_jax.profiling): tree bytes, program memory, collective bytes."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import absign_jax
from absign_jax.profiling import (collective_axis, collective_bytes,
                                  collective_bytes_by_axis, compiled_flops,
                                  machine_info, matmul_peak, program_memory,
                                  replica_groups, tree_bytes)


def test_tree_bytes_counts_arrays_and_shapes():
  tree = {"a": jnp.zeros((3, 4), jnp.float32), "b": np.zeros(5, np.int8),
          "c": jax.ShapeDtypeStruct((2,), jnp.bfloat16), "d": None}
  assert tree_bytes(tree) == 48 + 5 + 4


def test_program_memory_of_a_donating_step():
  params = {"layers": [{"w": jnp.ones((64, 64))} for _ in range(2)]}
  loss = lambda p, x: sum(jnp.sum(jnp.tanh(x @ l["w"])) for l in p["layers"])
  step = absign_jax.BlockTrainStep(loss, absign_jax.absignsgd(0.1))
  mem = program_memory(step.lower(step.init(params), jnp.ones((4, 64))).compile())
  assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  assert mem["argument"] >= tree_bytes(params)
  assert mem["alias"] >= tree_bytes(params)  # donated: updated in place


HLO = """\
HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%branch_true (p: (u8[4])) -> (s32[32]) {
  %p = (u8[4]{0}) parameter(0)
  %g = u8[4]{0} get-tuple-element(%p), index=0
  %ag2 = u8[8,4]{1,0} all-gather(%g), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %t = (s32[32]{0}) tuple(%ag2)
}

ENTRY %main (x: f32[16,4], y: bf16[10], z: s8[100]) -> f32[16,4] {
  %x = f32[16,4]{1,0} parameter(0)
  %y = bf16[10]{0} parameter(1)
  %z = s8[100]{0} parameter(2)
  %ar = (f32[16,4]{1,0}, /*index=1*/bf16[10]{0}) all-reduce(%x, /*index=1*/%y), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %ars = s8[100]{0} all-reduce-start(%z), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ard = s8[100]{0} all-reduce-done(%ars)
  %c = (s32[32]{0}) conditional(%pred, %tup, %tup), branch_computations={%branch_true, %branch_true}
  ROOT %r = f32[16,4]{1,0} copy(%x)
}
"""


def test_collective_bytes_parses_hlo_text():
  r = collective_bytes(HLO)
  assert r["all-reduce"] == 16 * 4 * 4 + 10 * 2 + 100  # tuple operands; async start
  assert r["ops"] == 2 and r["total"] == r["all-reduce"]
  assert r["all-gather"] == 0 and r["conditional"] == 4  # only inside the branch
  # ring estimate: group of 4 for the tuple all-reduce, 8 for the async one
  assert r["wire"] == round((256 + 20) * 2 * 3 / 4 + 100 * 2 * 7 / 8)


class _Mesh24:
  axis_names = ("data", "fsdp")
  shape = {"data": 2, "fsdp": 4}
  size = 8


@pytest.mark.parametrize("groups, axis", [
    ("{{0,4},{1,5},{2,6},{3,7}}", "data"),
    ("{{0,1,2,3},{4,5,6,7}}", "fsdp"),
    ("[4,2]<=[2,4]T(1,0)", "data"),
    ("[2,4]<=[8]", "fsdp"),
    ("mesh['a'=2,'b'=4] {'a'}", "data"),
    ("mesh['a'=2,'b'=4] {'b'}", "fsdp"),
    ("{}", "all"),
    ("{{0},{1},{2},{3},{4},{5},{6},{7}}", "local"),
    ("{{0,1},{2,3},{4,5},{6,7}}", "other"),
])
def test_replica_groups_are_attributed_to_their_mesh_axis(groups, axis):
  """Device ids are positions in the (data=2, fsdp=4) mesh: 0-3 are data index 0."""
  assert collective_axis(replica_groups(groups, 8), _Mesh24()) == axis


def test_collective_bytes_by_axis_counts_each_collective_once():
  hlo = """HloModule m

ENTRY %main (p: f32[16], q: s8[4]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  %q = s8[4]{0} parameter(1)
  %g = f32[64]{0} all-gather(%p), replica_groups=[2,4]<=[8], dimensions={0}
  %v = s8[4]{0} all-reduce(%q), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  ROOT %r = f32[16]{0} copy(%p)
}
"""
  out = collective_bytes_by_axis(hlo, _Mesh24())
  assert out["fsdp"]["all-gather"] == 64 and out["fsdp"]["all-reduce"] == 0
  assert out["data"]["all-reduce"] == 4 and out["data"]["all-gather"] == 0
  assert set(out) == {"data", "fsdp"}


def test_cpu_usage_counts_cpu_time_and_page_faults():
  from absign_jax.profiling import cpu_usage

  before = cpu_usage()
  x = 0
  while (cpu_usage() - before).user_s < 0.05:  # user CPU must advance
    x += 1
  buf = bytearray(32 << 20)  # fresh pages: zero-filled on first touch
  buf[::4096] = b"\x01" * len(buf[::4096])
  d = cpu_usage() - before
  assert d.user_s >= 0.05 and d.sys_s >= 0 and d.minor_faults > 0
  assert all(v >= 0 for v in d)


def test_machine_info_names_the_machine_and_the_versions():
  info = machine_info()
  assert info["backend"] == jax.default_backend()
  assert info["cpu_count"] == os.cpu_count() and info["jax"] == jax.__version__
  assert info["flax"] and info["optax"]
  if os.path.exists("/proc/cpuinfo"):
    assert info["cpu"]  # the CPU model, where Linux tells it
    with open("/proc/cpuinfo") as fh:
      first = fh.read().split("\n\n")[0]
    family = re.search(r"^cpu family\s*:\s*(\S+)", first, re.M)
    if family:  # x86: the family, model and stepping tell masked model names apart
      assert info["cpu_id"].startswith(f"cpu family {family.group(1)}, model ")


# -- compiled_flops and matmul_peak: expected values computed here from the shapes ----


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile()


def test_compiled_flops_of_one_matmul():
  m, k, n = 24, 40, 56
  out = compiled_flops(_compile(jnp.matmul, jnp.ones((m, k)), jnp.ones((k, n))))
  assert out["flops"] == out["dot_flops"] == 2 * m * n * k
  assert out["conv_flops"] == 0 and out["unknown_trip_loops"] == 0


def test_compiled_flops_multiplies_a_scan_by_its_trip_count():
  b, d, layers = 32, 64, 10

  def net(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

  compiled = _compile(net, jnp.ones((b, d)), jnp.ones((layers, d, d)))
  assert compiled_flops(compiled)["flops"] == layers * 2 * b * d * d
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] < 2 * 2 * b * d * d  # XLA counts the loop body once


def test_compiled_flops_of_nested_loops_multiply():
  b, d, outer, inner = 8, 32, 3, 4

  def net(x, ws):
    def layer(c, w):
      return jax.lax.fori_loop(0, inner, lambda i, h: jnp.tanh(h @ w), c), None
    return jax.lax.scan(layer, x, ws)[0]

  compiled = _compile(net, jnp.ones((b, d)), jnp.ones((outer, d, d)))
  assert compiled_flops(compiled)["flops"] == outer * inner * 2 * b * d * d


def test_compiled_flops_of_a_loop_without_trip_count_counts_it_once():
  def net(x, w, n):  # the bound is an argument: XLA cannot know the trip count
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ w),
                              (0, x))[1]

  out = compiled_flops(_compile(net, jnp.ones((8, 16)), jnp.ones((16, 16)), 5))
  assert out["flops"] == 2 * 8 * 16 * 16 and out["unknown_trip_loops"] == 1


def test_compiled_flops_of_an_mlp_gradient_is_three_forwards():
  b, d, h, o = 16, 64, 128, 32

  def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params[0]) @ params[1])

  params = (jnp.ones((d, h)), jnp.ones((h, o)))
  step = jax.value_and_grad(loss, argnums=(0, 1))  # x's gradient too: 2 per forward
  forward = 2 * b * (d * h + h * o)
  compiled = _compile(step, params, jnp.ones((b, d)))
  assert compiled_flops(compiled)["flops"] == 3 * forward


def test_compiled_flops_of_a_cond_counts_the_larger_branch():
  b, d, wide = 8, 16, 48

  def f(x, w1, w2, w3):
    return jax.lax.cond(x[0, 0] > 0, lambda: x @ w1, lambda: x @ w2 @ w3)

  args = (jnp.ones((b, d)), jnp.ones((d, d)), jnp.ones((d, wide)),
          jnp.ones((wide, d)))
  out = compiled_flops(_compile(f, *args))
  assert out["flops"] == 2 * b * d * wide * 2  # x @ w2 @ w3, not x @ w1


def test_compiled_flops_of_a_convolution():
  n, hw, c, k, o = 2, 9, 3, 3, 8

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  out = compiled_flops(_compile(conv, jnp.ones((n, hw, hw, c)), jnp.ones((k, k, c, o))))
  out_hw = hw - k + 1
  assert out["conv_flops"] == out["flops"] == 2 * n * out_hw * out_hw * o * k * k * c
  assert out["dot_flops"] == 0


def test_compiled_flops_reads_gpu_gemms_and_inline_operand_types():
  hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} constant({...})
  %g = (f32[4,8]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

%cond (q: (s32[], f32[4,8])) -> pred[] {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,8], b: f32[8,16], c: (s32[], f32[4,8])) -> f32[4,16] {
  %d = f32[4,16]{1,0} dot(f32[4,8]{1,0} %a, f32[8,16]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %l = (s32[], f32[4,8]{1,0}) while(%c), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %u = f32[4,4]{1,0} custom-call(%a, %a), custom_call_target="__onednn$matmul"
  ROOT %r = f32[4,16]{1,0} copy(%d)
}
"""
  out = compiled_flops(hlo)
  assert out["flops"] == 2 * 4 * 16 * 8 + 6 * 2 * 4 * 8 * 8
  assert out["uncounted_calls"] == 1  # a matmul call that names no dimensions


def test_matmul_peak_measures_a_square_matmul():
  size = 256
  out = matmul_peak(size, repeats=3)
  assert out["size"] == size and out["dtype"] == "float32"
  assert out["device"] == jax.devices()[0].device_kind
  assert 0 < out["seconds"] and np.isfinite(out["flops_per_s"])
  assert out["flops_per_s"] == pytest.approx(2 * size**3 / out["seconds"])
