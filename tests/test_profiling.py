"""Measurement (absign_jax.profiling): tree bytes, program memory, collective bytes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import absign_jax
from absign_jax.profiling import (collective_axis, collective_bytes,
                                  collective_bytes_by_axis, machine_info,
                                  program_memory, replica_groups, tree_bytes)


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
