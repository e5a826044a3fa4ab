"""Other optimizers of the field, as optax transformations (baselines and variants).

* :mod:`.sgd_sai` -- SGD-SaI: SGD with momentum and frozen per-tensor step scales;
* :mod:`.sign_alias` -- ALIAS parameter-free sign descent and an SOS-style step-size
  search.
"""
