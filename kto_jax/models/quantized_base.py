"""A frozen base quantised on the way in: which weights, their stored form, and the loader.

QLoRA keeps the base's layer projections (q/k/v/o, gate/up/down: every stacked HF matrix
of the param table) in int8 or NF4 (kto_jax/models/quantize.py) and everything else
(embedding, norms, biases, an untied lm_head) in `param_dtype`, as transformers'
`BitsAndBytesConfig` does (it quantises the decoder's Linear layers only).

`load_quantized` reads a checkpoint through a `TensorSource` one HF tensor at a time and
quantises each projection on the host right after reading it. From safetensors each
process reads only the rectangles of each tensor that its own devices' shards of the codes
need, and quantises them with exactly the codes and scales the whole tensor gets
(kto_jax/models/shard_read.py: NF4 rectangles in whole blocks of 64, int8's per-channel
absmax and double quantisation's statistics max-reduced over the rectangles and
processes). The host therefore holds at most its share of one checkpoint tensor (in float32
pieces of `quantize._CHUNK` values) plus its share of one quantised stacked weight: never
the model in bf16. A source that cannot read slices (GGUF) is read one whole tensor at a
time, quantised, stacked and placed (each device receives only its own shard).

The result is a `QuantizedBase`: the unquantised parameters under their NNX paths, and the
quantised weights stacked [L, ...] under their layer names, each a `quantize.Int8Weight` or
`quantize.Nf4Weight` whose arrays carry the weight's logical axes (`quantized_layer_axes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kto_jax import fs, hub
from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models import params as table
from kto_jax.models import quantize as qz
from kto_jax.models.quantize import Quantization  # noqa: F401  (re-exported)
from kto_jax.models.quantized_layers import QUANTIZED_TRANSFORMS, quantized_rows  # noqa: F401  (re-exported)
from kto_jax.models.config import ModelConfig
from kto_jax.models.hf_io import check_tensor_names, in_our_spelling, load_param, place, read_hf_config
from kto_jax.models.shard_read import check_shape, read_quantized_sharded
from kto_jax.models.tensor_source import SafetensorsSource, TensorSource, sliceable
from kto_jax.models.quantized_layers import leaf_names
from kto_jax.models.transformer import Transformer, abstract_model, layer_axes, layer_param_shapes


@dataclasses.dataclass
class QuantizedBase:
    """A loaded quantised base: `params` {NNX path: array} of the unquantised parameters
    (param_dtype), `layers` {layer weight name: stacked quantised weight}, and the config."""

    config: ModelConfig
    params: dict[tuple[str, ...], jax.Array]
    layers: dict[str, qz.QuantizedWeight]
    quantization: Quantization


def abstract_quantized_layers(config: ModelConfig, quantization: Quantization) -> dict[str, qz.QuantizedWeight]:
    """{name: stacked quantised weight with ShapeDtypeStruct leaves} (no data)."""
    shapes = layer_param_shapes(config)
    return {name: qz.abstract_weight(shapes[name], n_in, quantization.scheme, quantization.double_quant,
                                     lead=(config.num_layers,))
            for name, (_, n_in) in quantized_rows(config).items()}


def quantized_layer_axes(config: ModelConfig, quantization: Quantization) -> dict[str, qz.QuantizedWeight]:
    """{name: the quantised weight with each array replaced by its logical axes}."""
    axes = layer_axes(config)
    return {name: qz.quantized_axes(w, ("layers", *axes[name]))
            for name, w in abstract_quantized_layers(config, quantization).items()}


def check_quantizable(config: ModelConfig, quantization: Quantization) -> None:
    """UserError when a weight cannot take the scheme (NF4: input size not a multiple of 64)."""
    if quantization.scheme != "nf4":
        return
    shapes = layer_param_shapes(config)
    bad = {name: math.prod(shapes[name][:n_in]) for name, (_, n_in) in quantized_rows(config).items()
           if math.prod(shapes[name][:n_in]) % qz.NF4_BLOCK}
    if bad:
        listed = ", ".join(f"{name} (input size {size})" for name, size in bad.items())
        raise UserError(f"NF4 quantises blocks of {qz.NF4_BLOCK} inputs of each weight, and this "
                        f"{config.architecture}'s {listed} is not a multiple of {qz.NF4_BLOCK}: "
                        "quantise its base to int8 instead")


def load_quantized(path: str, quantization: Quantization, *, mesh: Mesh | None = None, rules: Any = None,
                   **config_fields: Any) -> QuantizedBase:
    """`load_quantized_from_source` of a local HF checkpoint directory or hub id (safetensors)."""
    named = str(path) if hub.looks_like_hub_id(path) or fs.is_remote(path) else os.path.abspath(path)
    path = hub.resolve_id(path)
    return load_quantized_from_source(read_hf_config(path), SafetensorsSource(path), quantization,
                                      mesh=mesh, rules=rules, untrained_from=named, **config_fields)


def load_quantized_from_source(hf_config: dict[str, Any], source: TensorSource, quantization: Quantization,
                               *, mesh: Mesh | None = None, rules: Any = None,
                               untrained_from: str | None = None, **config_fields: Any) -> QuantizedBase:
    """The base of `hf_config` from `source`, its projections quantised as each is read.

    Args:
      hf_config, source: the checkpoint's config.json and tensors (HF names and layout).
      quantization: the scheme; "none" is refused here (load with hf_io.from_pretrained).
      mesh, rules: target mesh (None: one device) and logical-axis rules (None: replicated).
      untrained_from, config_fields: as `hf_io.load_from_source` (param_dtype, dtype, ...).
    """
    if quantization.scheme == "none":
        raise ValueError("load_quantized: quantization 'none' is hf_io.from_pretrained's job")
    config = ModelConfig.from_hf(hf_config, **{**config_fields, "quantization": quantization})
    if config.family.passthrough and untrained_from:
        config = config.replace(untrained_from=untrained_from)
    check_quantizable(config, quantization)
    source = in_our_spelling(source, config.family)
    check_tensor_names(table.param_table(config), source.names(), config)
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    rules = shd.rules_of(rules)
    quantized = quantized_rows(config)
    _, state = nnx.split(abstract_model(config.replace(quantization=Quantization())))
    variables = dict(nnx.to_flat_state(state))
    shardings = dict(nnx.to_flat_state(shd.named_shardings(state, mesh, rules)))
    params = {}
    for row in table.param_table(config):
        if row.stacked and row.path[-1] in quantized:
            continue
        params[row.path] = load_param(row, source, variables[row.path].get_value().shape,
                                      shardings[row.path].get_value(), config)
    axes = quantized_layer_axes(config, quantization)
    layers = {}
    for name, abstract in abstract_quantized_layers(config, quantization).items():
        row, n_in = quantized[name]
        leaf_shardings = jax.tree.map(lambda ax, x: shd.sharding_for(ax, x.shape, mesh, rules),
                                      axes[name], abstract, is_leaf=lambda x: isinstance(x, tuple))
        if sliceable(source):
            layers[name] = read_quantized_sharded(row, n_in, source, abstract, leaf_shardings, config, quantization)
            continue
        stacked = _read_quantized(row, n_in, source, abstract, config, quantization)
        layers[name] = jax.tree.map(place, stacked, leaf_shardings)
    return QuantizedBase(config, params, layers, quantization)


def _read_quantized(row: table.ParamRow, n_in: int, source: TensorSource, abstract: qz.QuantizedWeight,
                    config: ModelConfig, quantization: Quantization) -> qz.QuantizedWeight:
    """One stacked quantised weight on the host, filled layer by layer (one HF tensor at a time)."""
    stacked = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), abstract)
    want = table.hf_shape(row.transform, abstract.shape)
    for i, name in enumerate(row.hf_names(config.num_layers)):
        tensor = source.get(name)
        check_shape(name, tensor.shape, want)
        one = qz.quantize_weight(tensor, abstract.shape, n_in, quantization.scheme, quantization.double_quant)
        del tensor
        jax.tree.map(lambda whole, part: whole.__setitem__(i, part), stacked, one)
    return stacked


def quantized_model(base: QuantizedBase) -> Transformer:
    """The Transformer of a loaded base: its projections `QuantizedProjection`s holding the
    loaded codes and scales, the rest its params (the same arrays, on their shardings)."""
    config = base.config.replace(quantization=base.quantization)
    graphdef, state = nnx.split(abstract_model(config))
    variables = dict(nnx.to_flat_state(state))
    for path, value in base.params.items():
        variables[path].set_value(value)
    for name, weight in base.layers.items():
        for leaf, value in zip(leaf_names(weight), jax.tree.leaves(weight)):
            variables[("layers", name, leaf)].set_value(value)
    return nnx.merge(graphdef, state)


def load_quantized_model(hf_config: dict[str, Any], source: TensorSource, quantization: Quantization,
                         **options: Any) -> tuple[Transformer, ModelConfig]:
    """(model, config) of `load_quantized_from_source` (options: mesh, rules, untrained_from,
    ModelConfig fields): what `kto_jax.models.from_pretrained(..., quantization=...)` returns."""
    model = quantized_model(load_quantized_from_source(hf_config, source, quantization, **options))
    return model, model.config


def quantize_model(model: Transformer, quantization: Quantization) -> Transformer:
    """A float `model` with its projections quantised on the host, as `load_quantized` would
    quantise the checkpoint `save_pretrained(model)` writes in its param_dtype (small models,
    tests). Every other array is `model`'s own; the quantised ones land on the default device
    (`kto_jax.sharding.shard_model` places them)."""
    config = model.config
    check_quantizable(config, quantization)
    rows = quantized_rows(config)
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    params = {path: v for path, v in flat.items() if not (path[0] == "layers" and path[-1] in rows)}
    layers = {}
    for name, (row, n_in) in rows.items():
        stacked = np.asarray(jax.device_get(flat[("layers", name)]))
        layers[name] = qz.stack([
            qz.quantize_weight(table.to_hf(row.transform, w), w.shape, n_in, quantization.scheme,
                               quantization.double_quant) for w in stacked])
    return quantized_model(QuantizedBase(config, params, layers, quantization))


def dequantized_model(model: Transformer) -> Transformer:
    """A float Transformer (config.param_dtype, no quantisation) whose projections are the
    dequantised weights of a quantised `model`: what its forward computes with, as ordinary
    weights (the reference of tests, and the base of a merged export)."""
    config = model.config
    graphdef, state = nnx.split(abstract_model(config.replace(quantization=Quantization())))
    variables = dict(nnx.to_flat_state(state))
    dtype = jax.numpy.dtype(config.param_dtype)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path in variables:
            variables[path].set_value(var.get_value())
    for name in quantized_rows(config):
        variables[("layers", name)].set_value(qz.dequantize(getattr(model.layers, name)[...], dtype))
    return nnx.merge(graphdef, state)
