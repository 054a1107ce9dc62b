"""Hugging Face checkpoint import and export: one loader/saver pair over the param table.

Import reads the checkpoint tensor by tensor through a `TensorSource` (safetensors
directory, or a .gguf file via `kto_jax.models.gguf`), fills an abstract
(`nnx.eval_shape`) model, and places each tensor straight onto its target
NamedSharding, so the whole model never sits on one device. Export writes
config.json, sharded safetensors and their index in the layout
`transformers.AutoModelForCausalLM.from_pretrained` loads unchanged.
"""

from __future__ import annotations

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
from kto_jax.models.config import ModelConfig, dtype_name
from kto_jax.models.tensor_source import SAFETENSORS_INDEX, SafetensorsSource, TensorSource
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
    path = hub.resolve_id(path)
    if str(path).endswith(".gguf"):
        from kto_jax.models.gguf import open_gguf  # lazy: only GGUF users need the gguf package
        hf_config, source, _ = open_gguf(str(path))
    else:
        hf_config = read_hf_config(path)
        source = SafetensorsSource(path)
    return load_from_source(hf_config, source, mesh=mesh, rules=rules,
                            param_dtype=param_dtype, dtype=dtype, **overrides)


def read_hf_config(directory: str) -> dict[str, Any]:
    """config.json of an HF checkpoint directory (or hub id)."""
    directory = hub.resolve_id(directory)
    config_path = fs.join(directory, "config.json")
    if not fs.isfile(config_path):
        raise UserError(f"no config.json in {directory!r}; model.path must be a Hugging Face "
                        "checkpoint directory or a .gguf file")
    return json.loads(fs.read_text(config_path))


def load_from_source(hf_config: dict[str, Any], source: TensorSource, *, mesh: Mesh | None = None,
                     rules: Any = None, **config_fields: Any) -> tuple[Transformer, ModelConfig]:
    """Build the model of `hf_config` from the tensors of `source` (HF names and layout)."""
    config = ModelConfig.from_hf(hf_config, **config_fields)
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
        value = _read_param(row, source, var.get_value().shape, config)
        var.set_value(_place(value, shardings[row.path].get_value()))
    return nnx.merge(graphdef, state), config


def check_tensor_names(rows: tuple[table.ParamRow, ...], names: set[str], config: ModelConfig) -> None:
    """UserError naming missing or unexpected tensors before anything is read."""
    expected = {n for row in rows for n in row.hf_names(config.num_layers)}
    missing = sorted(expected - names)
    extra = sorted(n for n in names - expected if not table.ignorable_hf_name(n, config))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}")
    if problems:
        raise UserError(f"checkpoint does not match {config.architecture} "
                        f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
                        + "; ".join(problems))


def _read_param(row: table.ParamRow, source: TensorSource, shape: tuple[int, ...],
                config: ModelConfig) -> np.ndarray:
    """Our array for one row: HF tensor(s) shape-checked, transformed, stacked, cast."""
    target = np.dtype(jnp.dtype(config.param_dtype))
    if not row.stacked:
        return _convert(row, row.hf_name, source, shape, target)
    out = np.empty(shape, target)
    for i, name in enumerate(row.hf_names(config.num_layers)):
        out[i] = _convert(row, name, source, shape[1:], target)
    return out


def _convert(row: table.ParamRow, name: str, source: TensorSource, shape: tuple[int, ...],
             target: np.dtype) -> np.ndarray:
    tensor = np.asarray(source.get(name))
    want = table.hf_shape(row.transform, shape)
    if tuple(tensor.shape) != want:
        raise UserError(f"tensor {name!r} has shape {tuple(tensor.shape)} but the config "
                        f"(config.json) implies {want}")
    return table.to_ours(row.transform, tensor, shape).astype(target)


def _place(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array onto its sharding; each device receives only its own shard."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ---- export ----

def save_pretrained(model: Transformer, out_dir: str, tokenizer: Any = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None) -> None:
    """Write config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json.

    Args:
      model: a Transformer (any sharding; multi-host arrays are gathered).
      out_dir: created if needed; only process 0 writes.
      tokenizer: a transformers tokenizer to save alongside, or None.
      max_shard_bytes: upper bound of one safetensors file (a larger tensor gets its own file).
      dtype: dtype of the saved weights ("bfloat16" or jnp.bfloat16); default the model's param_dtype.
    """
    config: ModelConfig = model.config
    save_dtype = np.dtype(jnp.dtype(dtype_name(dtype or config.param_dtype, "export dtype")))
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    plan = _export_plan(config, flat, save_dtype.itemsize)
    shards = _group_into_shards(plan, max_shard_bytes)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: np.ascontiguousarray(to_hf_tensor(flat[row.path], row, layer).astype(save_dtype))
                   for name, row, layer, _ in shard}
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        if writer:
            save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    if writer:
        _write_json(os.path.join(out_dir, SAFETENSORS_INDEX),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(os.path.join(out_dir, "config.json"), {**config.to_hf(), "torch_dtype": save_dtype.name})
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def _export_plan(config: ModelConfig, flat: dict, itemsize: int) -> list[tuple[str, table.ParamRow, int | None, int]]:
    """(hf_name, row, layer index or None, bytes) for every HF tensor, layer-major like HF."""
    plan = []
    rows = table.param_table(config)
    for row in rows:
        if not row.stacked:
            plan.append((row.hf_name, row, None, math.prod(flat[row.path].shape) * itemsize))
    for i in range(config.num_layers):
        for row in rows:
            if row.stacked:
                nbytes = math.prod(flat[row.path].shape[1:]) * itemsize
                plan.append((row.hf_name.format(i=i), row, i, nbytes))
    return plan


def _group_into_shards(plan: list, max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[3]
    return shards


@jax.jit
def _layer_slice(stacked: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)


def to_hf_tensor(value: jax.Array, row: table.ParamRow, layer: int | None) -> np.ndarray:
    """One HF tensor (host numpy) from our parameter value; `layer` picks the stacked slice."""
    if layer is not None:
        value = _layer_slice(value, jnp.int32(layer))
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
