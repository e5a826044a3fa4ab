"""absign_jax: block-coordinate sign descent for JAX/Flax."""
