"""absign_jax: memory-efficient full-parameter fine-tuning with block sign descent.

The public API is flat: ``import absign_jax`` and use ``absign_jax.absignsgd(...)``.
The folders follow the flow of one training step:

* :mod:`absign_jax.blocks` -- what a block is (``partition``) and which block is next
  (``selection``);
* :mod:`absign_jax.optim` -- the block-coordinate transformation and the ABSignSGD
  family built on it (``absignsgd``, ``block_adam``, ``sign_sgd``,
  ``alias_absignsgd``);
* :mod:`absign_jax.related` -- other optimizers of the field (SGD-SaI, ALIAS
  parameter-free sign descent);
* :mod:`absign_jax.train` -- the training steps, the model protocol, precision, data
  parallelism and checkpoints;
* :mod:`absign_jax.profiling` -- bytes of trees and compiled programs, collective bytes;
* :mod:`absign_jax.allocator` -- the host allocator that keeps XLA:CPU's freed
  temporaries mapped between steps;
* :mod:`absign_jax.llm` -- the fine-tuning program (a Llama-family model, GGUF, data).
"""

# First, before JAX starts threads: glibc's settings that keep XLA:CPU's freed
# temporaries mapped, when the environment chooses them (see absign_jax.allocator).
from absign_jax import allocator

if allocator.choice() == "glibc":
  allocator.keep_freed_memory()

from absign_jax import blocks, optim, profiling, related, train  # noqa: E402
from absign_jax.blocks.partition import BlockSpec, LeafBlock, block_spec
from absign_jax.blocks.selection import (
    BlockSelection,
    SelectionState,
    costs,
    cyclic,
    depth_biased,
    fixed_order,
    random_reshuffle,
    uniform,
)
from absign_jax.optim.block_coordinate import (
    BlockCoordinateState,
    BlockOptions,
    active_block,
    block_coordinate,
    depth_scale,
    find_state,
    set_depth_bias,
)
from absign_jax.optim.optimizers import (
    absignsgd, block_adam, scale_by_param_rms, sign_sgd)
from absign_jax.optim.parameter_free import alias_absignsgd
from absign_jax.related.sgd_sai import ScaleBySaiState, scale_by_sai, sgd_sai
from absign_jax.related.sign_alias import (
    ScaleByAliasState,
    SignSGDEstimates,
    alias_sign_sgd,
    scale_by_alias,
    sign_sgd_estimates,
    sos_step_size,
)
from absign_jax.train.checkpoint import Checkpointer, Restored
from absign_jax.train.data_parallel import (
    data_parallel_block_step, data_parallel_full_step)
from absign_jax.train.model import (
    Cut,
    LayerCut,
    LayeredLoss,
    NnxParts,
    StackedLayers,
    cut,
    cut_linen,
    cut_nnx,
    split_nnx,
)
from absign_jax.train.plan import TrainingPlan, training_plan
from absign_jax.train.precision import (
    DynamicLossScale,
    LossScaleState,
    Policy,
    PrecisionState,
    policy,
    stochastic_round,
)
from absign_jax.train.step import (
    BlockTrainStep,
    FullTrainStep,
    KeepLayers,
    LayerCost,
    ResidualBudget,
    TrainState,
)

__version__ = "0.1.0"

__all__ = [
    # blocks: partition and selection
    "BlockSelection", "BlockSpec", "LeafBlock", "SelectionState", "block_spec", "costs",
    "cyclic", "depth_biased", "fixed_order", "random_reshuffle", "uniform",
    # optim: the block-coordinate transformation and the ABSignSGD family
    "BlockCoordinateState", "absignsgd", "active_block", "alias_absignsgd",
    "BlockOptions", "block_adam", "block_coordinate", "depth_scale", "find_state",
    "scale_by_param_rms", "set_depth_bias", "sign_sgd",
    # related: other optimizers of the field
    "ScaleByAliasState", "ScaleBySaiState", "SignSGDEstimates", "alias_sign_sgd",
    "scale_by_alias", "scale_by_sai", "sgd_sai", "sign_sgd_estimates", "sos_step_size",
    # train: steps, model protocol, precision, data parallelism, checkpoints
    "BlockTrainStep", "Checkpointer", "Cut", "DynamicLossScale", "FullTrainStep",
    "KeepLayers", "LayerCost", "LayerCut", "LayeredLoss", "LossScaleState", "NnxParts",
    "Policy", "PrecisionState", "ResidualBudget", "Restored", "StackedLayers",
    "TrainState", "TrainingPlan", "cut", "cut_linen", "cut_nnx",
    "data_parallel_block_step", "data_parallel_full_step", "policy", "split_nnx",
    "stochastic_round", "training_plan",
    # subpackages
    "allocator", "blocks", "optim", "profiling", "related", "train",
]
