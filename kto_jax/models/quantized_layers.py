"""A quantised frozen projection inside the model: its arrays as NNX parameters.

Under QLoRA (`ModelConfig.quantization`, kto_jax/models/quantize.py) each stacked layer
projection (q/k/v/o, gate/up/down: the param table's matrices) is a `QuantizedProjection`
instead of an `nnx.Param`: one `QuantizedParam` per array of its stored form (`codes`,
`absmax`, or for NF4 with double quantisation `absmax_codes`, `absmax_absmax`,
`absmax_offset`), each with its logical axes (`quantize.quantized_axes`), so the sharding
rules place it like the weight, the train state holds it as frozen base params and a
LoRA step never differentiates it.

`projection[...]` gives the stored form (`quantize.Int8Weight` / `Nf4Weight`, arrays
[L, ...]), as `param[...]` gives an array: the layer scan takes it as one of its xs,
slices one layer per iteration, and `kto_jax.models.layers.layer_weight` dequantises that
layer's slice in the compute dtype inside the scan body. The whole base never exists
dequantised.

A model built from a config alone (`Transformer(config)`, `abstract_model`) has all-zero
codes and scales: the real ones come from a checkpoint (kto_jax/models/quantized_base.py,
`load_quantized`) or from quantising a float model (`quantize_model` there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kto_jax.models import params as table
from kto_jax.models import quantize as qz
from kto_jax.models.config import ModelConfig

# Row transforms of the HF matrices that are quantised -> how many of our leading axes are inputs.
QUANTIZED_TRANSFORMS = {table.LINEAR: 1, table.HEADS_IN: 1, table.HEADS_OUT: 2}


def quantized_rows(config: ModelConfig) -> dict[str, tuple[table.ParamRow, int]]:
    """{layer weight name: (its param-table row, number of input axes)} of the weights a
    quantised base stores quantised (whatever `config.quantization` says)."""
    return {row.path[-1]: (row, QUANTIZED_TRANSFORMS[row.transform]) for row in table.param_table(config)
            if row.stacked and row.transform in QUANTIZED_TRANSFORMS}


class QuantizedParam(nnx.Param):
    """One array (codes or scales) of a quantised frozen weight: an nnx.Param, so the base's
    state holds it like any weight; integer codes are never trained (QLoRA trains adapters)."""


def leaf_names(tree: Any) -> tuple[str, ...]:
    """'codes', 'absmax', 'absmax_codes', ...: each leaf's field path joined by '_'."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple("_".join(k.name for k in path) for path, _ in paths)


class QuantizedProjection(nnx.Module):
    """A stacked quantised weight [L, ...] as NNX parameters; `self[...]` is its stored form."""

    def __init__(self, weight: qz.QuantizedWeight, axes: qz.QuantizedWeight):
        leaves, self.treedef = jax.tree.flatten(weight)
        self.names = leaf_names(weight)
        axis_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        for name, value, ax in zip(self.names, leaves, axis_leaves):
            setattr(self, name, QuantizedParam(value, out_sharding=tuple(ax), eager_sharding=False))

    def __getitem__(self, index: Any) -> qz.QuantizedWeight:
        if index is not Ellipsis:
            raise IndexError("a quantised projection is read whole: projection[...]")
        return jax.tree.unflatten(self.treedef, [getattr(self, n)[...] for n in self.names])


def zero_projection(shape: tuple[int, ...], n_in: int, axes: tuple[str, ...], num_layers: int,
                    quantization: qz.Quantization) -> QuantizedProjection:
    """The quantised form of a stacked weight of per-layer `shape` (logical `axes`, without
    'layers'), all zeros: its structure, shapes and shardings before a loader fills it."""
    abstract = qz.abstract_weight(shape, n_in, quantization.scheme, quantization.double_quant,
                                  lead=(num_layers,))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    return QuantizedProjection(zeros, qz.quantized_axes(abstract, ("layers", *axes)))
