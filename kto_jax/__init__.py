"""kto-jax: align open LLMs with Kahneman-Tversky Optimization and other HALOs in JAX."""

__version__ = "0.1.0"
