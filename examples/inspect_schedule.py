"""Which layer does each block-selection scheme train, and how often?

Run: python inspect_schedule.py [--layers 12] [--steps 20000] [--depth-bias 10]

Prints the first picks of every scheme and its visit frequencies, then checks the
depth-biased frequencies against the cost model: layer i costs
tau_i = N + c (N - i) (a forward pass plus c per layer backpropagated) and is
visited with frequency proportional to 1 / tau_i.
"""
import argparse

import numpy as np

from absign_jax.blocks import selection


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--depth-bias", type=float, default=10.0)
  parser.add_argument("--first", type=int, default=12, help="picks to print")
  args = parser.parse_args()
  n, c = args.layers, args.depth_bias

  schemes = {  # short label -> scheme
      "depth_biased": selection.depth_biased(c),
      "uniform": selection.uniform(seed=0),
      "cyclic": selection.cyclic(),
      "descending": selection.cyclic(descending=True),
      "reshuffle": selection.random_reshuffle(seed=0),
  }
  print(f"{n} layers (0 = next to the embeddings), {args.steps} steps\n")
  freqs = {}
  for name, scheme in schemes.items():
    picks = selection.schedule(scheme, n, args.steps)
    freqs[name] = np.bincount(picks, minlength=n) / len(picks)
    first = " ".join(str(p) for p in picks[:args.first])
    print(f"{name:13s} first picks: {first}")

  print("\nvisit frequency per layer:")
  print("layer" + "".join(f"{name:>14s}" for name in freqs))
  for i in range(n):
    print(f"{i:5d}" + "".join(f"{f[i]:14.4f}" for f in freqs.values()))

  tau = np.asarray(selection.depth_biased_costs(n, c))
  predicted = (1 / tau) / (1 / tau).sum()
  measured = freqs["depth_biased"]
  print(f"\ndepth_biased (c = {c:g}) vs the cost model (frequency ~ 1/tau_i):")
  print("layer    tau_i   measured  predicted")
  for i in range(n):
    print(f"{i:5d} {tau[i]:8.1f} {measured[i]:10.4f} {predicted[i]:10.4f}")
  print(f"max relative error of the frequencies: "
        f"{np.max(np.abs(measured / predicted - 1)):.2%}")
  ratio = measured[-1] / measured[0] if measured[0] else float("inf")
  print(f"deepest/shallowest visits: measured {ratio:.2f}, "
        f"predicted N(1+c)/(N+c) = {n * (1 + c) / (n + c):.2f}")


if __name__ == "__main__":
  main()
