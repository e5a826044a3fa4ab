"""ABSignSGD-MV across processes: majority vote with ``jax.distributed``.

Local run (default): starts ``--num-processes`` copies of this script on this machine,
CPU only, joined by ``jax.distributed`` over the loopback interface. Every process
builds the same tiny Llama (same seed), trains ``--steps`` steps on its **own** data
shard with a majority vote over all devices of all processes, and prints a checksum
of its final parameters. The launcher exits with 0 when every process reports the
same checksum (the parameters are replicated: they must be identical), else 1::

    python examples/multiprocess_launch.py --num-processes 2 --steps 3
    python examples/multiprocess_launch.py --num-processes 2 --local-devices 2 \\
        --aggregation majority_1bit

One worker process per host/GPU on a cluster (``--worker``): the coordinator comes
from ``--coordinator``/``--num-processes``/``--process-id``, or from the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or, when
none is given, from JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...)::

    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \\
        python examples/multiprocess_launch.py --worker --platform cuda --steps 100

(under SLURM, JAX gives each process the GPU numbered ``SLURM_LOCALID``, so every task
must see all of its node's GPUs: do not bind one GPU per task).

See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time


def _parse(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num-processes", type=int,
                  default=int(os.environ.get("JAX_NUM_PROCESSES", 2)))
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--aggregation", default="majority",
                  choices=("majority", "majority_1bit", "mean"))
  ap.add_argument("--local-devices", type=int, default=1,
                  help="CPU devices per process in a local run")
  ap.add_argument("--rows-per-device", type=int, default=2)
  ap.add_argument("--seq-len", type=int, default=16)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--layout", default="stacked", choices=("stacked", "list"),
                  help="stacked layers (one program for every block) or a layer list "
                       "(one program per block)")
  ap.add_argument("--layers", type=int, default=None,
                  help="override the preset's number of layers")
  ap.add_argument("--timeout", type=float, default=120.0,
                  help="seconds before a local run kills its processes")
  ap.add_argument("--worker", action="store_true",
                  help="run one worker process (what the local launcher starts)")
  ap.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
  ap.add_argument("--process-id", type=int,
                  default=(int(os.environ["JAX_PROCESS_ID"])
                           if "JAX_PROCESS_ID" in os.environ else None))
  ap.add_argument("--platform", default="cpu",
                  help="JAX platform of a worker (cpu, cuda, rocm, tpu)")
  return ap.parse_args(argv)


# -- the worker -------------------------------------------------------------------------


def _local_rows(process: int, step: int, rows: int, seq_len: int, vocab: int):
  """This process's rows for ``step``: counting sequences (learnable), own seed."""
  import numpy as np
  rng = np.random.default_rng([process, step])
  start = rng.integers(0, vocab, (rows, 1))
  stride = rng.integers(1, 4, (rows, 1))
  tokens = ((start + stride * np.arange(seq_len + 1)) % vocab).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((rows, seq_len), np.float32)}


def worker(args: argparse.Namespace) -> None:
  """One process: join the job, train with the vote, print the params checksum."""
  if args.platform == "cpu" and args.local_devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{args.local_devices}")
  os.environ.setdefault("JAX_PLATFORMS", args.platform)
  import jax
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  import absign_jax
  from absign_jax.train import data_parallel as dist
  from absign_jax.llm.model import Llama, LlamaConfig

  if args.coordinator is not None and args.process_id is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  else:  # SLURM, Open MPI, TPU pods, ...: JAX finds the coordinator itself
    jax.distributed.initialize()
  me = jax.process_index()

  mesh = dist.data_mesh("data")
  cfg = LlamaConfig.preset(args.preset, scan_layers=args.layout == "stacked")
  if args.layers is not None:
    cfg = cfg.replace(n_layers=args.layers)
  parts = absign_jax.split_nnx(Llama(cfg, rngs=nnx.Rngs(0)))  # same seed everywhere
  tx = absign_jax.absignsgd(args.lr)
  step = dist.data_parallel_block_step(parts.loss_fn, tx, mesh,
                                       aggregation=args.aggregation,
                                       layered=parts.layered)
  state = step.init(parts.params)  # replicated on every device of every process
  rows = args.rows_per_device * jax.local_device_count()
  if me == 0:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices "
          f"({jax.devices()[0].platform}), aggregation={args.aggregation}, "
          f"global batch {rows * jax.process_count()} x {args.seq_len}", flush=True)
  t0 = time.time()
  for k in range(args.steps):
    batch = dist.shard_batch(
        _local_rows(me, k, rows, args.seq_len, cfg.vocab_size), mesh, "data")
    state, metrics = step(state, batch)
    if me == 0:
      print(f"step {k}: block {int(metrics['block'])} loss {float(metrics['loss']):.4f}"
            f" skipped {int(metrics['skipped'])}", flush=True)
  params = jax.block_until_ready(state.params)

  digest = hashlib.sha256()
  replicas_agree = True
  for leaf in jax.tree.leaves(params):
    copies = [np.asarray(s.data) for s in leaf.addressable_shards]
    replicas_agree &= all(c.tobytes() == copies[0].tobytes() for c in copies)
    digest.update(copies[0].tobytes())
  print(f"process {me}: checksum {digest.hexdigest()} local_replicas_agree "
        f"{replicas_agree} ({time.time() - t0:.1f}s)", flush=True)
  jax.distributed.shutdown()


# -- the local launcher -----------------------------------------------------------------


def free_port() -> int:
  """A TCP port that is free on the loopback interface right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args: argparse.Namespace) -> int:
  """Starts the worker processes on this machine and compares their checksums."""
  address = f"127.0.0.1:{free_port()}"
  common = [sys.executable, os.path.abspath(__file__), "--worker",
            "--coordinator", address, "--num-processes", str(args.num_processes),
            "--steps", str(args.steps), "--aggregation", args.aggregation,
            "--local-devices", str(args.local_devices),
            "--rows-per-device", str(args.rows_per_device),
            "--seq-len", str(args.seq_len), "--lr", str(args.lr),
            "--preset", args.preset, "--layout", args.layout, "--platform", "cpu"]
  if args.layers is not None:
    common += ["--layers", str(args.layers)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(common + ["--process-id", str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(args.num_processes)]
  deadline = time.time() + args.timeout
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:  # only the processes this launcher started
        if q.poll() is None:
          q.kill()
      out, _ = p.communicate()
      out += f"\n[launcher] timed out after {args.timeout:.0f}s"
    outputs.append(out)
  checksums = []
  for i, (p, out) in enumerate(zip(procs, outputs)):
    print(f"--- process {i} (exit {p.returncode}) ---")
    print(out.rstrip())
    checksums += [line.split("checksum ")[1].split()[0]
                  for line in out.splitlines() if "checksum " in line]
  ok = (all(p.returncode == 0 for p in procs) and len(checksums) == len(procs)
        and len(set(checksums)) == 1)
  print(f"[launcher] {len(procs)} processes, checksums "
        f"{'identical' if ok else 'DIFFER or missing'}: {sorted(set(checksums))}")
  return 0 if ok else 1


def main(argv=None) -> int:
  args = _parse(argv)
  if args.worker:
    worker(args)
    return 0
  return launch(args)


if __name__ == "__main__":
  sys.exit(main())
