"""pn_jax: Propose Noising (PatchCore + feature influence + adaptive noise) in JAX/Flax."""
__version__ = "0.1.0"
