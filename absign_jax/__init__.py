"""absign_jax: memory-efficient full-parameter fine-tuning with block sign descent.

The public API is flat: ``import absign_jax`` and use ``absign_jax.absignsgd(...)``.
Data flows one way: partition -> selection -> block_coordinate -> optimizers ->
training step.
"""

from absign_jax import checkpoint, distributed, precision, selection
from absign_jax.checkpoint import Checkpointer, Restored
from absign_jax.precision import (
    DynamicLossScale,
    LossScaleState,
    Policy,
    PrecisionState,
    policy,
    stochastic_round,
)
from absign_jax.block_coordinate import (
    BlockCoordinateState,
    active_block,
    block_coordinate,
    find_state,
)
from absign_jax.alias import (
    ScaleByAliasState,
    SignSGDEstimates,
    alias_absignsgd,
    alias_sign_sgd,
    scale_by_alias,
    sign_sgd_estimates,
    sos_step_size,
)
from absign_jax.distributed import (
    DataParallelBlockStep,
    DataParallelFullStep,
    collective_bytes,
)
from absign_jax.sgd_sai import ScaleBySaiState, scale_by_sai, sgd_sai
from absign_jax.optimizers import absignsgd, block_adam, check_hyperparams, sign_sgd
from absign_jax.partition import BlockSpec, LeafBlock, block_spec
from absign_jax.step import (
    BlockTrainStep,
    FullTrainStep,
    LayeredLoss,
    NnxParts,
    TrainState,
    split_nnx,
)
from absign_jax.selection import (
    BlockSelection,
    SelectionState,
    costs,
    cyclic,
    depth_biased,
    fixed_order,
    random_reshuffle,
    uniform,
)

__version__ = "0.1.0"

__all__ = [
    "Checkpointer", "DynamicLossScale", "LossScaleState", "Policy", "PrecisionState",
    "Restored", "TrainState", "checkpoint", "policy", "precision", "stochastic_round",
    "DataParallelBlockStep", "DataParallelFullStep", "collective_bytes", "distributed",
    "ScaleByAliasState", "ScaleBySaiState", "SignSGDEstimates", "alias_absignsgd",
    "alias_sign_sgd", "scale_by_alias", "scale_by_sai", "sgd_sai", "sign_sgd_estimates",
    "sos_step_size",
    "BlockCoordinateState", "BlockSelection", "BlockTrainStep", "FullTrainStep", "LayeredLoss", "NnxParts", "split_nnx", "BlockSpec", "LeafBlock",
    "SelectionState", "absignsgd", "active_block", "block_adam", "block_coordinate",
    "block_spec", "check_hyperparams", "costs", "cyclic", "depth_biased",
    "find_state", "fixed_order", "random_reshuffle", "selection", "sign_sgd",
    "uniform",
]
