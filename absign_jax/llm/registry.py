"""The optimizers of the fine-tuning program and of ``benchmarks/step_time.py``.

One :class:`Optimizer` entry per name in :data:`OPTIMIZERS` says everything the
program and the benchmark need to know about it: how to build its optax
transformation from a run's options, its default learning rate (per model family
where it differs), whether it is a block method, how the model is taken apart for
it, and which of its options are saved with checkpoints. Adding an optimizer is one
entry::

  registry.register("sgd", registry.Optimizer(
      make=lambda lr, config: optax.sgd(lr), lr=1e-3))

after which ``python -m absign_jax.llm --optimizer sgd`` (and ``--compare``) train
with it and ``benchmarks/step_time.py --methods sgd`` times it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax.numpy as jnp
import optax

import absign_jax
from absign_jax.llm import peers as peers_lib

if TYPE_CHECKING:  # (the options' module imports this one)
  from absign_jax.llm.config import RunConfig

__all__ = ["Optimizer", "OPTIMIZERS", "register", "get", "names", "peak_learning_rate",
           "make_optimizer", "set_learning_rate", "RELATIVE_LR", "BADAM_SWITCH_EVERY",
           "BLOCK_ORDERS"]

# absignsgd --relative: lr is a fraction of each leaf's RMS. 5e-3 is SmolLM2's absolute
# 1e-3 on its layer matrices (median RMS 0.19); Gemma 3 270M's are 0.04.
RELATIVE_LR = 5e-3
BADAM_SWITCH_EVERY = 50  # block_adam's default --switch-every (BAdam's K)
# BAdam's switching orders and the selection schemes that implement them.
BLOCK_ORDERS = {"random": "random_reshuffle", "ascending": "cyclic",
                "descending": "cyclic_descending"}


def _no_settings(config: RunConfig) -> dict[str, Any]:
  return {}


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One optimizer: what the program and the benchmark branch on.

  Attributes:
    make: ``make(lr, config)`` builds the optax transformation from the run's
      options (a :class:`~absign_jax.llm.config.RunConfig`); ``lr`` is None for the
      parameter-free ones.
    lr: Default peak learning rate (on SmolLM2-135M, see docs/tasks.md); None:
      parameter-free (it sets its own step size, and ``--lr`` is refused).
    family_lr: Default learning rates of model families where they differ from
      ``lr`` (``LlamaConfig.arch`` to rate).
    block: A block method: one block trains per step (``BlockTrainStep``, partial
      backprop, every precision policy); else full backprop (fp32 and bf16).
    frozen_in_batch: Its frozen weights ride in the step's batch argument
      (``peers.PartialParts.wrap``): one device, no ``--micro-batches``.
    options: The optimizer-specific options it reads (``RunConfig`` fields); an
      option such as ``momentum`` or ``relative`` given to a run without an optimizer
      that reads it is an error.
    settings: ``settings(config)``: its options that shape the training, saved with
      every checkpoint and compared on ``--resume`` (with the common ones).
    parts: ``parts(model, settings)`` takes the model apart for the step from the
      run's saved settings (so that a checkpoint rebuilds the same parts); None: every
      parameter trains (``absign_jax.split_nnx``).
    check_model: ``check_model(config, model_config)`` returns a message when the
      options do not fit the model (checked before training), else None.
    benchmarked: A row of ``benchmarks/step_time.py`` (its ``--methods``), timed on
      the whole model (LoRA through the benchmark's own adapters).
  """
  make: Callable[[Any, RunConfig], optax.GradientTransformation]
  lr: float | None
  family_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
  block: bool = False
  frozen_in_batch: bool = False
  options: tuple[str, ...] = ()
  settings: Callable[[RunConfig], dict[str, Any]] = _no_settings
  parts: Callable[[Any, Mapping[str, Any]], Any] | None = None
  check_model: Callable[[RunConfig, Any], str | None] | None = None
  benchmarked: bool = True

  @property
  def parameter_free(self) -> bool:
    return self.lr is None


# -- the entries' pieces -------------------------------------------------------------


def _sign_visit(config: RunConfig) -> dict[str, Any]:
  """absignsgd's block visit: momentum (None: no buffer in the state), length and
  step per depth (None: the same everywhere)."""
  scale = (None if config.shallow_step == 1
           else absign_jax.depth_scale(config.shallow_step))
  return dict(momentum=config.momentum or None, steps_per_block=config.switch_every or 1,
              block_scale=scale)


_EXTRA_BLOCKS = ("train_embedding", "train_head")  # the block methods' options


def _extra_blocks(config: RunConfig) -> dict[str, Any]:
  """The block methods' optional blocks beyond the layers (the partition options)."""
  return dict(include_embedding=config.train_embedding, include_head=config.train_head)


def _extra_block_settings(config: RunConfig) -> dict[str, Any]:
  # Only when set, as in runs from before these options.
  return {k: True for k in _EXTRA_BLOCKS if getattr(config, k)}


def _sign_settings(config: RunConfig) -> dict[str, Any]:
  # Only what differs from the plain step, as in runs from before these options.
  settings: dict[str, Any] = {}
  if config.relative:
    settings["relative"] = True
  if (config.switch_every or 1) > 1:
    settings["switch_every"] = config.switch_every
  if config.momentum:
    settings["momentum"] = config.momentum
  if config.shallow_step != 1:
    settings["shallow_step"] = config.shallow_step
  return {**settings, **_extra_block_settings(config)}


def depth_bias_at(config: RunConfig, progress: float) -> float:
  """absignsgd's depth bias at ``progress`` in [0, 1]: ``--depth-bias`` moving
  linearly to ``--depth-bias-end`` (when given), on a grid of 0.25 (coarse steps
  keep the selection's integer cost table small)."""
  if config.depth_bias_end is None:
    return config.depth_bias
  p = min(max(progress, 0.0), 1.0)
  return round(4 * (config.depth_bias + (config.depth_bias_end - config.depth_bias) * p)) / 4


def _lora_parts(model, settings: Mapping[str, Any]):
  return peers_lib.lora_parts(model, rank=settings["lora_rank"],
                              alpha=settings["lora_alpha"],
                              targets=settings["lora_targets"].split(","),
                              seed=settings.get("seed", 0))


def _lora_rank_fits(config: RunConfig, cfg) -> str | None:
  q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
  sides = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q,
           "gate_proj": cfg.hidden_dim, "up_proj": cfg.hidden_dim,
           "down_proj": cfg.hidden_dim}
  targets = config.lora_targets.split(",")
  smallest = min(min(cfg.dim, sides[t]) for t in targets)
  if config.lora_rank > smallest:
    return (f"--lora-rank {config.lora_rank} is above {smallest}, the smaller side of "
            f"the smallest adapted matrix ({','.join(targets)}); use at most {smallest}")
  return None


_SIGN_OPTIONS = ("relative", "momentum", "switch_every", "shallow_step", *_EXTRA_BLOCKS)

OPTIMIZERS: dict[str, Optimizer] = {
    "absignsgd": Optimizer(
        make=lambda lr, c: absign_jax.absignsgd(
            lr, depth_bias=c.depth_bias, selection=c.selection,
            weight_decay=c.weight_decay, seed=c.seed, relative=c.relative,
            **_sign_visit(c), **_extra_blocks(c)),
        # A sign step moves every weight of the active layer by exactly lr, so the
        # right lr follows the weights' scale. Gemma 3 270M: held-out perplexity rose
        # at 1e-3 and fell 15% in 30 steps at 1e-4 (docs/models.md).
        lr=1e-3, family_lr={"gemma3": 1e-4}, block=True,
        options=("depth_bias", "depth_bias_end", "selection", *_SIGN_OPTIONS),
        settings=lambda c: {"depth_bias": c.depth_bias, "selection": c.selection,
                            **({} if c.depth_bias_end is None
                               else {"depth_bias_end": c.depth_bias_end}),
                            **_sign_settings(c)}),
    "absignsgd_uniform": Optimizer(
        make=lambda lr, c: absign_jax.absignsgd(
            lr, selection="uniform", weight_decay=c.weight_decay, seed=c.seed,
            relative=c.relative, **_sign_visit(c), **_extra_blocks(c)),
        lr=1e-3, family_lr={"gemma3": 1e-4}, block=True, options=_SIGN_OPTIONS,
        settings=_sign_settings),
    "block_adam": Optimizer(
        make=lambda lr, c: absign_jax.block_adam(
            lr, weight_decay=c.weight_decay, seed=c.seed,
            steps_per_block=c.switch_every or BADAM_SWITCH_EVERY,
            selection=BLOCK_ORDERS[c.block_order], **_extra_blocks(c)),
        lr=1e-4, block=True, options=("switch_every", "block_order", *_EXTRA_BLOCKS),
        settings=lambda c: {"switch_every": c.switch_every or BADAM_SWITCH_EVERY,
                            "block_order": c.block_order, **_extra_block_settings(c)}),
    "alias_absignsgd": Optimizer(
        make=lambda lr, c: absign_jax.alias_absignsgd(depth_bias=c.depth_bias,
                                                      seed=c.seed, **_extra_blocks(c)),
        lr=None, block=True, options=("depth_bias", *_EXTRA_BLOCKS),
        settings=lambda c: {"depth_bias": c.depth_bias, **_extra_block_settings(c)},
        benchmarked=False),
    "adamw": Optimizer(
        make=lambda lr, c: optax.adamw(lr, weight_decay=c.weight_decay), lr=1e-4),
    "sign_sgd": Optimizer(
        make=lambda lr, c: absign_jax.sign_sgd(lr, weight_decay=c.weight_decay),
        lr=1e-5),
    "sgd_sai": Optimizer(
        make=lambda lr, c: absign_jax.sgd_sai(lr, weight_decay=c.weight_decay),
        lr=1e-3, benchmarked=False),
    "alias_sign_sgd": Optimizer(
        make=lambda lr, c: absign_jax.alias_sign_sgd(), lr=None, benchmarked=False),
    "lora": Optimizer(
        make=lambda lr, c: optax.adamw(lr, weight_decay=c.weight_decay), lr=3e-4,
        frozen_in_batch=True, options=("lora_rank", "lora_alpha", "lora_targets"),
        settings=lambda c: {"lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha,
                            "lora_targets": c.lora_targets},
        parts=_lora_parts, check_model=_lora_rank_fits),
    "galore": Optimizer(
        make=lambda lr, c: peers_lib.galore(
            lr, rank=c.galore_rank, update_proj_gap=c.galore_gap, scale=c.galore_scale,
            weight_decay=c.weight_decay),
        lr=1e-4, frozen_in_batch=True,
        options=("galore_rank", "galore_gap", "galore_scale"),
        settings=lambda c: {"galore_rank": c.galore_rank, "galore_gap": c.galore_gap,
                            "galore_scale": c.galore_scale},
        parts=lambda model, settings: peers_lib.layer_parts(model), benchmarked=False),
}


def register(name: str, optimizer: Optimizer) -> Optimizer:
  """Adds ``optimizer`` under ``name`` (a new name: replacing one is an error)."""
  if name in OPTIMIZERS:
    raise ValueError(f"optimizer {name!r} is already registered")
  OPTIMIZERS[name] = optimizer
  return optimizer


def names() -> tuple[str, ...]:
  """The registered optimizers, in registration order."""
  return tuple(OPTIMIZERS)


def get(name: str) -> Optimizer:
  """The entry of ``name``; ``ValueError`` naming the known ones if there is none."""
  try:
    return OPTIMIZERS[name]
  except KeyError:
    raise ValueError(f"unknown optimizer {name!r}; choose from "
                     f"{', '.join(OPTIMIZERS)}") from None


def peak_learning_rate(config: RunConfig, name: str,
                       family: str | None = None) -> float | None:
  """``config.lr``, else the default of the optimizer for the model's ``family``.

  ``--relative`` (for the optimizers that read it) has its own default,
  :data:`RELATIVE_LR`, whatever the family. None for the parameter-free ones.
  """
  if config.lr is not None:
    return config.lr
  entry = get(name)
  if config.relative and "relative" in entry.options:
    return RELATIVE_LR
  return entry.family_lr.get(family, entry.lr)


def make_optimizer(config: RunConfig, name: str,
                   family: str | None = None) -> optax.GradientTransformation:
  """The optimizer ``name``, its learning rate an injected hyperparameter the loop
  sets (see :func:`set_learning_rate`); parameter-free ones as they are."""
  entry = get(name)
  if entry.parameter_free:
    if config.lr is not None:
      raise ValueError(f"{name} is parameter-free: drop --lr")
    return entry.make(None, config)
  make = lambda learning_rate: entry.make(learning_rate, config)
  return optax.inject_hyperparams(make)(
      learning_rate=peak_learning_rate(config, name, family))


def set_learning_rate(opt_state, lr: float):
  """``opt_state`` of :func:`make_optimizer` with its learning rate set to ``lr``."""
  if "learning_rate" not in getattr(opt_state, "hyperparams", {}):
    return opt_state  # parameter-free
  if not (math.isfinite(lr) and lr >= 0):
    raise ValueError(f"learning rate {lr} at this step: it must be finite and >= 0")
  old = opt_state.hyperparams["learning_rate"]
  return opt_state._replace(hyperparams={
      **opt_state.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype)})
