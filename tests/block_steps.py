"""One harness for tests that check the block step's gradient of each layer.

Block-coordinate SGD with learning rate 1 changes the active layer by exactly minus
its gradient, so a step's change is the gradient the step computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax

import absign_jax


class BlockStep(NamedTuple):
  """One step of :func:`sgd_block_steps`: its loss and the stacked layers' leaves
  before and after it."""

  loss: float
  before: list[Any]
  after: list[Any]


def sgd_block_steps(parts, batch, blocks: Sequence[int]) -> list[BlockStep]:
  """Steps of block-coordinate SGD (lr 1) on ``batch``, one per block of ``blocks``
  in that order, each from the same weights (``parts``: a cut model whose layers
  are stacked at ``"layers"``). Checks that each step updates its block and that
  one compiled program serves them all."""
  tx = absign_jax.block_coordinate(optax.sgd(1.0),
                                   selection=absign_jax.fixed_order(list(blocks)))
  step = absign_jax.BlockTrainStep(parts.loss_fn, tx, layered=parts.layered,
                                   donate=False)
  state = step.init(parts.params)
  out = []
  for b in blocks:
    new, metrics = step(state, batch)
    assert int(metrics["block"]) == b
    out.append(BlockStep(float(metrics["loss"]), jax.tree.leaves(state.params["layers"]),
                         jax.tree.leaves(new.params["layers"])))
    state = new._replace(params=state.params)  # the next block from the same weights
  assert step.compiled_programs == 1
  return out
