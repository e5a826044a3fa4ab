"""Parameter-free ABSignSGD: ALIAS step sizes on one block per step.

The step size of the active block comes from the running smoothness and gap
estimates of :func:`absign_jax.related.sign_alias.scale_by_alias`, kept across
block switches (see :func:`alias_absignsgd`).
"""

from __future__ import annotations


import optax

from absign_jax._checks import check_int, check_number
from absign_jax.optim.block_coordinate import (
    BlockOptions, block_coordinate, takes_block_options)
from absign_jax.related.sign_alias import scale_by_alias


def _mark_block_starts(
    tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """Passes ``new_block`` (first step of a block visit) to ``tx``'s inner.

  ``tx`` is a :func:`~absign_jax.optim.block_coordinate.block_coordinate`; its state
  (returned unchanged in type, so ``active_block`` and the training step work)
  says how many steps the active block has already had in this visit.
  """

  def update_fn(updates, state, params=None, **extra_args):
    return tx.update(updates, state, params,
                     new_block=state.steps_in_block == 0, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


@takes_block_options()
def alias_absignsgd(
    d0: float = 1e-8,
    l0: float = 1.0,
    *,
    f_low: float | None = None,
    clamp: float | None = None,
    update_gap: int = 1,
    warmup_steps: int = 0,
    warmup_learning_rate: optax.ScalarOrSchedule | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    steps_per_block: int = 2,
    blocks: BlockOptions = BlockOptions(),
) -> optax.GradientTransformationExtraArgs:
  r"""Parameter-free ABSignSGD: ALIAS step sizes on one block per step.

  The active block (depth-biased selection by default) moves by
  ``-gamma_t * (sign(u_t) + weight_decay * p)``; every other block stays
  bit-identical. ``gamma_t`` comes from the ALIAS estimates of
  :func:`scale_by_alias`, shared by all transformer layers.

  How the estimates behave across block switches:

  * ``S``, ``dtil``, ``d``, the step size and the counters are **never reset**
    at a switch: they describe the whole model, and resetting them would bring
    back the probe step ``sqrt(d0 / L0)`` at every switch (the method would no
    longer be parameter-free).
  * A gradient pair ``(g_{t-1}, g_t)`` enters the estimates only when both
    steps were on the same block in the same visit. Then only that block moved
    between them, so ``||x_t - x_{t-1}||_inf = gamma_{t-1}`` holds exactly and
    ``||g_t - g_{t-1}||_1``, ``<g_t, sign(u_{t-1})>`` are the block's share of
    the spec's quantities. The first step of a visit forms no pair (the stored
    gradient is another layer's) and uses the current step size.
  * Hence ``steps_per_block >= 2`` (each visit yields ``steps_per_block - 1``
    pairs). With one step per block, consecutive steps are on different layers
    and the estimates would (almost) never advance.
  * The momentum buffer (``momentum > 0``) restarts from zero on each visit.
  * Memory: the previous gradient (and momentum) of one layer, plus scalars:
    the inner state exists once per group of equally shaped blocks (all
    layers). With ``include_embedding`` / ``include_head`` those blocks are
    their own groups and keep their own estimates.

  It is ``chain(block_coordinate(scale_by_alias(...)), scale(-1))``, with the
  first-step-of-visit flag passed to the inner transformation as the
  ``new_block`` extra argument. The lower-bound form (``f_low``) needs
  ``value=loss`` in every ``update`` call. With
  ``optax.inject_hyperparams``, name ``steps_per_block`` and ``seed`` (and
  ``partition``) in ``static_args``.

  Args:
    d0: initial gap estimate (> 0).
    l0: initial smoothness (> 0).
    f_low: a lower bound of the loss (selects the lower-bound form).
    clamp: the largest allowed step size (``None``: no clamp).
    update_gap: recompute the step size every ``update_gap`` updates (counted
      over all layers).
    warmup_steps: number of first updates taken with ``warmup_learning_rate``.
    warmup_learning_rate: step size (or schedule) during warm-up.
    momentum: use ``sign`` of an EMA of the block's gradients, in [0, 1).
    weight_decay: decoupled weight decay of the active block, scaled by
      ``gamma_t``.
    steps_per_block: updates per block visit (>= 2).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`~absign_jax.optim.block_coordinate.BlockCoordinateState`.

  Raises:
    TypeError: an option of the wrong type (the message names it).
    ValueError: on invalid arguments, ``steps_per_block < 2`` included.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from absign_jax import alias_absignsgd
    >>> a = jnp.array([[2.0, 0.5, 1.0], [0.3, 1.0, -1.0], [1.0, -1.0, 0.2]])
    >>> def loss(p):
    ...   x = jnp.concatenate([l['w'] for l in p['layers']])
    ...   return 0.5 * jnp.sum((jnp.tile(a, (1, 2)) @ x - 1.0) ** 2)
    >>> params = {'layers': [{'w': jnp.zeros(3)}, {'w': jnp.zeros(3)}]}
    >>> tx = alias_absignsgd()
    >>> state = tx.init(params)
    >>> start = loss(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> for _ in range(200):
    ...   params, state = step(params, state)
    >>> print(bool(loss(params) < 0.1 * start))
    True
  """
  owner = "alias_absignsgd"
  check_number(owner, "d0", d0, lo=0.0, lo_open=True)
  check_number(owner, "l0", l0, lo=0.0, lo_open=True)
  check_number(owner, "f_low", f_low, none_ok=True)
  check_number(owner, "clamp", clamp, lo=0.0, lo_open=True, none_ok=True)
  check_int(owner, "update_gap", update_gap, lo=1)
  check_int(owner, "warmup_steps", warmup_steps, lo=0)
  if not callable(warmup_learning_rate):
    check_number(owner, "warmup_learning_rate", warmup_learning_rate, lo=0.0,
                 none_ok=True)
  check_number(owner, "momentum", momentum, lo=0.0, hi=1.0)
  check_number(owner, "weight_decay", weight_decay, lo=0.0)
  if not isinstance(steps_per_block, int) or isinstance(steps_per_block, bool):
    raise ValueError(
        "alias_absignsgd: steps_per_block must be a Python int (with "
        "optax.inject_hyperparams, name it in static_args), got "
        f"{steps_per_block!r}."
    )
  if steps_per_block < 2:
    raise ValueError(
        "alias_absignsgd: steps_per_block must be >= 2, got "
        f"{steps_per_block!r}: ALIAS estimates come from consecutive steps on "
        "the same block, and with one step per block there are none."
    )
  inner = scale_by_alias(
      d0, l0, f_low=f_low, clamp=clamp, update_gap=update_gap,
      warmup_steps=warmup_steps, warmup_learning_rate=warmup_learning_rate,
      momentum=momentum, weight_decay=weight_decay,
  )
  one_block = block_coordinate(inner, steps_per_block=steps_per_block,
                               reset_on_switch=False, **blocks._asdict())
  return optax.chain(_mark_block_starts(one_block), optax.scale(-1.0))
