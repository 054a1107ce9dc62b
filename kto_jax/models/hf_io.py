"""Hugging Face checkpoint import and export: one loader/saver pair over the param table.

Import reads the checkpoint tensor by tensor through a `TensorSource` (safetensors
directory, or a .gguf file via `kto_jax.models.gguf`), fills an abstract
(`nnx.eval_shape`) model, and places each tensor straight onto its target
NamedSharding, so the whole model never sits on one device. From safetensors each
process reads only the slices of each tensor its own devices hold, one device block at a
time (kto_jax/models/shard_read.py); a source that cannot read slices (GGUF) is read one
whole tensor at a time and each device receives its shard. Export writes
config.json, sharded safetensors and their index in the layout
`transformers.AutoModelForCausalLM.from_pretrained` loads unchanged.

A multimodal checkpoint (`Family.passthrough`: Gemma 3's vision tower and projector)
trains only its language model; its other tensors are copied bit for bit, on export,
from the checkpoint it was loaded from (`ModelConfig.untrained_from`), and every name is
written in that checkpoint's spelling (`Family.legacy_prefixes`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors.numpy import save_file

from kto_jax import fs
from kto_jax import hub
from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models import params as table
from kto_jax.models.config import UNTRAINED_FROM_KEY, ModelConfig, dtype_name
from kto_jax.models import quantize as qz
from kto_jax.models.family import Family
from kto_jax.models.quantized_layers import quantized_rows
from kto_jax.models.shard_read import check_shape, read_sharded
from kto_jax.models.tensor_source import (
    SAFETENSORS_INDEX, RenamedSource, SafetensorsSource, TensorSource, rename, sliceable)
from kto_jax.models.transformer import Transformer, abstract_model

__all__ = ["TensorSource", "from_pretrained", "load_from_source", "save_pretrained", "load_tokenizer"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size "5GB"


def from_pretrained(path: str, *, mesh: Mesh | None = None, rules: Any = None,
                    param_dtype: Any = "float32", dtype: Any = "float32",
                    **overrides: Any) -> tuple[Transformer, ModelConfig]:
    """Load a local HF checkpoint directory (or a llama.cpp .gguf file) onto `mesh`.

    Args:
      path: directory with config.json and model.safetensors or
        model.safetensors.index.json; or a path ending in '.gguf'; or a hub id
        ("org/name", kto_jax/hub.py: the local cache first).
      mesh: target mesh; None means a one-device mesh on the first device.
      rules: logical-axis rule table (config.mesh.rules, or config.mesh itself);
        None replicates every parameter.
      param_dtype, dtype: stored weight dtype and compute dtype: a name ("bfloat16") or a
        dtype (jnp.bfloat16).
      overrides: other ModelConfig fields (remat_policy, attention_impl).
    Returns:
      (model, config) with every parameter on its NamedSharding.
    """
    hf_config, source, named = open_checkpoint(path)
    return load_from_source(hf_config, source, mesh=mesh, rules=rules, untrained_from=named,
                            param_dtype=param_dtype, dtype=dtype, **overrides)


def open_checkpoint(path: str) -> tuple[dict[str, Any], TensorSource, str]:
    """(config.json dict, its tensors, the name an export records) of a checkpoint directory,
    hub id or .gguf file (see `from_pretrained`); nothing is read but the config."""
    named = str(path) if hub.looks_like_hub_id(path) or fs.is_remote(path) else os.path.abspath(path)
    path = hub.resolve_id(path)
    if str(path).endswith(".gguf"):
        from kto_jax.models.gguf import open_gguf  # lazy: only GGUF users need the gguf package
        hf_config, source, _ = open_gguf(str(path))
        return hf_config, source, named
    return read_hf_config(path), SafetensorsSource(path), named


def read_hf_config(directory: str) -> dict[str, Any]:
    """config.json of an HF checkpoint directory (or hub id)."""
    directory = hub.resolve_id(directory)
    config_path = fs.join(directory, "config.json")
    if not fs.isfile(config_path):
        raise UserError(f"no config.json in {directory!r}; model.path must be a Hugging Face "
                        "checkpoint directory or a .gguf file")
    return json.loads(fs.read_text(config_path))


def load_from_source(hf_config: dict[str, Any], source: TensorSource, *, mesh: Mesh | None = None,
                     rules: Any = None, untrained_from: str | None = None,
                     **config_fields: Any) -> tuple[Transformer, ModelConfig]:
    """Build the model of `hf_config` from the tensors of `source` (HF names and layout).

    `untrained_from` names the checkpoint (directory or hub id) a multimodal model's
    untrained tensors are copied from on export (ModelConfig.untrained_from)."""
    config = ModelConfig.from_hf(hf_config, **config_fields)
    if config.quantization.enabled:
        raise ValueError("a quantised base loads through kto_jax.models.from_pretrained (quantized_base)")
    if config.family.passthrough and untrained_from:
        config = config.replace(untrained_from=untrained_from)
    source = in_our_spelling(source, config.family)
    rows = table.param_table(config)
    check_tensor_names(rows, source.names(), config)
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    graphdef, state = nnx.split(abstract_model(config))
    shardings = dict(nnx.to_flat_state(shd.named_shardings(state, mesh, shd.rules_of(rules))))
    variables = dict(nnx.to_flat_state(state))
    if set(variables) != {row.path for row in rows}:  # the table test guards this; fail loudly if not
        raise AssertionError(f"param table does not cover the model: {set(variables) ^ {r.path for r in rows}}")
    for row in rows:
        var = variables[row.path]
        var.set_value(load_param(row, source, var.get_value().shape, shardings[row.path].get_value(), config))
    return nnx.merge(graphdef, state), config


def load_param(row: table.ParamRow, source: TensorSource, shape: tuple[int, ...], sharding: NamedSharding,
               config: ModelConfig) -> jax.Array:
    """One parameter on its sharding: from a slicing source each process reads only its
    devices' blocks (shard_read.read_sharded), from any other the whole tensor(s) (`read_param`)."""
    if sliceable(source):
        return read_sharded(row, source, shape, sharding, config)
    return place(read_param(row, source, shape, config), sharding)


def in_our_spelling(source: TensorSource, family: Family) -> TensorSource:
    """`source` with its tensor names in the spelling of the family's rows (a checkpoint in an
    older spelling, `Family.legacy_prefixes`, is read through a RenamedSource)."""
    if family.legacy_prefixes and any(rename(n, family.legacy_prefixes) != n for n in source.names()):
        return RenamedSource(source, family.legacy_prefixes)
    return source


def check_tensor_names(rows: tuple[table.ParamRow, ...], names: set[str], config: ModelConfig) -> None:
    """UserError naming missing or unexpected tensors before anything is read (the family's
    untrained `passthrough` tensors are expected extras)."""
    expected = {n for row in rows
                for n in row.hf_names(config.num_layers, config.num_experts, config.stack_layers(row.path[-1]))}
    missing = sorted(expected - names)
    extra = sorted(n for n in names - expected if not table.ignorable_hf_name(n, config)
                   and not n.startswith(config.family.passthrough or ("\0",)))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}")
    if problems:
        raise UserError(f"checkpoint does not match {config.architecture} "
                        f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
                        + "; ".join(problems))


def read_param(row: table.ParamRow, source: TensorSource, shape: tuple[int, ...],
               config: ModelConfig) -> np.ndarray:
    """Our array for one row: HF tensor(s) shape-checked, transformed, stacked, cast."""
    target = np.dtype(jnp.dtype(config.param_dtype))
    if not row.stacked:
        return _convert(row, row.hf_name, source, shape, target)
    out = np.empty(shape, target)
    per = 2 if row.per_expert else 1  # leading axes one HF tensor spans: layer (and expert)
    slots = out.reshape(-1, *shape[per:])
    for j, name in enumerate(row.hf_names(config.num_layers, config.num_experts, config.stack_layers(row.path[-1]))):
        slots[j] = _convert(row, name, source, shape[per:], target)
    return out


def _convert(row: table.ParamRow, name: str, source: TensorSource, shape: tuple[int, ...],
             target: np.dtype) -> np.ndarray:
    tensor = np.asarray(source.get(name))
    check_shape(name, tensor.shape, table.hf_shape(row.transform, shape))
    return table.to_ours(row.transform, tensor, shape).astype(target)


def place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array onto its sharding; each device receives only its own shard."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ---- export ----

def save_pretrained(model: Transformer, out_dir: str, tokenizer: Any = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None,
                    adapters: Any = None) -> None:
    """Write config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json.

    Args:
      model: a Transformer (any sharding; multi-host arrays are gathered). A quantised base
        (QLoRA, config.quantization) is written dequantised, one layer at a time.
      out_dir: created if needed; only process 0 writes.
      tokenizer: a transformers tokenizer to save alongside, or None.
      max_shard_bytes: upper bound of one safetensors file (a larger tensor gets its own file).
      dtype: dtype of the saved weights ("bfloat16" or jnp.bfloat16); default the model's
        param_dtype. A multimodal model's untrained tensors keep their stored dtype.
      adapters: LoRA adapters (kto_jax.models.lora.LoraAdapters) of a quantised `model`:
        each of their targets is written merged, dequantised W + (alpha / r) A B per layer
        in float32, then cast once to the saved dtype. (A float base merges with
        `kto_jax.models.lora.merge` first.)
    """
    config: ModelConfig = model.config
    save_dtype = np.dtype(jnp.dtype(dtype_name(dtype or config.param_dtype, "export dtype")))
    flat = stored_weights(model)
    if adapters is not None:
        if not config.quantization.enabled:
            raise ValueError("save_pretrained(adapters=...) merges into a quantised base; merge a float "
                             "base with kto_jax.models.lora.merge")
        for target in adapters.targets:
            a, b = adapters.factors(target)
            flat[("layers", target)] = (flat[("layers", target)], a, b, jnp.float32(adapters.scale))
    writer = jax.process_index() == 0
    untrained = _untrained_source(config) if config.family.passthrough else None
    plan = _export_plan(config, flat, save_dtype, untrained, read=writer)
    shards = _group_into_shards(plan, max_shard_bytes)
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: np.ascontiguousarray(fetch()) for name, _, fetch in shard}
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        if writer:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if writer:
        _write_json(os.path.join(out_dir, SAFETENSORS_INDEX),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        hf = {**config.to_hf(), "torch_dtype": save_dtype.name}
        hf.pop(UNTRAINED_FROM_KEY, None)  # the export holds those tensors itself
        _write_json(os.path.join(out_dir, "config.json"), hf)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def stored_weights(model: Transformer) -> dict[tuple[str, ...], Any]:
    """{param-table path: value} of `model`: each parameter's array, or for a quantised
    projection its stored form (`quantize.Int8Weight` / `Nf4Weight`, stacked [L, ...])."""
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if not model.config.quantization.enabled:
        return flat
    names = set(quantized_rows(model.config))
    flat = {path: v for path, v in flat.items() if not (path[0] == "layers" and path[1] in names)}
    return {**flat, **{("layers", name): getattr(model.layers, name)[...] for name in names}}


def _untrained_source(config: ModelConfig) -> TensorSource:
    """The checkpoint a multimodal model was loaded from (its untrained tensors' source)."""
    if not config.untrained_from:
        raise UserError(f"exporting {config.architecture} needs the checkpoint its untrained tensors "
                        f"({', '.join(config.family.passthrough)}...) come from, and the model config "
                        "names none: load the model with from_pretrained(path)")
    path = hub.resolve_id(config.untrained_from)
    if not fs.exists(fs.join(path, "config.json")):
        raise UserError(f"the export of this {config.architecture} copies its untrained tensors from "
                        f"{config.untrained_from!r}, the checkpoint it was trained from, which no longer "
                        "exists: restore it there")
    return in_our_spelling(SafetensorsSource(path), config.family)


def _export_plan(config: ModelConfig, flat: dict, save_dtype: np.dtype, untrained: TensorSource | None,
                 read: bool) -> list[tuple[str, int, Any]]:
    """(HF name, bytes, fetch() -> host array) for every tensor, layer-major like HF; then a
    multimodal model's untrained tensors, as stored (fetched only where `read`: process 0)."""
    rows = table.param_table(config)
    spelling = getattr(untrained, "stored_name", lambda name: name)  # the source's own spelling
    itemsize = save_dtype.itemsize

    def ours(row, layer, expert=None):
        return lambda: to_hf_tensor(flat[row.path], row, layer, expert).astype(save_dtype)

    plan = [(spelling(row.hf_name), math.prod(flat[row.path].shape) * itemsize, ours(row, None))
            for row in rows if not row.stacked]
    stacked = [(r, config.stack_layers(r.path[-1])) for r in rows if r.stacked]
    for i in range(config.num_layers):
        for row, layers in stacked:
            if i not in layers:  # a dense layer's experts, a sparse layer's dense MLP
                continue
            experts = range(config.num_experts) if row.per_expert else (None,)
            shape = flat[row.path].shape[2:] if row.per_expert else _layer_shape(flat[row.path])
            size = math.prod(shape) * itemsize
            j = layers.index(i)  # the layer's row in its stack
            plan += [(spelling(row.hf_name.format(i=i, e=e)), size, ours(row, j, e)) for e in experts]
    if untrained is not None:
        for name in sorted(n for n in untrained.names() if n.startswith(config.family.passthrough)):
            fetch = functools.partial(untrained.get, name) if read else (lambda: np.zeros(0, np.uint8))
            plan.append((spelling(name), _stored_bytes(untrained, name), fetch))
    return plan


def _stored_bytes(source: TensorSource, name: str) -> int:
    """A tensor's size in its checkpoint, from the header when the source can tell (no read)."""
    inner = getattr(source, "source", source)
    stored = getattr(source, "stored_name", lambda n: n)(name)
    if hasattr(inner, "nbytes"):
        return inner.nbytes(stored)
    return source.get(name).nbytes


def _group_into_shards(plan: list, max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    return shards


def _layer_shape(value: Any) -> tuple[int, ...]:
    """One layer's weight shape of a stacked value (array, stored quantised form, or a
    (quantised form, A, B, alpha / r) merge)."""
    value = value[0] if isinstance(value, tuple) else value
    return tuple(value.shape) if isinstance(value, (qz.Int8Weight, qz.Nf4Weight)) else tuple(value.shape[1:])


@jax.jit
def _layer_slice(stacked: Any, i: jax.Array) -> jax.Array:
    """Layer i of a stacked weight; a quantised one dequantised to float32, and with LoRA
    factors (w, A, B, alpha / r) merged: W + (alpha / r) A B in float32 (as lora.delta_weight)."""
    if isinstance(stacked, tuple):
        w, a, b = (qz.layer(x, i) for x in stacked[:3])
        r = a.shape[-1]
        delta = jnp.einsum("ir,ro->io", a.reshape(-1, r), b.reshape(r, -1), precision=jax.lax.Precision.HIGHEST)
        return qz.dequantize(w, jnp.float32) + (stacked[3] * delta).reshape(w.shape)
    if isinstance(stacked, (qz.Int8Weight, qz.Nf4Weight)):
        return qz.dequantize(qz.layer(stacked, i), jnp.float32)
    return jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)


def to_hf_tensor(value: Any, row: table.ParamRow, layer: int | None,
                 expert: int | None = None) -> np.ndarray:
    """One HF tensor (host numpy) from our parameter value; `layer` picks the stacked slice
    (of a quantised value: dequantised, float32), `expert` an expert weight's expert within it."""
    if layer is not None:
        value = _layer_slice(value, jnp.int32(layer))
    if expert is not None:
        value = _layer_slice(value, jnp.int32(expert))
    return table.to_hf(row.transform, _to_host(value))


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def load_tokenizer(path: str) -> Any:
    """The tokenizer of an HF directory (transformers.AutoTokenizer), or of a .gguf file."""
    path = hub.resolve_id(path)
    if str(path).endswith(".gguf"):
        from kto_jax.models.gguf import open_gguf
        return open_gguf(str(path))[2]
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                       for f in ("config.json", "tokenizer_config.json")):
        read_hf_config(path)  # an empty or foreign directory: "no config.json", not a tokenizer error
    from transformers import AutoTokenizer
    try:
        # A bucket directory: only its small files (config, tokenizer) are downloaded.
        with fs.local_copy(path, exclude=("*.safetensors", "*.bin", "*.pt", "*.gguf")) as local:
            return AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {e}") from e
