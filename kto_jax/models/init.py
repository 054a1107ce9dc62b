"""Randomly initialised models created directly on their shardings (benchmarks, tests, AOT)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from kto_jax import sharding as shd
from kto_jax.models.config import ModelConfig
from kto_jax.models.transformer import Transformer, abstract_model


def init_model(config: ModelConfig, *, mesh: Mesh | None = None, rules: Any = None,
               seed: int = 0) -> Transformer:
    """A random Transformer whose parameters are created already sharded.

    The constructor runs inside one jit with the parameters' NamedShardings as
    sharding constraint, so an 8B model never sits whole on one device. The values
    are the draws of `Transformer(config, rngs=nnx.Rngs(seed))` (up to float rounding).

    Args:
      config: model shape and dtypes (e.g. a preset such as `llama32_1b()`).
      mesh: target mesh; None means a one-device mesh.
      rules: logical-axis rule table (config.mesh.rules or config.mesh); None replicates.
      seed: seed of the parameter initialisers.
    """
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = shd.named_shardings(abstract_state, mesh, shd.rules_of(rules))

    @jax.jit
    def create():
        state = nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, create())
