"""safer-jax: Ex-Ante safety reasoning alignment (SAFER) for open LLMs in JAX."""

__version__ = "0.1.0"
