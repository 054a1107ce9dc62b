"""The train step of a config as an abstract program: what `kto-jax compile` and the
benchmark lower ahead of time, with nothing allocated.

    model_config = model_config_of(config, preset_name)        # the architecture
    prompt_len, completion_len = sequence_lengths(config, None, None)
    fn, args = train_step_program(config, model_config, mesh, prompt_len, completion_len)
    fn.lower(*args).compile()                                  # kto_jax/perf/aot.py does this

The program is the trainer's own jitted step (kto_jax/step/train_step.py) on the
abstract train state (kto_jax/step/state.py) and an abstract batch laid out as
kto_jax/batch.py says, every argument a ShapeDtypeStruct carrying its sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kto_jax.batch import batch_shapes
from kto_jax.data import batching, packing
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.models import PRESETS, ModelConfig, abstract_model, preset
from kto_jax.models.lora import abstract_adapters
from kto_jax.models.lora import validate as validate_lora
from kto_jax.sharding import batch_shards
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.state import abstract_train_state, batch_sharding, train_state_shardings
from kto_jax.step.train_step import make_train_step
from kto_jax.train.settings import base_quantization, read_settings


def model_config_of(config: ml_collections.ConfigDict, preset_name: str | None) -> ModelConfig:
    """The architecture to compile, with the run's dtypes, remat policy and attention.

    First --model, then config.json in config.model.path, then config.model.preset.
    """
    m = config.model
    ours = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat_policy=m.remat_policy,
                attention_impl=m.attention_impl, quantization=base_quantization(config))
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


def packed_example(config: ml_collections.ConfigDict, prompt_len: int, completion_len: int
                   ) -> tuple[int, float]:
    """(tokens of a row it takes, kl_share) of an example with a P-token prompt and C-token
    completions, as the trainer packs it (kto_jax/data/packing.py): an unpaired loss with z0
    [x | y] in main rows beside y_kl in kl rows of kl_share * T tokens (`stream_lengths`),
    a paired loss [x | y_w | y_l], any other [x | y]; kl_share 0 without a kl stream."""
    loss = get_loss(config.loss.name)
    if loss.uses_kl and not loss.paired:
        share = packing.kl_share_for(prompt_len + completion_len, completion_len)
        return int(packing.stream_lengths(prompt_len + completion_len, completion_len, share)), share
    return prompt_len + completion_len * (2 if loss.paired else 1), 0.0


def packed_rows(config: ml_collections.ConfigDict, mesh: Mesh, prompt_len: int,
                completion_len: int) -> int:
    """R of a packed microbatch (data.packing) whose every example has a P-token prompt and
    C-token completions (`packed_example`), packed per batch shard as kto_jax/data/packing.py
    does. 0 when data.packing is off (the padded layout)."""
    d = config.data
    if not d.get("packing", False):
        return 0
    m, tree = int(config.train.micro_batch_size), packed_example(config, prompt_len, completion_len)[0]
    if not int(d.pack_length):   # chosen from the data at run time: the tree's, rounded
        return packing.rows_needed(np.full(m, tree), pack_length(config, prompt_len, completion_len),
                                   batch_shards(mesh, config.mesh.rules))
    if tree > int(d.pack_length):
        raise UserError(f"an example of {prompt_len} + {completion_len} (+ {completion_len}) "
                        f"tokens needs {tree} tokens of a packed row, more than "
                        f"data.pack_length={d.pack_length}: raise data.pack_length or lower "
                        "--prompt_len / --completion_len.")
    return packing.rows_needed(np.full(m, tree), int(d.pack_length),
                               batch_shards(mesh, config.mesh.rules))


def pack_length(config: ml_collections.ConfigDict, prompt_len: int, completion_len: int) -> int:
    """T of the compiled packed rows: data.pack_length, or (0: chosen from the data at run
    time) the example's share of a row (`packed_example`) rounded up to 128, as a TPU run
    chooses."""
    tree = packed_example(config, prompt_len, completion_len)[0]
    return int(config.data.get("pack_length", 0)) or -(-tree // 128) * 128


def kl_length(config: ml_collections.ConfigDict, prompt_len: int, completion_len: int) -> int:
    """Tk of the compiled kl rows (0: none): `packing.kl_row_length` of T and the share."""
    share = packed_example(config, prompt_len, completion_len)[1]
    if not (share and config.data.get("packing", False)):
        return 0
    return packing.kl_row_length(pack_length(config, prompt_len, completion_len), share)


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh, prompt_len: int,
                   completion_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch [A, M, ...] (kto_jax/batch.py), on its sharding;
    packed rows [A, R, T] (`packed_rows`) when config.data.packing."""
    t = config.train
    shapes = batch_shapes(get_loss(config.loss.name).paired,
                          accumulation=int(t.global_batch_size) // int(t.micro_batch_size),
                          micro_batch=int(t.micro_batch_size), prompt_len=prompt_len,
                          completion_len=completion_len,
                          precomputed=config.reference.source == "precomputed",
                          rows=packed_rows(config, mesh, prompt_len, completion_len),
                          pack_length=pack_length(config, prompt_len, completion_len),
                          kl_length=kl_length(config, prompt_len, completion_len))
    sharding = batch_sharding(mesh, config.mesh.rules)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes.items()}


def train_step_program(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh,
                       prompt_len: int, completion_len: int) -> tuple[Any, tuple[Any, Any]]:
    """(jitted train step, (abstract TrainState, abstract batch)) on `mesh`: nothing allocated."""
    settings = read_settings(config, device_count=mesh.devices.size)
    steps = max(int(config.train.num_steps), int(settings.optim.warmup_steps) + 1)
    tx, schedule = make_optimizer(settings.optim, steps)
    lora = settings.lora
    if lora is not None:
        validate_lora(lora, model_config, settings.loss)
    adapters = None if lora is None else abstract_adapters(model_config, lora)
    graphdef, state = abstract_train_state(settings.step, abstract_model(model_config), tx,
                                           adapters)
    shardings = train_state_shardings(state, tx, mesh, settings.rules)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  state, shardings)
    fn = make_train_step(settings.step, graphdef, tx, schedule, mesh, shardings)
    return fn, (abstract_state, abstract_batch(config, mesh, prompt_len, completion_len))


def with_microbatch(config: ml_collections.ConfigDict, micro_batch: int) -> ml_collections.ConfigDict:
    """A copy of `config` with `micro_batch` examples per microbatch, same accumulation count."""
    accumulation = max(1, int(config.train.global_batch_size) // int(config.train.micro_batch_size))
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.train.micro_batch_size = micro_batch
    copy.train.global_batch_size = micro_batch * accumulation
    return copy
