"""ABSignSGD-MV: data-parallel block sign descent with a majority vote.

``n`` data-parallel workers (the devices along one mesh axis, in one process or in
many joined by ``jax.distributed``) each compute the active block's gradient on their
own shard of the batch, with the partial backpropagation of
:class:`~absign_jax.BlockTrainStep`. Only that block is communicated:

* ``"majority"``: every worker's ``sign(g)`` as int8 (int16 beyond 127 workers),
  summed with one all-reduce (``psum``); the vote is the sign of the sum, so a tie is 0.
* ``"majority_1bit"``: the same vote with 1 bit per coordinate on the wire. Each worker
  packs ``g > 0`` into bytes (8 coordinates per uint8) and appends one byte saying
  whether its block gradient holds an exact zero; one all-gather delivers every
  worker's bits, which are unpacked and counted locally.
* ``"mean"``: the mean gradient, summed with one all-reduce in the gradient dtype. It
  is handed to the optimizer as is, so ABSignSGD takes ``sign(mean)`` and a
  BAdam-style block Adam gets ordinary data-parallel gradients.

How an exact zero votes (both majority schemes): ``sign(0) = 0``, so a worker whose
gradient coordinate is exactly zero casts **no vote** for that coordinate; the vote is
``sign(#positive - #negative)`` over the workers that voted, and 0 on a tie (including
no votes at all). One bit cannot hold three states, so ``"majority_1bit"`` sends the
sign bits (1 = positive) always, and only when some worker flagged an exact zero in
this step's block does it run a second all-gather of "non-zero" bits (also 1 bit per
coordinate) inside a ``lax.cond``; every device takes the same branch because the
flags travel with the first all-gather. Exact zeros in a float gradient are rare
(coordinates no token reaches, underflow), so the second exchange usually never runs,
and ``"majority_1bit"`` gives the same vote as ``"majority"`` bit for bit in all
cases. Its cost: 1 bit per coordinate per worker, 2 bits in a step that has a zero.

The aggregated vote (in {-1, 0, 1}, in each leaf's dtype) is then fed to the
block-coordinate optimizer as the block gradient (the sign of a sign is itself), so
the learning rate, weight decay, schedules and block selection are exactly those of
the single-device step. Parameters and optimizer state are replicated; every device
computes the same update from the same vote, so they stay identical.

A step where any worker's block gradient or loss is not finite changes nothing on any
device (the block keeps its turn), as in the single-device step.

The vote itself is :func:`absign_jax.train.collectives.aggregate_block`, shared with
the sharded step of :mod:`absign_jax.train.sharding`.

Communication per step is read from the compiled program by
:func:`absign_jax.profiling.collective_bytes`; ``benchmarks/comm_bytes.py`` prints it
for each aggregation and for a plain data-parallel AdamW step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from absign_jax.train.collectives import (
    AGGREGATIONS,
    Aggregate,
    aggregate_block,
    check_aggregation,
    global_array,
    mean_aggregator,
    vote_aggregator,
)
from absign_jax.train.model import LossFn
from absign_jax.train.step import BlockTrainStep, FullTrainStep, check_batch_rows

PyTree = Any

__all__ = [
    "AGGREGATIONS",
    "DataParallel",
    "aggregator",
    "data_mesh",
    "data_parallel_block_step",
    "data_parallel_full_step",
    "replicate",
    "shard_batch",
]


# -- meshes and placement -------------------------------------------------------------


def data_mesh(axis: str = "data", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all (global) devices, with ``Auto`` axis type.

  Args:
    axis: the axis name.
    devices: the devices (default ``jax.devices()``: every process's devices).

  Returns:
    A ``jax.sharding.Mesh``.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every array leaf of ``tree`` replicated on all devices of ``mesh``.

  Works with several processes: each process passes the same values (e.g. parameters
  initialised from the same seed, ``tx.init`` of them) and gets one global array.
  """
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: global_array(x, sharding), tree)


def shard_batch(local_batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
  """Global batch arrays split along ``axis`` from each process's own rows.

  Every process passes its local rows (leading dimension = its share of the global
  batch); the result's leading dimension is the global batch. In one process this is
  ``jax.device_put`` with the leading dimension split over ``axis``.
  """
  sharding = NamedSharding(mesh, P(axis))
  if jax.process_count() == 1:
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


# -- the data-parallel steps, composed from the single-device ones ---------------------


def aggregator(method: str, axis: str, num_workers: int) -> Aggregate:
  """The ``aggregate`` of a data-parallel step: vote or average over ``axis``.

  Runs inside ``shard_map``. It is
  :func:`~absign_jax.train.collectives.vote_aggregator` around
  :func:`~absign_jax.train.collectives.aggregate_block` over ``axis``: the step
  applies on every device only if every worker's loss and gradient are finite; a
  non-finite gradient on one worker does not poison the others' vote (its entries
  vote 0), and the step is skipped everywhere anyway. The reported loss is the mean
  over workers, the reported norm the root mean square over workers of the local
  gradient norms.

  Args:
    method: ``"majority"``, ``"majority_1bit"`` or ``"mean"`` (see the module doc).
    axis: the mesh axis over which workers vote.
    num_workers: the number of workers along ``axis``.

  Returns:
    A function ``(loss, grads) -> Aggregated`` for the ``aggregate`` parameter of
    :class:`~absign_jax.BlockTrainStep` (any method) or
    :class:`~absign_jax.FullTrainStep` (``"mean"``).
  """
  check_aggregation(method)
  vote = lambda grads: aggregate_block(grads, axis, method, num_workers)
  return vote_aggregator(vote, axis, num_workers)


class DataParallel:
  """The :class:`~absign_jax.train.step.Placement` of a data-parallel step.

  Each program runs per device under ``shard_map`` (parameters, optimizer state and
  precision state replicated, every batch leaf split along ``axis``, every output
  replicated) inside one ``jax.jit``.

  ``check_vma=False`` matters: with it on, ``jax.grad`` inside ``shard_map`` with
  respect to a replicated (invariant) input transposes the implicit broadcast into a
  ``psum``, i.e. an all-reduce of the full float gradient -- exactly the traffic the
  vote avoids. With it off, each device's gradient stays local and the only
  collectives are the aggregate's (checked with ``collective_bytes`` in tests).

  Args:
    mesh: the device mesh; parameters are replicated over all of its axes.
    axis: the data-parallel axis: every batch leaf's leading dimension is split over
      it.
  """

  def __init__(self, mesh: Mesh, axis: str = "data"):
    if axis not in mesh.axis_names:
      raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}.")
    self.mesh, self.axis = mesh, axis
    self.num_workers = int(mesh.shape[axis])

  def compile(self, program, donate: bool):
    specs = (P(), P(), P(), P(self.axis))
    run = jax.shard_map(program, mesh=self.mesh, in_specs=specs, out_specs=P(),
                        check_vma=False)
    return jax.jit(run, donate_argnums=(0, 1, 2) if donate else ())

  def place_state(self, state):
    """The state replicated on every device of the mesh (a no-op once placed).

    Works with several processes: each passes the same values (e.g. parameters
    initialised from the same seed) and gets global arrays.
    """
    return replicate(state, self.mesh)

  def place_batch(self, batch):
    """The batch split along ``axis`` (global arrays are checked and kept).

    In one process, host or single-device values are placed. With several processes
    the batch must already be global (:func:`shard_batch`).

    Raises:
      ValueError: when a leaf's leading dimension (the global batch) does not divide
        over the data-parallel devices.
    """
    n = self.num_workers
    check_batch_rows(batch, n, f"{n} data-parallel devices of mesh axis {self.axis!r}",
                     f", or put fewer devices on {self.axis!r}")
    if jax.process_count() > 1:
      return batch
    sharding = NamedSharding(self.mesh, P(self.axis))
    return jax.tree.map(lambda x: global_array(x, sharding), batch)


def data_parallel_block_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                             mesh: Mesh, *, axis: str = "data",
                             aggregation: str = "majority", **kwargs) -> BlockTrainStep:
  """:class:`~absign_jax.BlockTrainStep` with the batch split over a mesh axis.

  Each device backpropagates to the active block on its shard of the batch; the
  block gradients are aggregated (``aggregation``, see the module doc) and the
  aggregate goes through the block-coordinate optimizer ``tx``, identically on every
  device. It is ``BlockTrainStep(..., aggregate=aggregator(aggregation, axis, n),
  placement=DataParallel(mesh, axis))``: dispatch, precision options and the calling
  form are those of the block step.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a (local) batch.
    tx: a block-coordinate optimizer (``absignsgd``, ``block_adam``, ...). The
      majority votes are meant for sign descent; ``"mean"`` suits any of them.
    mesh: the device mesh; parameters are replicated over all of its axes.
    axis: the data-parallel axis: every batch leaf's leading dimension is split over
      it, and workers along it vote.
    aggregation: ``"majority"``, ``"majority_1bit"`` or ``"mean"``.
    **kwargs: the other options of :class:`~absign_jax.BlockTrainStep` (``layered``,
      ``dispatch``, ``donate``, ...).

  Returns:
    A :class:`~absign_jax.BlockTrainStep`. ``step.init(params)`` replicates the state
    (:func:`replicate`); a step takes a batch whose leading dimension is split over
    ``axis`` (:func:`shard_batch`; placed automatically in one process). ``metrics``:
    ``loss`` (mean over workers), ``block``, ``grad_norm`` (root mean square over
    workers of the local block-gradient norm), ``skipped`` and the skip counters.

  Examples:
    >>> import jax, jax.numpy as jnp, absign_jax
    >>> from absign_jax.train import data_parallel
    >>> mesh = data_parallel.data_mesh()
    >>> params = {"layers": [{"w": jnp.ones(2)} for _ in range(3)]}
    >>> loss = lambda p, x: sum(jnp.sum(l["w"] * x.mean(0)) for l in p["layers"])
    >>> step = data_parallel.data_parallel_block_step(loss, absign_jax.absignsgd(0.5),
    ...                                               mesh)
    >>> state, metrics = step(step.init(params), jnp.ones((mesh.size, 2)))
    >>> state.params["layers"][2]["w"].tolist()
    [0.5, 0.5]
  """
  placement = DataParallel(mesh, axis)
  return BlockTrainStep(
      loss_fn, tx, aggregate=aggregator(aggregation, axis, placement.num_workers),
      placement=placement, **kwargs)


def data_parallel_full_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                            mesh: Mesh, *, axis: str = "data",
                            **kwargs) -> FullTrainStep:
  """The plain data-parallel baseline: full backprop, mean gradient, any optax ``tx``.

  The gradient of every parameter is averaged with an all-reduce (``pmean``) before
  ``tx.update``; this is the communication ABSignSGD-MV is compared with. It is
  ``FullTrainStep(..., aggregate=mean_aggregator(axis, n),
  placement=DataParallel(mesh, axis))`` (:mod:`absign_jax.train.collectives`).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    tx: any optax transformation (e.g. ``optax.adamw``).
    mesh: the device mesh (parameters replicated).
    axis: the data-parallel axis.
    **kwargs: the other options of :class:`~absign_jax.FullTrainStep` (``donate``,
      ``max_consecutive_skips``).

  Returns:
    A :class:`~absign_jax.FullTrainStep`.
  """
  placement = DataParallel(mesh, axis)
  return FullTrainStep(loss_fn, tx,
                       aggregate=mean_aggregator(axis, placement.num_workers),
                       placement=placement, **kwargs)
