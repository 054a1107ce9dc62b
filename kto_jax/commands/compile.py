"""`kto-jax compile --config=configs/X.py --topology=v5p-32 [--model=PRESET] [--config.a.b=v ...]`.

Compiles the run's real train step (kto_jax/train/step.py) ahead of time for a Cloud
TPU slice, on this machine, without TPUs or weights (libtpu, the `tpu` extra), and
prints each chip's memory and whether the program fits its HBM. Exit code 0: fits;
1: does not fit; 2: bad input.

The architecture comes from --model (a preset: llama3_8b, llama3_70b, mistral_7b,
qwen25_3b, ...), else config.json in config.model.path, else config.model.preset
(the paper's recipes in configs/ set it). The batch is the largest
the data pipeline can emit: prompts padded to data.max_prompt_length and completions
to data.max_completion_length (or data.max_length), unless --prompt_len /
--completion_len say otherwise. --find_microbatch searches the largest per-chip
microbatch that fits, keeping the config's number of accumulation microbatches.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.sharding import Mesh

from kto_jax import aot
from kto_jax import sharding as shd
from kto_jax.config import load_config
from kto_jax.data import batching
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.models import PRESETS, ModelConfig, abstract_model, preset
from kto_jax.train import step as step_lib
from kto_jax.train.optimizer import make_optimizer


def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "TPU slice: v5p-32, v5e-16 (v5litepod-16), v4-8, v6e-8, 2xv5p-32.",
                        flag_values=fv)
    flags.DEFINE_string("model", None, f"Architecture preset ({', '.join(PRESETS)}); default: "
                        "config.json in config.model.path, else config.model.preset.", flag_values=fv)
    flags.DEFINE_integer("prompt_len", None, "Padded prompt length P (default: data.max_prompt_length).",
                         flag_values=fv)
    flags.DEFINE_integer("completion_len", None, "Padded completion length C (default: "
                         "data.max_completion_length or data.max_length).", flag_values=fv)
    flags.DEFINE_bool("find_microbatch", False, "Search the largest per-chip microbatch that fits "
                      "(powers of two) instead of compiling the config's.", flag_values=fv)
    flags.DEFINE_integer("max_microbatch", 64, "Largest per-chip microbatch --find_microbatch tries.",
                         flag_values=fv)


def model_config_of(config: ml_collections.ConfigDict, preset_name: str | None) -> ModelConfig:
    """The architecture to compile, with the run's dtypes, remat policy and attention.

    First --model, then config.json in config.model.path, then config.model.preset.
    """
    m = config.model
    ours = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                attention_impl=m.attention_impl)
    hf_config = os.path.join(m.path, "config.json") if m.path else ""
    if not preset_name and os.path.isfile(hf_config):
        with open(hf_config, encoding="utf-8") as f:
            return ModelConfig.from_hf(json.load(f), **ours)
    preset_name = preset_name or m.get("preset", "")
    if not preset_name:
        raise UserError(f"no architecture to compile: config.model.path={m.path!r} holds no config.json "
                        f"and config.model.preset is empty. Pass --model=PRESET (one of {', '.join(PRESETS)}) "
                        "or --config.model.path=HF_DIR (only its config.json is read).")
    return preset(preset_name, **ours)


def sequence_lengths(config: ml_collections.ConfigDict, prompt_len: int | None,
                     completion_len: int | None) -> tuple[int, int]:
    """(P, C): the largest prompt and completion buckets of the data pipeline, or the flags."""
    d = config.data
    prompt_buckets, completion_buckets = batching.bucket_sizes(
        d.bucket_lengths, d.max_prompt_length, d.max_completion_length or d.max_length)
    lengths = (prompt_len or prompt_buckets[-1], completion_len or completion_buckets[-1])
    if min(lengths) < 1:
        raise UserError(f"--prompt_len and --completion_len must be positive, got {lengths}")
    return lengths


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh, prompt_len: int,
                   completion_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch [A, M, ...] (kto_jax/batch.py), on its sharding."""
    t = config.train
    am = (int(t.global_batch_size) // int(t.micro_batch_size), int(t.micro_batch_size))
    sharding = step_lib.batch_sharding(mesh, config.mesh.rules)
    tokens = {"prompt_ids": prompt_len, "prompt_mask": prompt_len}
    if get_loss(config.loss.name).paired:
        tokens |= {k: completion_len for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
        per_example = {"valid": jnp.bool_}
        if config.reference.source == "precomputed":
            per_example |= {"reference_chosen_logps": jnp.float32, "reference_rejected_logps": jnp.float32}
    else:
        tokens |= {"completion_ids": completion_len, "completion_mask": completion_len}
        per_example = {"desirable": jnp.bool_, "weight": jnp.float32, "valid": jnp.bool_}
        if config.reference.source == "precomputed":
            per_example |= {"reference_logps": jnp.float32, "reference_kl_logps": jnp.float32}
    batch = {k: jax.ShapeDtypeStruct((*am, n), jnp.int32, sharding=sharding) for k, n in tokens.items()}
    batch |= {k: jax.ShapeDtypeStruct(am, dtype, sharding=sharding) for k, dtype in per_example.items()}
    return batch


def train_step_program(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh,
                       prompt_len: int, completion_len: int) -> tuple[Any, tuple[Any, Any]]:
    """(jitted train step, (abstract TrainState, abstract batch)) on `mesh`: nothing allocated."""
    steps = max(int(config.train.num_steps), int(config.optim.warmup_steps) + 1)
    tx, schedule = make_optimizer(config.optim, steps)
    graphdef, state = step_lib.abstract_train_state(config, abstract_model(model_config), tx)
    shardings = step_lib.train_state_shardings(state, tx, mesh, config.mesh.rules)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  state, shardings)
    fn = step_lib.make_train_step(config, graphdef, tx, schedule, mesh, shardings)
    return fn, (abstract_state, abstract_batch(config, mesh, prompt_len, completion_len))


def batch_shards(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """How many ways the microbatch axis M is split (the mesh axes of the 'batch' rule)."""
    axes = shd.logical_to_mesh(("batch",), config.mesh.rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def with_microbatch(config: ml_collections.ConfigDict, micro_batch: int) -> ml_collections.ConfigDict:
    """A copy of `config` with `micro_batch` examples per microbatch, same accumulation count."""
    accumulation = max(1, int(config.train.global_batch_size) // int(config.train.micro_batch_size))
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.train.micro_batch_size = micro_batch
    copy.train.global_batch_size = micro_batch * accumulation
    return copy


def _mesh_axes(config: ml_collections.ConfigDict) -> dict[str, int]:
    return {axis: int(config.mesh.get(axis, -1 if axis == "data" else 1)) for axis in shd.MESH_AXES}


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(__doc__.strip())
        return 0
    config, rest, fv = load_config(argv, extra_flags=_define_flags)
    if rest:
        raise UserError(f"unexpected arguments {rest}: kto-jax compile takes only flags.")
    if not fv["topology"].value:
        raise UserError("missing --topology=SLICE, e.g. --topology=v5p-32 (docs/tpu.md).")
    tpu = aot.parse_topology(fv["topology"].value)
    model_config = model_config_of(config, fv["model"].value)
    prompt_len, completion_len = sequence_lengths(config, fv["prompt_len"].value, fv["completion_len"].value)
    mesh_axes = _mesh_axes(config)
    print(f"model {fv['model'].value or config.model.path or config.model.preset} ({model_config.num_layers} layers, hidden "
          f"{model_config.hidden_size}), loss {config.loss.name}, reference {config.reference.source}, "
          f"sequences {prompt_len}+{completion_len} tokens, topology {tpu.name}", flush=True)
    if fv["find_microbatch"].value:
        def build(mesh: Mesh, per_chip: int):
            cfg = with_microbatch(config, per_chip * batch_shards(config, mesh))
            return train_step_program(cfg, model_config, mesh, prompt_len, completion_len)

        def show(size: int, report: aot.CompileReport) -> None:
            print(f"\n--- per-chip microbatch {size}\n{report}", flush=True)

        search = aot.find_max_microbatch(tpu, build, mesh_axes, limit=fv["max_microbatch"].value,
                                         on_report=show)
        print(f"\n{search}")
        return 0 if search.best is not None else 1

    def build_config(mesh: Mesh):
        shards = batch_shards(config, mesh)
        print(f"microbatch {config.train.micro_batch_size} = {config.train.micro_batch_size / shards:g} "
              f"per chip over {shards} batch shards, {int(config.train.global_batch_size) // int(config.train.micro_batch_size)} "
              "accumulation steps", flush=True)
        return train_step_program(config, model_config, mesh, prompt_len, completion_len)

    report = aot.compile_for_topology(tpu, build_config, mesh_axes)
    print(report)
    return 0 if report.fits else 1
