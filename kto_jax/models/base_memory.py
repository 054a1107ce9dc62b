"""Bytes per chip of a frozen base, unquantised or quantised (the fit table's base term).

Every array of the base (kto_jax/models/quantized_base.py: the quantised projections, the
rest in param_dtype) is sharded by its logical axes through the rule table on a mesh of
the given sizes, exactly as the loader places it; a chip holds one shard of each. No
device and no data: an AbstractMesh and abstract shapes, so Llama-3-70B is priced on a
laptop. `kto-jax compile` measures the whole step (activations, adapters, optimizer);
this is the base's share of it, by kind:

    codes   the quantised projections' codes (int8: 1 byte a value; NF4: half a byte)
    scales  their absmaxes (float32; NF4 double-quantised: one byte per block of 64,
            plus a float32 per 256 blocks and an offset per tensor)
    dense   everything kept in param_dtype (embedding, norms, biases, lm_head), or the
            whole base when unquantised
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh

from kto_jax import sharding as shd
from kto_jax.models.config import ModelConfig
from kto_jax.models.quantized_base import (
    Quantization, abstract_quantized_layers, quantized_layer_axes, quantized_rows)
from kto_jax.models.transformer import abstract_model


def base_bytes_per_chip(config: ModelConfig, quantization: Quantization, mesh_sizes: Mapping[str, int],
                        rules: Any) -> dict[str, int]:
    """{"codes", "scales", "dense", "total"}: bytes one chip holds of the base.

    Args:
      config: the model (its param_dtype prices the unquantised arrays).
      quantization: Quantization("none" | "int8" | "nf4", double_quant).
      mesh_sizes: {"data", "fsdp", "expert", "tensor"} sizes (as config.mesh; no -1).
      rules: the logical-axis rule table (config.mesh.rules).
    """
    mesh = AbstractMesh(tuple(int(mesh_sizes.get(a, 1)) for a in shd.MESH_AXES), shd.MESH_AXES)
    rules = shd.rules_of(rules)
    quantized = set() if quantization.scheme == "none" else set(quantized_rows(config))
    _, state = nnx.split(abstract_model(config.replace(quantization=Quantization())))  # float layout
    dense = 0
    for path, var in nnx.to_flat_state(state):
        if path[0] == "layers" and path[-1] in quantized:
            continue
        value = var.get_value()
        dense += _shard_bytes(value.shape, value.dtype, tuple(var.get_metadata()["out_sharding"]), mesh, rules)
    codes = scales = 0
    if quantized:
        axes = quantized_layer_axes(config, quantization)
        for name, w in abstract_quantized_layers(config, quantization).items():
            sizes = jax.tree.map(lambda ax, x: _shard_bytes(x.shape, x.dtype, ax, mesh, rules), axes[name], w,
                                 is_leaf=lambda x: isinstance(x, tuple))
            codes += sizes.codes
            scales += sum(jax.tree.leaves(sizes.absmax))
    return {"codes": codes, "scales": scales, "dense": dense, "total": codes + scales + dense}


def _shard_bytes(shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...], mesh: AbstractMesh,
                 rules: Any) -> int:
    """Bytes of one shard of an array of `shape` with logical `axes` on `mesh`."""
    spec = shd.logical_to_mesh(axes, rules, shape, mesh)
    dims = [d // math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else (s or ())))
            for d, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
    return math.prod(dims) * np.dtype(dtype).itemsize

