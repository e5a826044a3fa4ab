"""Where a step's CPU time goes: wall, user and kernel CPU, page faults per step.

Runs a few steps of each method (block methods at fixed blocks) with
``getrusage`` around every step (:func:`absign_jax.profiling.cpu_usage`) and prints
one JSON line per method. Run it under different runtime settings and compare, e.g.::

    python benchmarks/cpu_profile.py --methods absignsgd,adamw,torch_block_sign
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
        MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python benchmarks/cpu_profile.py

On a shared machine compare the CPU seconds and fault counts, which other
processes' load changes far less than wall-clock, and alternate the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runners  # noqa: E402  (benchmarks/runners.py)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--loss-chunk", type=int, default=None,
                 help="tokens per chunk of the cross-entropy (default: the preset's)")
  p.add_argument("--methods", default="absignsgd,adamw,torch_block_sign,torch_adamw")
  p.add_argument("--blocks", default="0,15,29",
                 help="blocks the block methods are timed at (each --steps times)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from absign_jax import profiling  # pylint: disable=g-import-not-at-top
  import torch_ref  # pylint: disable=g-import-not-at-top

  cfg, layout, _ = runners.config_for(args.preset, args.seq, loss_chunk=args.loss_chunk)
  model = runners.Model(cfg.replace(scan_layers=(layout == "stacked")))
  batch = runners.make_batch(cfg, args.batch, args.seq)
  blocks = [int(b) for b in args.blocks.split(",")]
  setting = {"loss_chunk": cfg.loss_chunk}
  setting.update({k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "XLA_FLAGS", "MALLOC_ARENA_MAX",
                                            "GLIBC_TUNABLES") if os.environ.get(k)})
  for method in args.methods.split(","):
    if method in runners.TORCH_METHODS:
      host = {k: jax.numpy.asarray(v) for k, v in batch.items()}
      tmodel = torch_ref.build(model.module())
      hb = {k: __import__("numpy").asarray(v) for k, v in host.items()}
      if method == "torch_adamw":
        runner = torch_ref.AdamWRunner(tmodel, hb, runners.LR, runners.WEIGHT_DECAY)
      else:
        runner = torch_ref.BlockSignRunner(tmodel, hb, runners.LR)
    else:
      runner, _ = runners.make_runner(method, model, batch, model, "auto")
    per_block = method in runners.PER_BLOCK_TIMED
    todo = blocks if per_block else [None]
    runner(block=todo[0])  # compile / first call, untimed
    rec = {}
    for b in todo:
      walls, usage = [], []
      for _ in range(args.steps):
        u = profiling.cpu_usage()
        t = time.perf_counter()
        runner(block=b)
        walls.append(time.perf_counter() - t)
        usage.append(profiling.cpu_usage() - u)
      rec["all" if b is None else str(b)] = {
          "wall_s": statistics.median(walls),
          "user_s": statistics.median(u.user_s for u in usage),
          "sys_s": statistics.median(u.sys_s for u in usage),
          "minor_faults": statistics.median(u.minor_faults for u in usage),
          "involuntary_switches": statistics.median(u.involuntary_switches for u in usage)}
    line = json.dumps({"method": method, "setting": setting, "steps": rec,
                       "load_avg": os.getloadavg()[0]})
    print(line, flush=True)
    if args.out:
      with open(args.out, "a") as fh:
        fh.write(line + "\n")
    del runner


if __name__ == "__main__":
  main()
