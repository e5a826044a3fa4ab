"""The block-coordinate transformation and the ABSignSGD family built on it.

* :mod:`.block_coordinate` -- ``block_coordinate(inner)``: any optax transformation
  applied to the active block only;
* :mod:`.optimizers` -- ``absignsgd``, ``block_adam`` (BAdam-style), ``sign_sgd``;
* :mod:`.parameter_free` -- ``alias_absignsgd`` (ALIAS step sizes, no learning rate).
"""
