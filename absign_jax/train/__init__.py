"""Training: the steps, how they see a model, precision, data parallelism, checkpoints.

* :mod:`.model` -- the model protocol (``LayeredLoss``), its adapters (``cut_nnx``,
  ``cut_linen``, ``cut``) and ``split_nnx``;
* :mod:`.step` -- ``BlockTrainStep`` (partial backprop) and ``FullTrainStep``, one
  calling form ``state, metrics = step(state, batch)``;
* :mod:`.plan` -- ``training_plan``: the blocks, frozen leaves and counts a block
  optimizer trains;
* :mod:`.precision` -- policies, loss scaling, stochastic rounding, the master copy and
  the step's update arithmetic;
* :mod:`.data_parallel` -- majority votes over a mesh axis, composed into the steps;
* :mod:`.collectives` -- the vote, the mean and global arrays, shared by
  ``data_parallel`` and ``sharding``;
* :mod:`.sharding` -- parameters sharded over a ``(data, fsdp)`` mesh (FSDP), the
  vote over ``data``;
* :mod:`.checkpoint` -- orbax checkpoints that resume exactly.
"""
