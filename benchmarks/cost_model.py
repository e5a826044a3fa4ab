"""What a benchmarked step should cost, from the schedule and the model's shape alone.

* :func:`visit_frequencies`: each block's long-run share of the steps under a method's
  block selection.
* :func:`model_speedup`: the speed-up over full backprop predicted in layer forwards
  (full backprop ``3N``, block ``i`` ``N + (N-1-i) + 2``).
* :class:`FlopModel`: the matmul FLOPs of a forward, a full-backprop step and a block
  step, from the matmul shape of one layer (:class:`LayerMatmuls`). The measurement
  uses it where the compiled program cannot say: the block methods' one stacked
  program serves every block, so its FLOPs depend on the active block at run time.

The FLOP model, per layer, for ``T = B x S`` tokens: the forward is
``2 T P + 4 B S^2 d`` (``P`` the layer's matmul parameters, ``d`` the attention width:
``Q K^T`` and ``softmax V``). Of a projection, the input gradient and the weight
gradient each cost its forward; of attention, the backward to ``Q``, ``K`` and ``V``
costs twice its forward. So a layer above the active one (input gradient only) costs
``2 T P + 8 B S^2 d``, the active layer's whole backward twice its forward, and a
layer recomputed for its input gradient its forward less the projection whose output
the backward never reads. The head is ``2 T D V`` forward, its input gradient the same.
The counts of XLA's compiled programs agree: the forward and full backprop exactly
(the tests compare them), and the block step at its first and last block.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

import absign_jax

DEPTH_BIAS = 10.0
# The schedule a method follows (its visit frequencies), where it is not its own.
SCHEDULE = {"torch_block_sign": "absignsgd"}


def visit_frequencies(method: str, n: int) -> np.ndarray:
  """Long-run visit frequency of each block under the method's selection scheme."""
  if SCHEDULE.get(method, method) == "absignsgd":
    tau = np.array(absign_jax.blocks.selection.depth_biased_costs(n, DEPTH_BIAS),
                   np.float64)
    f = 1.0 / tau
  else:  # uniform, cyclic
    f = np.ones(n)
  return f / f.sum()


def model_speedup(method: str, n: int, blockwise: bool) -> float:
  """The cost model: full backprop 3N; block i: N + (N-1-i) + 2 (``blockwise``
  methods, averaged over the visit frequencies); LoRA 2N; forward N."""
  if blockwise:
    f = visit_frequencies(method, n)
    cost = float(np.sum(f * np.array([n + (n - 1 - i) + 2 for i in range(n)])))
    return 3 * n / cost
  if method == "lora":
    return 3 * n / (2 * n)
  if method in ("forward", "torch_forward"):
    return 3.0
  return 1.0


class LayerMatmuls(NamedTuple):
  """The matmul shape of one layer and of the head.

  Attributes:
    params: matmul parameters of one layer (every projection's weight matrix).
    output_params: those of the projection whose output only joins the layer's
      output (the MLP's down projection of a pre-norm layer): recomputing the layer
      for its input gradient skips it. 0 when a norm reads it (sandwich norms).
    attention_width: query heads x head size.
    head_params: width x vocabulary.
  """

  params: int
  output_params: int
  attention_width: int
  head_params: int


class FlopModel(NamedTuple):
  """Matmul FLOPs of the steps of a model of ``n`` layers on one batch.

  Attributes:
    n: layers.
    linear: a layer's projections, forward (``2 T P``).
    output: of them, the projection :class:`LayerMatmuls` ``output_params`` names.
    attention: a layer's attention matmuls, forward (``4 B S^2 d``).
    head: the output head, forward (``2 T D V``).
    chunked_head: the loss runs in rematerialised chunks (the backward computes the
      logits again).
  """

  n: int
  linear: float
  output: float
  attention: float
  head: float
  chunked_head: bool = False

  @classmethod
  def of(cls, shape: LayerMatmuls, n: int, batch: int, seq: int,
         loss_chunk: int | None = None) -> "FlopModel":
    tokens = batch * seq
    return cls(n=n, linear=2.0 * tokens * shape.params,
               output=2.0 * tokens * shape.output_params,
               attention=4.0 * batch * seq * seq * shape.attention_width,
               head=2.0 * tokens * shape.head_params,
               chunked_head=bool(loss_chunk) and 0 < loss_chunk < tokens)

  @property
  def layer(self) -> float:
    """One layer's forward."""
    return self.linear + self.attention

  @property
  def input_gradient(self) -> float:
    """One layer's input gradient alone (a layer above the active one)."""
    return self.linear + 2 * self.attention

  @property
  def recompute(self) -> float:
    """One layer's forward again, for its input gradient (the output projection's
    result is not needed)."""
    return self.layer - self.output

  def forward(self) -> float:
    """The forward and loss."""
    return self.n * self.layer + self.head

  def full_step(self) -> float:
    """Full backprop (every weight and activation gradient), no rematerialisation:
    three forwards."""
    return 3.0 * self.forward()

  def block_step(self, i: int, kept: int | None = None, save_inputs_every: int = 1
                 ) -> float:
    """Partial backprop to layer ``i``: the forward; the head's input gradient; the
    input gradient of the ``N-1-i`` layers above; layer ``i``'s whole backward (its
    norm weights need the gradient at its projections' inputs too); and what the
    step recomputes.

    Args:
      i: the active layer.
      kept: layers above it that keep their activations (the step's residual
        policy); the others are recomputed in the backward, and with
        ``save_inputs_every > 1`` their segment's forward is replayed first. None:
        all kept (as autograd does).
      save_inputs_every: see :class:`absign_jax.BlockTrainStep`.
    """
    above = self.n - 1 - i
    recomputed = 0 if kept is None else max(0, above - kept)
    per_recomputed = self.recompute + (self.layer if save_inputs_every > 1 else 0)
    head_backward = self.head * (2 if self.chunked_head else 1)
    return (self.forward() + head_backward + above * self.input_gradient
            + 2 * self.layer + recomputed * per_recomputed)

  def expected_block_step(self, frequencies: Sequence[float], kept: int | None = None,
                          save_inputs_every: int = 1) -> float:
    """:meth:`block_step` averaged over the blocks with their visit frequencies."""
    return float(sum(f * self.block_step(i, kept, save_inputs_every)
                     for i, f in enumerate(frequencies)))
