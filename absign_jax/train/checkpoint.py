"""Checkpoints that resume training exactly (orbax-checkpoint).

A checkpoint holds one training-state pytree -- usually the step's
:class:`~absign_jax.train.step.TrainState`: parameters, optimizer state (block selection state
and key, step counts, ``inject_hyperparams`` hyperparameters, inner moments), and the
:class:`~absign_jax.train.precision.PrecisionState` (loss scale, skip counters, the stochastic
rounding key and counter, the master copy) -- plus a JSON record of the data position
(e.g. :meth:`absign_jax.llm.data.Batches.state`) and a small metadata record that
describes the tree::

    ckpt = Checkpointer(directory, max_to_keep=3)
    state = step.init(params)
    restored = ckpt.restore_latest(state)         # None when there is no checkpoint
    if restored is not None:
      state = restored.state
      batches.restore(restored.data_state["batches"])
      start = restored.step
    for k in range(start, total):
      state, metrics = step(state, next(batches))
      ckpt.save(k + 1, state, {"batches": batches.state()})   # asynchronous
    ckpt.wait()

Saving is asynchronous: :meth:`Checkpointer.save` copies the arrays off the device
and returns while the files are written in the background (donating the state to
the next step right away is safe). Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a process killed during a save leaves
at most a temporary directory, which is never restored (and is removed when the next
:class:`Checkpointer` opens the directory); :meth:`restore_latest` takes the last
complete checkpoint.

Restoring uses the *target's* structure (a state of the current model and optimizer,
e.g. ``step.init(params)``, or its ``jax.eval_shape``): the arrays are read into that
structure, with its shardings and dtypes. Sharded states (parameters and optimizer
state sliced over a mesh, :mod:`absign_jax.train.sharding`) are saved by every process
writing its own slices, and restore onto the target's shardings: the same mesh or
another shape of it (``data=2,fsdp=4`` saved, ``data=4,fsdp=2`` or ``data=8``
restored), each device reading only its slice. Before reading, the saved metadata is
compared with the target's: another block count or layout, another parameter
tree, shape or dtype is a ``ValueError`` that names the differences, never a silent
partial restore. The block optimizer's selection configuration (scheme, depth bias,
seed, costs or order, steps per block, block count) is recorded too, and a target
whose optimizer would select another sequence of blocks is a ``ValueError`` that names
the option and both values; a checkpoint written before this record existed restores
with a warning that the configuration cannot be checked.

Steps only move forward in a directory: saving a step older than the latest
checkpoint is an error (it would never be restored), and saving the latest step
again writes nothing (see :meth:`Checkpointer.save`).

The data position and the random keys are part of what is restored: every random
key the library uses (block selection, stochastic rounding) lives in the state as
key data (``uint32``); typed PRNG keys (``jax.random.key``) anywhere in the state are
also saved (as their key data) and restored as typed keys.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from absign_jax._checks import check_int
from absign_jax.optim.block_coordinate import find_state, selection_config

PyTree = Any

FORMAT_VERSION = 1
_MAX_LISTED = 8


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore` returns.

  Attributes:
    step: the step number the checkpoint was saved under.
    state: the training state, in the target's structure.
    data_state: the JSON data record given to :meth:`Checkpointer.save`.
    metadata: the saved metadata record (tree description, user metadata).
    skipped: ``(step, reason)`` of newer checkpoints :meth:`Checkpointer.restore_latest`
      could not read and passed over.
  """

  step: int
  state: PyTree
  data_state: Any
  metadata: dict
  skipped: tuple = ()


class CheckpointMismatchError(ValueError):
  """A checkpoint is intact but does not fit the target state (another model,
  optimizer, precision or format). Falling back to an older one would not help."""


def _check_json(value: Any, what: str) -> None:
  """Raises ``TypeError`` naming the first value that is not JSON-serialisable."""
  try:
    json.dumps(value, allow_nan=True)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{what} must be JSON-serialisable (dicts with str keys, lists, str, int, "
        f"float, bool, None): {e}. Convert NumPy/JAX scalars with int()/float() "
        "and arrays with .tolist().") from None


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_record(x) -> dict:
  if _is_key(x):
    impl = str(jax.random.key_impl(x)) if isinstance(x, jax.Array) else "key"
    data_shape = jax.eval_shape(jax.random.key_data, x).shape
    return {"shape": list(data_shape), "dtype": "uint32", "key": impl}
  return {"shape": [int(d) for d in np.shape(x)], "dtype": jnp.dtype(x.dtype).name}


def _block_record(state: PyTree) -> dict | None:
  """Block count, names and layout of a state with ``params`` and ``opt_state``."""
  params = getattr(state, "params", None)
  opt_state = getattr(state, "opt_state", None)
  if params is None or opt_state is None:
    return None
  try:
    spec = find_state(opt_state).partition.spec(params)
  except ValueError:
    return None
  return {"num_blocks": spec.num_blocks, "names": list(spec.names),
          "layout": spec.layout}


def describe(state: PyTree) -> dict:
  """The metadata record of a state: leaf paths, shapes, dtypes, blocks, optimizer.

  Args:
    state: a pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    A JSON-serialisable dict ``{"leaves": [[path, shape, dtype], ...], "blocks": ...,
    "optimizer": ...}``; ``optimizer`` is the block optimizer's
    :func:`~absign_jax.optim.block_coordinate.selection_config` (None without one).
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  leaves = []
  for path, x in flat:
    rec = _leaf_record(x)
    leaves.append([jax.tree_util.keystr(path), rec["shape"], rec["dtype"]])
  return {"leaves": leaves, "blocks": _block_record(state),
          "optimizer": selection_config(state)}


def _blocks_text(rec: dict) -> str:
  names = rec["names"]
  shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
  return f"{rec['num_blocks']} blocks, {rec['layout']} layout ({shown})"


# The selection options in the order they are compared (others follow, by name).
_CONFIG_ORDER = ("selection", "num_blocks", "steps_per_block", "depth_bias", "seed",
                 "costs", "order")


def _same_option(saved: Any, current: Any) -> bool:
  numbers = (int, float)
  if (isinstance(saved, numbers) and isinstance(current, numbers)
      and (isinstance(saved, float) or isinstance(current, float))):
    # To float16 precision: optax.inject_hyperparams stores a depth bias in the
    # parameters' dtype, and it is still the depth bias the run was started with.
    return math.isclose(float(saved), float(current), rel_tol=1e-3, abs_tol=1e-6)
  if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
    return list(saved) == list(current)
  return saved == current


def check_optimizer(saved: Mapping, target: Mapping, where: str = "checkpoint") -> None:
  """Compares the block-selection configurations of two :func:`describe` records.

  Args:
    saved: the record stored with the checkpoint.
    target: the record of the state to restore into.
    where: what to call the checkpoint in the message.

  Raises:
    CheckpointMismatchError: the target's optimizer would select another sequence of
      blocks (one line naming the option, both values and the fix). Options either
      side could not record (traced when the state was initialised) are skipped.

  Warns:
    UserWarning: the checkpoint records no configuration (written by an older
      version); it restores unchecked.
  """
  current = target.get("optimizer")
  if current is None:
    return
  if "optimizer" not in saved:
    warnings.warn(f"the {where} records no block-selection configuration (it was "
                  "written by an older version), so the selection scheme and its "
                  "options cannot be checked against this optimizer; make sure they "
                  "are the ones the run was started with.", stacklevel=3)
    return
  old = saved["optimizer"]
  if old is None:
    return  # the leaves already differ; check_compatible names them
  names = [k for k in _CONFIG_ORDER if k in old or k in current]
  names += sorted((set(old) | set(current)) - set(names))
  for name in names:
    a, b = old.get(name), current.get(name)
    if a is None or b is None or _same_option(a, b):
      continue
    raise CheckpointMismatchError(
        f"the {where} was written by an optimizer with {name}={a!r}, but the "
        f"optimizer restoring it has {name}={b!r}; build the optimizer with "
        f"{name}={a!r} to resume that run, or start the new run in another directory.")


def check_compatible(saved: Mapping, target: Mapping, where: str = "checkpoint") -> None:
  """Raises ``ValueError`` naming every difference between two :func:`describe` records.

  The tree (leaves, blocks) is compared first; when it matches, the block-selection
  configurations (:func:`check_optimizer`).

  Args:
    saved: the record stored with the checkpoint.
    target: the record of the state to restore into.
    where: what to call the checkpoint in the message.
  """
  problems = []
  sb, tb = saved.get("blocks"), target.get("blocks")
  if sb is not None and tb is not None and (
      sb["num_blocks"] != tb["num_blocks"] or sb["layout"] != tb["layout"]
      or list(sb["names"]) != list(tb["names"])):
    problems.append(f"the {where} has {_blocks_text(sb)}; the target model has "
                    f"{_blocks_text(tb)}")
  s_leaves = {p: (list(s), d) for p, s, d in saved["leaves"]}
  t_leaves = {p: (list(s), d) for p, s, d in target["leaves"]}
  missing = [p for p in t_leaves if p not in s_leaves]
  extra = [p for p in s_leaves if p not in t_leaves]
  differ = [f"{p}: saved {s_leaves[p][1]}{s_leaves[p][0]}, target "
            f"{t_leaves[p][1]}{t_leaves[p][0]}"
            for p in t_leaves if p in s_leaves and s_leaves[p] != t_leaves[p]]

  def listing(what, items):
    shown = "; ".join(items[:_MAX_LISTED])
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"

  if missing:
    problems.append(listing("entries of the target are not in the " + where, missing))
  if extra:
    problems.append(listing("entries of the " + where + " are not in the target", extra))
  if differ:
    problems.append(listing("entries differ in shape or dtype", differ))
  if not missing and not extra and [p for p, _, _ in saved["leaves"]] != [
      p for p, _, _ in target["leaves"]]:
    problems.append("the entries are the same but in another order")
  if problems:
    raise CheckpointMismatchError(
        f"cannot restore the {where} into this model/optimizer state:\n  - "
        + "\n  - ".join(problems)
        + "\nRestore with the model layout, layer count, precision and optimizer the "
        "checkpoint was written with.")
  check_optimizer(saved, target, where)


def _abstract(x):
  """``jax.ShapeDtypeStruct`` to read leaf ``x`` into (key data for typed keys)."""
  sharding = getattr(x, "sharding", None)
  if _is_key(x):
    shape = jax.eval_shape(jax.random.key_data, x).shape
    return jax.ShapeDtypeStruct(shape, jnp.uint32, sharding=None)
  kwargs = {"sharding": sharding} if isinstance(sharding, jax.sharding.Sharding) else {}
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, **kwargs)


def _like_target(value, target):
  """The restored ``value`` as ``target``'s kind of leaf (typed key, weak type)."""
  if _is_key(target):
    impl = jax.random.key_impl(target) if isinstance(target, jax.Array) else None
    return jax.random.wrap_key_data(value, impl=impl)
  if getattr(target, "weak_type", False):
    from jax._src.lax import lax as lax_internal  # pylint: disable=g-import-not-at-top
    return lax_internal._convert_element_type(value, weak_type=True)  # pylint: disable=protected-access
  return value


def _empty_like(x):
  """A zero-size leaf like ``x`` (such leaves are not written to the checkpoint)."""
  sharding = getattr(x, "sharding", None)
  out = jnp.zeros(np.shape(x), x.dtype)
  if isinstance(sharding, jax.sharding.Sharding):
    out = jax.device_put(out, sharding)
  return _like_target(out, x)


def _leaf_name(i: int) -> str:
  return f"leaf_{i:06d}"


class Checkpointer:
  """Saves and restores training states with an ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where the checkpoints live (one subdirectory per step).
    max_to_keep: how many recent checkpoints to keep (None: all).
    save_interval_steps: :meth:`save` writes only steps that are multiples of this
      (unless forced).
    async_save: write in a background thread (:meth:`wait` to finish).
    metadata: a JSON-serialisable record stored with every checkpoint (e.g. the
      precision policy and hyperparameters), returned in :attr:`Restored.metadata`.

  The class is a context manager: leaving the ``with`` block waits for the last save
  and closes the manager.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True,
               metadata: Mapping[str, Any] | None = None):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be an int >= 1 or None, got {max_to_keep!r}.")
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be an int >= 1, got "
                       f"{save_interval_steps!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self.metadata = dict(metadata or {})
    _check_json(self.metadata, "Checkpointer metadata")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # -- saving -----------------------------------------------------------------------

  def save(self, step: int, state: PyTree, data_state: Any = None, *,
           force: bool = False) -> bool:
    """Starts saving ``state`` and ``data_state`` as checkpoint ``step``.

    Args:
      step: the step number (usually the number of completed training steps).
      state: the training state pytree.
      data_state: a JSON-serialisable record of the data position (and anything
        else the run needs to resume), or None.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      Whether a save was started: False for a step that is not a multiple of
      ``save_interval_steps`` (unless forced), and for the latest step again: a
      run's state at one step is one state, so a final save after a periodic one of
      the same step writes nothing (the checkpoint already written is kept).

    Raises:
      TypeError: ``step`` is not an int, or ``data_state`` is not
        JSON-serialisable (checked before anything is written).
      ValueError: ``step`` is older than the latest checkpoint in the directory
        (it would never be restored, and could be taken for a newer state).
    """
    check_int("Checkpointer.save", "step", step, lo=0)
    step = int(step)
    latest = self._manager.latest_step()  # includes a save still being written
    if latest is not None and step < latest:
      raise ValueError(
          f"Checkpointer.save: step {step} is older than the latest checkpoint in "
          f"{self.directory} (step {latest}); save a new run into another directory, "
          f"or delete the checkpoints after step {step} first (Checkpointer.delete).")
    if latest is not None and step == latest:
      return False
    _check_json(data_state, "data_state")
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    # Orbax refuses zero-size arrays; they hold no data (restored from the target).
    arrays = {_leaf_name(i): (jax.random.key_data(x) if _is_key(x) else x)
              for i, (_, x) in enumerate(flat) if np.size(x) or _is_key(x)}
    meta = {"format": FORMAT_VERSION, "step": step, "tree": describe(state),
            "user": self.metadata}
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            data=ocp.args.JsonSave({"data_state": data_state}),
            meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` (after waiting for pending saves).

    Raises:
      FileNotFoundError: there is no checkpoint ``step``.
    """
    self._manager.wait_until_finished()
    step = int(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(steps: {self.all_steps()}).")
    self._manager.delete(step)

  # -- restoring --------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The step of the last complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def metadata_at(self, step: int) -> dict:
    """The metadata record saved with checkpoint ``step``."""
    return dict(self._manager.restore(
        int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def _readable_metadata(self, step: int) -> dict:
    """The metadata of complete checkpoint ``step``, of this library's format."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no complete checkpoint for step {step} in "
                              f"{self.directory} (steps: {self.all_steps()}).")
    meta = self.metadata_at(step)
    if meta.get("format") != FORMAT_VERSION:
      raise CheckpointMismatchError(f"checkpoint {step} in {self.directory} has format "
                       f"{meta.get('format')!r}; this library reads {FORMAT_VERSION}.")
    return meta

  def restore(self, step: int, target: PyTree) -> Restored:
    """Reads checkpoint ``step`` into the structure of ``target``.

    Args:
      step: a step from :meth:`all_steps`.
      target: a state of the current model and optimizer (arrays or
        ``jax.ShapeDtypeStruct``); only its structure, shapes, dtypes and shardings
        are used.

    Raises:
      CheckpointMismatchError: the checkpoint does not match ``target`` (another
        block count, layout, tree, shape or dtype; a ``ValueError``); the message
        lists the differences. Or the target's block optimizer would select another
        sequence of blocks (another scheme, depth bias, seed, costs, order or steps
        per block); the message names the option and both values.

    Warns:
      UserWarning: the checkpoint records no selection configuration (written by an
        older version), so it cannot be checked.
      FileNotFoundError: there is no checkpoint ``step``.
      Exception: whatever reading a damaged checkpoint raises (JSON, tensorstore).
    """
    step = int(step)
    meta = self._readable_metadata(step)
    check_compatible(meta["tree"], describe(target),
                     where=f"checkpoint {step} in {self.directory}")
    flat, treedef = jax.tree_util.tree_flatten(target)
    abstract = {_leaf_name(i): _abstract(x) for i, x in enumerate(flat)
                if np.size(x) or _is_key(x)}
    out = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore()))
    leaves = [_like_target(out["state"][_leaf_name(i)], x) if _leaf_name(i) in abstract
              else _empty_like(x) for i, x in enumerate(flat)]
    return Restored(step, jax.tree_util.tree_unflatten(treedef, leaves),
                    out["data"]["data_state"], meta)

  def restore_latest(self, target: PyTree) -> Restored | None:
    """:meth:`restore` of the newest intact checkpoint, or None if there is none.

    A checkpoint that cannot be read (damaged metadata or data record, truncated
    array files) is passed over with a warning that names its step and the reason,
    and the next older one is tried; :attr:`Restored.skipped` lists those passed
    over. A checkpoint that is intact but does not fit ``target`` is an error
    (:class:`CheckpointMismatchError`), not a reason to fall back.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint does not fit ``target``.
      ValueError: there are checkpoints, but none can be read (the message lists why).
    """
    steps = self.all_steps()
    skipped = []
    for step in reversed(steps):
      try:
        restored = self.restore(step, target)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        skipped.append((step, why))
        warnings.warn(f"checkpoint {step} in {self.directory} cannot be read and is "
                      f"skipped ({why}); trying an older one.", stacklevel=2)
        continue
      return restored._replace(skipped=tuple(skipped))
    if not steps:
      return None
    raise ValueError(
        f"none of the checkpoints in {self.directory} can be read:\n  - "
        + "\n  - ".join(f"step {k}: {why}" for k, why in skipped)
        + "\nRemove them to start afresh, or restore a copy of the directory.")

  def restore_params(self, step: int, target: PyTree) -> PyTree:
    """Reads only the parameters of checkpoint ``step``, not the optimizer state.

    For a state saved as a :class:`~absign_jax.TrainState` (or any NamedTuple whose
    ``params`` field holds the parameters): what an exporter or an evaluation needs,
    without building the optimizer that trained them or reading its state.

    Args:
      step: a step from :meth:`all_steps`.
      target: the parameter tree to read into (arrays or ``jax.ShapeDtypeStruct``).

    Raises:
      CheckpointMismatchError: the checkpoint has no ``params`` or they do not match
        ``target`` (the message lists the differences).
      FileNotFoundError: there is no checkpoint ``step``.
    """
    step = int(step)
    meta = self._readable_metadata(step)
    where = f"checkpoint {step} in {self.directory}"
    # The saved leaves are numbered in flattening order; the parameters are those
    # whose path starts with the ``params`` field.
    index = {path[len(".params"):]: i for i, (path, _, _) in enumerate(meta["tree"]["leaves"])
             if path.startswith(".params")}
    if not index:
      raise CheckpointMismatchError(
          f"{where} holds no `params` field (its leaves start with "
          f"{meta['tree']['leaves'][0][0] if meta['tree']['leaves'] else 'nothing'}); "
          "restore_params reads states saved as a TrainState. Use restore() instead.")
    saved = {"leaves": [[p, s, d] for p, s, d in meta["tree"]["leaves"]
                        if p.startswith(".params")]}
    saved["leaves"] = [[p[len(".params"):], s, d] for p, s, d in saved["leaves"]]
    check_compatible(saved, describe(target), where=where + " (its params)")
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = [jax.tree_util.keystr(k) for k, _ in with_paths]
    flat = [x for _, x in with_paths]
    abstract = {_leaf_name(index[p]): _abstract(x) for p, x in zip(paths, flat) if np.size(x)}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=v.sharding or default)
                    for k, v in abstract.items()}
    out = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args,
                                    partial_restore=True))
    leaves = [_like_target(out[_leaf_name(index[p])], x) if np.size(x) else _empty_like(x)
              for p, x in zip(paths, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)

  # -- lifetime ---------------------------------------------------------------------

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    # With an exception in flight, a failed background save may never finish:
    # do not wait for it.
