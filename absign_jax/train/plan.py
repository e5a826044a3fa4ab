"""What a block optimizer will train: its blocks, the frozen leaves, the counts.

Block methods leave part of a model untouched by default (the embedding, the final
norm and the head, as the ABSignSGD paper does). :func:`training_plan` says so before
any step runs::

  plan = absign_jax.training_plan(state.opt_state, state.params)
  print(plan)   # blocks, parameters trained and frozen, the embedding/head choice
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from absign_jax.optim.block_coordinate import find_state

PyTree = Any

__all__ = ["TrainingPlan", "training_plan"]


class TrainingPlan(NamedTuple):
  """What one block optimizer trains on one parameter tree (static).

  Attributes:
    blocks: ``(name, parameters)`` per block, in block order.
    frozen: ``(dotted path, parameters)`` of every leaf no block holds.
    layout: how the blocks were found (``"list"``, ``"stacked"``, ...).
    include_embedding: whether the embedding is a block.
    include_head: whether the final norm and head are a block.
  """

  blocks: tuple[tuple[str, int], ...]
  frozen: tuple[tuple[str, int], ...]
  layout: str
  include_embedding: bool
  include_head: bool

  @property
  def trained_params(self) -> int:
    """Parameters in the blocks (one block changes per step)."""
    return sum(n for _, n in self.blocks)

  @property
  def frozen_params(self) -> int:
    """Parameters no step changes."""
    return sum(n for _, n in self.frozen)

  def __str__(self) -> str:
    return self.describe()

  def describe(self, switches: Mapping[str, str] | None = None) -> str:
    """The plan as text; ``str(plan)`` is ``plan.describe()``.

    Args:
      switches: how the caller turns the embedding / head blocks on, e.g.
        ``{"embedding": "--train-embedding", "head": "--train-head"}`` for a command
        line; by default the optimizer's ``include_embedding=True`` /
        ``include_head=True``.
    """
    total = self.trained_params + self.frozen_params
    share = self.trained_params / max(total, 1)
    lines = [f"{len(self.blocks)} blocks ({self.layout} layout), one trained per step: "
             f"{self.trained_params:,} of {total:,} parameters ({share:.1%})."]
    sizes = {n for _, n in self.blocks}
    if len(self.blocks) > 2 and len(sizes) == 1:
      lines.append(f"  blocks {self.blocks[0][0]} .. {self.blocks[-1][0]}: "
                   f"{self.blocks[0][1]:,} parameters each")
    else:
      shown = self.blocks if len(self.blocks) <= 8 else (
          self.blocks[:4] + (("...", 0),) + self.blocks[-3:])
      lines += [f"  {name}" if name == "..." else f"  {name}: {n:,} parameters"
                for name, n in shown]
    if self.frozen:
      names = ", ".join(p for p, _ in self.frozen[:6])
      more = f" and {len(self.frozen) - 6} more" if len(self.frozen) > 6 else ""
      leaves = "leaf" if len(self.frozen) == 1 else "leaves"
      lines.append(f"  frozen: {len(self.frozen)} {leaves}, {self.frozen_params:,} "
                   f"parameters ({names}{more})")
    untrained = [what for what, on in (("embedding", self.include_embedding),
                                       ("head", self.include_head)) if not on]
    if untrained and self.frozen:
      if switches is None:
        options = " / ".join(f"include_{w}=True" for w in untrained) + " to the optimizer"
      else:
        options = " / ".join(switches[w] for w in untrained)
      both = len(untrained) > 1
      lines.append(f"  the {' and the '.join(untrained)} {'are' if both else 'is'} "
                   f"frozen by default: pass {options} to train "
                   f"{'them as blocks' if both else 'it as a block'}.")
    return "\n".join(lines)


def training_plan(opt_state: PyTree, params: PyTree) -> TrainingPlan:
  """What the block optimizer whose state is ``opt_state`` trains of ``params``.

  Args:
    opt_state: the state of a block optimizer (``absignsgd``, ``block_adam``, any
      :func:`~absign_jax.block_coordinate`), possibly inside ``optax.chain`` or a
      :class:`~absign_jax.TrainState`'s ``opt_state``.
    params: the parameters it updates (shapes are read, not values).

  Returns:
    A :class:`TrainingPlan`; ``str(plan)`` is a short report for logs.

  Examples:
    >>> import jax.numpy as jnp, absign_jax
    >>> params = {"embed": jnp.zeros((8, 4)),
    ...           "layers": [{"w": jnp.zeros((4, 4))} for _ in range(3)]}
    >>> plan = absign_jax.training_plan(absign_jax.absignsgd().init(params), params)
    >>> plan.trained_params, plan.frozen_params
    (48, 32)
  """
  options = find_state(opt_state).partition
  spec = options.spec(params)
  leaves = jax.tree.leaves(params)
  sizes = spec.block_sizes(leaves)
  frozen = tuple((path, int(np.prod(np.shape(leaf))))
                 for path, lb, leaf in zip(spec.leaf_paths, spec.leaf_blocks, leaves)
                 if lb.block is None)
  return TrainingPlan(tuple(zip(spec.names, (int(n) for n in sizes))), frozen,
                      spec.layout, options.include_embedding, options.include_head)
