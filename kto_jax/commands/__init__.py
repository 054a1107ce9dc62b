"""Subcommands of the `kto-jax` console script: thin flag parsing over library code."""
