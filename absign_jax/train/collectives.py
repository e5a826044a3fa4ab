"""What the workers of a mesh exchange: the vote, the mean, and global arrays.

Shared by the two placements that run a step on several devices,
:mod:`absign_jax.train.data_parallel` (parameters replicated) and
:mod:`absign_jax.train.sharding` (parameters sharded along ``fsdp``, the vote over
``data``):

* :func:`aggregate_block`: the workers' block gradients voted (``"majority"``,
  ``"majority_1bit"``) or averaged (``"mean"``) over a mesh axis; the schemes and how
  an exact zero votes are described in :mod:`absign_jax.train.data_parallel`;
* :func:`vote_aggregator`: the ``aggregate`` of a block step around any such vote
  (the statistics every step reports, non-finite entries kept out of the vote);
* :func:`mean_aggregator`: the ``aggregate`` of a full step (``pmean``);
* :func:`global_array`: a value every process holds as one global array;
* :func:`count_dtype` and :func:`check_aggregation`.

Everything but :func:`global_array` and :func:`check_aggregation` runs inside
``shard_map`` over the voting axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from absign_jax.train.step import Aggregated, all_finite

AGGREGATIONS = ("majority", "majority_1bit", "mean")

# The aggregate functions the steps take: (loss, grads) -> Aggregated.
Aggregate = Callable[[jax.Array, list], Aggregated]
# A vote: this worker's (finite) block gradient -> the workers' aggregate, same shapes.
Vote = Callable[[list], list]

__all__ = [
    "AGGREGATIONS",
    "Aggregate",
    "Vote",
    "aggregate_block",
    "check_aggregation",
    "count_dtype",
    "global_array",
    "mean_aggregator",
    "vote_aggregator",
]


def check_aggregation(method: str) -> None:
  """Raises ``ValueError`` unless ``method`` is one of :data:`AGGREGATIONS`."""
  if method not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}.")


def global_array(x, sharding: NamedSharding):
  """``x`` (identical in every process) as a global array with ``sharding``.

  Shapes (``jax.ShapeDtypeStruct``) get the sharding; traced values pass through; an
  array already on ``sharding`` is returned as is. With several processes each one
  places only its own devices' slices of ``x``.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  if isinstance(x, jax.core.Tracer):
    return x
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def count_dtype(n: int):
  """Smallest signed integer dtype that holds a sum of ``n`` values in {-1, 0, 1}."""
  if n <= np.iinfo(np.int8).max:
    return jnp.int8
  if n <= np.iinfo(np.int16).max:
    return jnp.int16
  return jnp.int32


# -- the vote over one axis -----------------------------------------------------------


def _split_like(flat: jax.Array, grads: Sequence[jax.Array]) -> list[jax.Array]:
  """Cuts a flat vector back into arrays shaped (and typed) like ``grads``."""
  out, start = [], 0
  for g in grads:
    out.append(flat[start:start + g.size].reshape(g.shape).astype(g.dtype))
    start += g.size
  return out


def _vote_majority(grads, axis_name, n):
  signs = jnp.concatenate([jnp.sign(g).astype(count_dtype(n)).ravel() for g in grads])
  return jnp.sign(jax.lax.psum(signs, axis_name))


def _count_bits(packed: jax.Array, m: int) -> jax.Array:
  """Per coordinate, how many rows of ``packed`` (uint8[n, k], little-endian bits,
  as from ``jnp.packbits``) have its bit set: int32[m].

  The sum over rows comes before the reshape, so XLA fuses the unpacking into the
  reduction and never materialises the n x 8k unpacked bits.
  """
  shifts = jnp.arange(8, dtype=jnp.uint8)
  bits = (packed[:, :, None] >> shifts) & jnp.uint8(1)  # [n, k, 8]
  return jnp.sum(bits, axis=0, dtype=jnp.int32).reshape(-1)[:m]


def _vote_majority_1bit(grads, axis_name, n):
  positive = jnp.concatenate([(g > 0).ravel() for g in grads])
  nonzero = jnp.concatenate([(g != 0).ravel() for g in grads])
  m = positive.size
  has_zero = jnp.logical_not(jnp.all(nonzero)).astype(jnp.uint8)
  message = jnp.concatenate(
      [jnp.packbits(positive, bitorder="little"), has_zero[None]])
  # uint8[n, ceil(m / 8) + 1], the same on every device ("invarying": replicated).
  gathered = jax.lax.all_gather(message, axis_name, to="invarying")

  # Each branch returns the int8 vote, so that only m bytes cross the cond boundary
  # (the counts stay inside one fusion). votes = positives - negatives
  # = n_positive - (n_voters - n_positive).
  def everyone_votes(gathered, nonzero_bits):
    return jnp.sign(2 * _count_bits(gathered[:, :-1], m) - n).astype(jnp.int8)

  def some_did_not_vote(gathered, nonzero_bits):
    voted = jax.lax.all_gather(nonzero_bits, axis_name, to="invarying")
    return jnp.sign(2 * _count_bits(gathered[:, :-1], m) - _count_bits(voted, m)
                    ).astype(jnp.int8)

  return jax.lax.cond(jnp.any(gathered[:, -1] != 0), some_did_not_vote,
                      everyone_votes, gathered, jnp.packbits(nonzero, bitorder="little"))


def aggregate_block(grads: Sequence[jax.Array], axis_name: str, method: str,
                    axis_size: int) -> list[jax.Array]:
  """The workers' aggregated block gradient; call it inside ``shard_map``.

  Args:
    grads: this worker's gradient of the active block (a list of arrays); finite.
    axis_name: the mesh axis over which workers vote.
    method: ``"majority"``, ``"majority_1bit"`` or ``"mean"`` (see
      :mod:`absign_jax.train.data_parallel`).
    axis_size: the number of workers along ``axis_name``.

  Returns:
    Arrays shaped like ``grads`` (and of their dtypes), identical on every worker:
    the vote in {-1, 0, 1} for the majority schemes, the mean gradient for ``"mean"``.
  """
  check_aggregation(method)
  grads = list(grads)
  if method == "mean":
    return [(s / axis_size).astype(g.dtype)
            for s, g in zip(jax.lax.psum(grads, axis_name), grads)]
  vote = _vote_majority if method == "majority" else _vote_majority_1bit
  return _split_like(vote(grads, axis_name, axis_size), grads)


# -- aggregate functions for the steps ------------------------------------------------


def vote_aggregator(vote: Vote, axis: str, num_workers: int) -> Aggregate:
  """The ``aggregate`` of a block step whose workers along ``axis`` run ``vote``.

  The step applies on every device only if every worker's loss and gradient are
  finite; a non-finite entry on one worker votes 0 (it does not poison the others'
  vote), and the step is skipped everywhere anyway. The reported loss is the mean
  over workers, the reported norm the root mean square over workers of the local
  gradient norms.

  Args:
    vote: this worker's block gradient (a list of finite arrays) -> the aggregate,
      the same on every worker (e.g. :func:`aggregate_block` over ``axis``).
    axis: the mesh axis the workers lie along (the statistics are summed over it).
    num_workers: the number of workers along ``axis``; with one, nothing crosses it
      (XLA drops a collective over a size-1 manual axis).

  Returns:
    A function ``(loss, grads) -> Aggregated``.
  """

  def aggregate(loss, grads):
    grads = list(grads)
    finite = all_finite(loss, grads)
    sq_norm = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in grads)
    stats = jnp.stack([loss.astype(jnp.float32), 1.0 - finite.astype(jnp.float32),
                       sq_norm])
    if num_workers > 1:
      stats = jax.lax.psum(stats, axis)
    clean = [jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)) for g in grads]
    agg = vote(clean)
    mean_loss = stats[0] / num_workers
    # A mean that overflows is not finite either.
    ok = (stats[1] == 0) & all_finite(mean_loss, agg)
    return Aggregated(mean_loss, agg, ok, jnp.sqrt(stats[2] / num_workers))

  return aggregate


def mean_aggregator(axis: str, num_workers: int) -> Aggregate:
  """The ``aggregate`` of a full step: the loss and every gradient averaged over
  ``axis`` (``pmean``; nothing crosses it with one worker)."""

  def aggregate(loss, grads):
    grads = list(grads)
    if num_workers > 1:
      loss, grads = jax.lax.pmean((loss, grads), axis)
    return Aggregated(loss, grads, all_finite(loss, grads))

  return aggregate
