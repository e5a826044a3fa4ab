"""Bytes moved by the collectives of one training step, read from the compiled HLO.

For each model shape, compiles (on simulated CPU devices) one data-parallel step of

* ABSignSGD-MV with ``majority`` (int8 signs, all-reduce), ``majority_1bit`` (bit-
  packed signs, all-gather) and ``mean`` (the block's float gradient, all-reduce),
* plain data-parallel AdamW (all-reduce of every gradient),

and prints a Markdown table of what :func:`absign_jax.profiling.collective_bytes`
finds in ``compiled.as_text()``. Parameters are abstract (``jax.eval_shape``): the
compiled program, hence its collectives, does not depend on the values, and nothing
of the 135M model's size is allocated. Run::

    python benchmarks/comm_bytes.py                     # tiny and smollm2-135m, 8 devices
    python benchmarks/comm_bytes.py --presets tiny --devices 4

``--fsdp 1,2,4,8`` instead compiles the block step on ``(data, fsdp)`` meshes of the
simulated devices (parameters sharded along ``fsdp``, :mod:`absign_jax.train.sharding`)
and prints, per mesh, the compiled memory per device (``memory_analysis``, no
allocation: it runs for qwen3-8b on a CPU) beside the parameters' bytes per device
read from their shardings, and the collective bytes per step split by mesh axis
(``fsdp``: parameter gathers and the reduction of a worker's gradient; ``data``: the
vote)::

    python benchmarks/comm_bytes.py --presets qwen3-8b --fsdp 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--presets", nargs="+", default=["tiny", "smollm2-135m"])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--rows-per-device", type=int, default=1)
  ap.add_argument("--fsdp", default=None, metavar="1,2,4,8",
                  help="compile the sharded block step for these fsdp sizes instead")
  ap.add_argument("--aggregation", default="majority_1bit",
                  help="--fsdp: the vote of the sharded step")
  args = ap.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import absign_jax
  from absign_jax.profiling import collective_bytes
  from absign_jax.train import data_parallel as dist
  from absign_jax.llm.model import Llama, LlamaConfig

  if args.fsdp:
    return fsdp_table(args)

  mesh = dist.data_mesh("data")
  n = mesh.size
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def abstract(tree, sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)

  rows = []
  for preset in args.presets:
    cfg = LlamaConfig.preset(preset, max_seq_len=max(args.seq_len, 8))
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    parts = absign_jax.split_nnx(model)
    params = abstract(parts.params, rep)
    tokens = jax.ShapeDtypeStruct((n * args.rows_per_device, args.seq_len), jnp.int32,
                                  sharding=split)
    batch = {"inputs": tokens, "targets": tokens,
             "mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32, sharding=split)}
    spec = absign_jax.block_spec(parts.params)
    leaves = jax.tree.leaves(parts.params)
    info = {"preset": preset, "blocks": spec.num_blocks,
            "params": sum(int(np.prod(x.shape)) for x in leaves),
            "block_params": spec.block_sizes(leaves)[0]}

    measured = {}
    t0 = time.time()
    adamw = optax.adamw(1e-4)
    full = dist.data_parallel_full_step(parts.loss_fn, adamw, mesh)
    # Shapes only: the steps' placement gives the state its (replicated) sharding.
    measured["adamw (all gradients)"] = collective_bytes(
        full.lower(jax.eval_shape(full.init, params), batch).compile(), n)
    for aggregation in dist.AGGREGATIONS:
      tx = absign_jax.absignsgd(1e-4)
      step = dist.data_parallel_block_step(parts.loss_fn, tx, mesh,
                                           aggregation=aggregation, dispatch="per_block")
      measured[aggregation] = collective_bytes(
          step.lower(jax.eval_shape(step.init, params), batch, block=0).compile(), n)
    print(f"# {preset}: compiled {len(measured)} programs in {time.time() - t0:.0f}s",
          file=sys.stderr, flush=True)
    rows.append((info, measured))

  print(f"Bytes per training step on {n} data-parallel devices, from the collectives "
        "of the compiled (optimized) HLO. *bytes/step*: operand bytes of every "
        "collective each device issues (an all-gather's operand is the device's own "
        "part); *if a zero*: operand bytes of collectives inside a conditional "
        "branch (the 1-bit vote's non-zero mask, exchanged only in a step where some "
        f"worker's block gradient has an exact 0); *ring wire*: bytes each device "
        f"sends with ring algorithms (all-reduce 2(n-1)/n x S, all-gather (n-1) x S).\n")
  print("| model | N | params | block | step | ops | bytes/step | if a zero | "
        "ring wire | AdamW / this (bytes) | AdamW / this (wire) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for info, measured in rows:
    base = measured["adamw (all gradients)"]
    for name, m in measured.items():
      print(f"| {info['preset']} | {info['blocks']} | {info['params']:,} | "
            f"{info['block_params']:,} | {name} | {m['ops']} | {m['total']:,} | "
            f"{m['conditional']:,} | {m['wire']:,} | {base['total'] / m['total']:,.1f} | "
            f"{base['wire'] / m['wire']:,.1f} |")
  print()
  for info, _ in rows:
    print(f"Expected ratio for {info['preset']}: 32N = {32 * info['blocks']} "
          f"(1 bit of one block vs 32 bits of all N blocks; embeddings and head add "
          f"{info['params'] / (info['blocks'] * info['block_params']):.2f}x to the "
          "AdamW side).")


def fsdp_table(args) -> None:
  """Compiled bytes per device of the sharded block step for each fsdp size."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import absign_jax
  from absign_jax.llm.model import Llama, LlamaConfig
  from absign_jax.profiling import collective_bytes_by_axis, program_memory
  from absign_jax.train import sharding

  sizes = [int(v) for v in args.fsdp.split(",")]
  n = jax.device_count()
  mib = lambda b: f"{b / 2**20:,.1f}"
  for preset in args.presets:
    layout = "stacked" if preset == "qwen3-8b" else "list"
    cfg = LlamaConfig.preset(preset, max_seq_len=max(args.seq_len, 8),
                             scan_layers=layout == "stacked")
    parts = absign_jax.split_nnx(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), parts.params)
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(params))
    tokens = jax.ShapeDtypeStruct((n * args.rows_per_device, args.seq_len), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens,
             "mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    rows = []
    for fsdp in sizes:
      mesh = sharding.make_mesh(f"data={n // fsdp},fsdp={fsdp}")
      step = sharding.sharded_block_step(
          parts.loss_fn, absign_jax.absignsgd(1e-5), mesh, aggregation=args.aggregation,
          layered=parts.layered)
      state = jax.eval_shape(step.init, params)
      t0 = time.time()
      compiled = step.lower(state, batch, block=0).compile()  # the deepest backprop
      mem = program_memory(compiled)
      axes = collective_bytes_by_axis(compiled, mesh)
      placed = step.placement.place_state(state)
      per_device = {}
      for x in jax.tree.leaves(placed.params):
        shard = x.sharding.shard_shape(x.shape)
        per_device[0] = per_device.get(0, 0) + int(np.prod(shard)) * x.dtype.itemsize
      print(f"# {preset} fsdp={fsdp}: compiled in {time.time() - t0:.0f}s",
            file=sys.stderr, flush=True)
      rows.append((fsdp, mesh, mem, axes, per_device[0]))
    print(f"\n{preset} ({total / 2**30:,.2f} GiB of {cfg.dtype} parameters, "
          f"{cfg.n_layers} layers, {layout} layout), ABSignSGD block step "
          f"({args.aggregation}), batch {n * args.rows_per_device} x {args.seq_len}, "
          f"{n} simulated {jax.default_backend()} devices; bytes per device:\n")
    print("| mesh | params / device (MiB) | params x fsdp / total | arguments (MiB) | "
          "temp (MiB) | output (MiB) | total (MiB) | gathers+reduce over fsdp (MiB) | "
          "vote over data (bytes) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fsdp, mesh, mem, axes, pbytes in rows:
      over_fsdp = axes.get("fsdp", {}).get("total", 0)
      vote = axes.get("data", {})
      print(f"| data={mesh.shape['data']},fsdp={fsdp} | {mib(pbytes)} | "
            f"{pbytes * fsdp / total:.4f} | {mib(mem['argument'])} | {mib(mem['temp'])} | "
            f"{mib(mem['output'])} | {mib(mem['total'])} | {mib(over_fsdp)} | "
            f"{vote.get('total', 0):,} (+{vote.get('conditional', 0):,} if a zero) |")


if __name__ == "__main__":
  main()
